"""The hpc-ckpt child protocol: environment, stop signals, staging and commits.

Under ``hpc-ckpt wrap -- CMD`` the program gets (README, "Child protocol"):

  HPC_CKPT_RUN_DIR          the run directory
  HPC_CKPT_RESUME_FROM      the committed checkpoint dir to resume from (unset: fresh start)
  HPC_CKPT_STAGING          an empty dir to write a checkpoint's files into (plain names)
  HPC_CKPT_COMMIT_REQUEST   where to ask for a commit: ``{"step", "epoch", "metrics", "done",
                            "sharded", "stopping"}`` (``stopping``: saved on a stop signal)
                            written to ``<path>.tmp`` and renamed; the supervisor commits, writes
                            ``<path>.result``, empties staging and removes the request (the ack)
  HPC_CKPT_SIGNAL           the signal that means "checkpoint and exit 0"

A multi-rank job (``hpc-ckpt wrap --ranks N``, ``slurm.ntasks: N``) gives every rank its own
staging dir and request file, the same resume point, and (README, "Multi-rank jobs"):

  HPC_CKPT_RANK               this rank (0-based)
  HPC_CKPT_WORLD_SIZE         the number of ranks
  HPC_CKPT_RESUME_WORLD_SIZE  how many ranks wrote HPC_CKPT_RESUME_FROM

The supervisor commits rank r's staged file NAME as ``rank<r:05d>.NAME`` once every rank has
asked for the same step.

Every path is read from the environment once, at start (the staging dir may differ per
allocation). Outside ``wrap``, a local run dir is committed with ``hpc-ckpt commit`` (the
binary from ``HPC_CKPT_BIN`` or ``PATH``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

from .errors import CommitError, ProtocolError

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# The one hidden name a checkpoint may hold: torch.distributed.checkpoint's metadata file.
DCP_METADATA = ".metadata"
POLL_S = 0.01


def log(msg: str) -> None:
    print(f"hpc_ckpt: {msg}", file=sys.stderr, flush=True)


def parse_signal(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or a number -> the signal."""
    name = name.strip()
    if name.isdigit():
        return signal.Signals(int(name))
    up = name.upper()
    try:
        return signal.Signals[up if up.startswith("SIG") else "SIG" + up]
    except KeyError:
        raise ProtocolError(f"unknown signal name {name!r} (HPC_CKPT_SIGNAL)") from None


@dataclass(frozen=True)
class Environment:
    """What the supervisor told this process (all None outside ``wrap``)."""

    run_dir: Optional[str]
    resume_from: Optional[str]
    staging: Optional[str]
    request: Optional[str]
    signal_name: Optional[str]
    # Multi-rank jobs: this rank, the number of ranks, and how many wrote resume_from.
    rank: int = 0
    world_size: int = 1
    resume_world_size: Optional[int] = None

    @classmethod
    def from_env(cls, env: Optional[Dict[str, str]] = None) -> "Environment":
        """Read the protocol's variables; a malformed rank variable raises :class:`ProtocolError`."""
        e = os.environ if env is None else env

        def get(k: str) -> Optional[str]:
            return e.get(k) or None

        def num(k: str, default: Optional[int], least: int) -> Optional[int]:
            v = get(k)
            if v is None:
                return default
            try:
                n = int(v)
            except ValueError:
                raise ProtocolError(f"{k}={v!r} is not a number") from None
            if n < least:
                raise ProtocolError(f"{k}={v!r} must be >= {least}")
            return n

        rank, world = num("HPC_CKPT_RANK", 0, 0), num("HPC_CKPT_WORLD_SIZE", 1, 1)
        assert rank is not None and world is not None
        if rank >= world:
            raise ProtocolError(f"HPC_CKPT_RANK={rank} is not below HPC_CKPT_WORLD_SIZE={world}")
        return cls(run_dir=get("HPC_CKPT_RUN_DIR"), resume_from=get("HPC_CKPT_RESUME_FROM"),
                   staging=get("HPC_CKPT_STAGING"), request=get("HPC_CKPT_COMMIT_REQUEST"),
                   signal_name=get("HPC_CKPT_SIGNAL"), rank=rank, world_size=world,
                   resume_world_size=num("HPC_CKPT_RESUME_WORLD_SIZE", None, 1))

    @property
    def under_wrap(self) -> bool:
        return bool(self.staging and self.request)


# ----------------------------------------------------------------------------- signals

def say_ready() -> None:
    """Tell ``hpc-ckpt wrap`` this process handles its stop signals now: create the file
    ``HPC_CKPT_READY_FILE`` names (nothing outside ``wrap``). Until then the supervisor holds a
    stop signal back (bounded) rather than let it kill a program still starting up."""
    path = os.environ.get("HPC_CKPT_READY_FILE")
    if path:
        try:
            with open(path, "a"):
                pass
        except OSError as e:  # the supervisor then waits for its bound: not fatal
            log(f"cannot tell the supervisor this process is ready for stop signals ({path}): {e}")


class StopSignals:
    """Handlers that only record the first stop signal; ``close()`` puts the old ones back.

    A handler a framework re-installed after ``close()`` (Lightning restores what it found, i.e.
    ours) passes its signal on to the handler we replaced, so it changes nothing after close.
    """

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.received: Optional[signal.Signals] = None
        self._previous: Dict[signal.Signals, Any] = {}
        self._restore_to: Dict[signal.Signals, Any] = {}
        self._closed = False
        if threading.current_thread() is not threading.main_thread():
            log("not in the main thread: cannot install signal handlers; stop signals are not "
                "seen (call Checkpointer from the main thread, or call request_stop() yourself)")
            return
        for s in dict.fromkeys(signals):
            self._previous[s] = signal.signal(s, self._handler)
        self._restore_to = dict(self._previous)
        say_ready()

    def _handler(self, signum: int, frame: Any) -> None:
        if self._closed:
            prev = self._restore_to.get(signal.Signals(signum), signal.SIG_DFL)
            if callable(prev):
                prev(signum, frame)
            elif prev != signal.SIG_IGN:  # the default action (end the process)
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.received is None:  # a flag, nothing else: the loop acts at the next step end
            self.received = signal.Signals(signum)

    def reinstall(self) -> None:
        """Take our signals back from whoever replaced the handlers since (a framework)."""
        if not self._closed and threading.current_thread() is threading.main_thread():
            for s in self._previous:
                signal.signal(s, self._handler)

    @property
    def name(self) -> str:
        return self.received.name if self.received is not None else ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s, h in self._previous.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # pragma: no cover - not the main thread any more
                pass


# ----------------------------------------------------------------------------- transports

@dataclass
class CommitResult:
    step: int
    checkpoint: str


class Transport:
    """How staged files become a committed checkpoint."""

    resume_from: Optional[str] = None
    kind = "none"

    def staging(self) -> str:
        """An empty dir that is ours to write into (waits for the previous acknowledgement)."""
        raise NotImplementedError

    def submit(self, step: int, epoch: Optional[int], metrics: Dict[str, float], done: bool,
               sharded: bool = False, reshardable: bool = False, stopping: bool = False) -> None:
        raise NotImplementedError

    def wait(self) -> Optional[CommitResult]:
        """Wait for the last submission's answer; raise CommitError if it failed."""
        return None

    @property
    def pending(self) -> Optional[int]:
        return None

    def close(self) -> None:
        pass


def _clear_dir(d: str) -> None:
    for n in os.listdir(d):
        p = os.path.join(d, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def check_staged(d: str) -> List[str]:
    names = sorted(os.listdir(d))
    for n in names:
        if not (NAME_RE.match(n) or n == DCP_METADATA) or n == "MANIFEST.json":
            raise ProtocolError(f"staged file name {n!r} is not allowed (letters, digits, '.', '_', '-';"
                                f" not starting with '.' but for DCP's {DCP_METADATA}; not MANIFEST.json)")
        if not os.path.isfile(os.path.join(d, n)) or os.path.islink(os.path.join(d, n)):
            raise ProtocolError(f"staged {n!r} is not a regular file")
    if not names:
        raise ProtocolError("nothing was staged")
    return names


class WrapTransport(Transport):
    """The child side of ``hpc-ckpt wrap``: stage, request, wait for the acknowledgement."""

    kind = "wrap"

    def __init__(self, env: Environment, ack_warn_s: float = 60.0) -> None:
        assert env.staging and env.request
        if not os.path.isdir(env.staging):
            raise ProtocolError(f"HPC_CKPT_STAGING {env.staging!r} is not a directory")
        if env.resume_from and not os.path.isdir(env.resume_from):
            raise ProtocolError(f"HPC_CKPT_RESUME_FROM {env.resume_from!r} is not a directory")
        self.dir = env.staging
        self.request = env.request
        self.resume_from = env.resume_from
        self._pending: Optional[int] = None
        self._ppid = os.getppid()
        self._ack_warn_s = ack_warn_s

    @property
    def pending(self) -> Optional[int]:
        return self._pending

    def staging(self) -> str:
        self.wait()
        if os.path.lexists(self.request):
            # Not ours (none pending): someone else's request; the supervisor answers it.
            self._await_gone()
        _clear_dir(self.dir)  # our own leftovers of a failed staging
        return self.dir

    def submit(self, step: int, epoch: Optional[int], metrics: Dict[str, float], done: bool,
               sharded: bool = False, reshardable: bool = False, stopping: bool = False) -> None:
        check_staged(self.dir)
        req: Dict[str, Any] = {"step": int(step), "metrics": metrics, "done": bool(done)}
        if epoch is not None:
            req["epoch"] = int(epoch)
        if sharded:  # this rank's files are a shard: they load only with the same world size...
            req["sharded"] = True
        if reshardable:  # ...unless their reader reshards them (DCP)
            req["reshardable"] = True
        if stopping:  # saved on a stop signal: work is left, whatever our exit status
            req["stopping"] = True
        tmp = self.request + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(req, f, allow_nan=False)
        os.replace(tmp, self.request)
        self._pending = int(step)

    def _await_gone(self) -> None:
        t0 = last = time.monotonic()
        while os.path.lexists(self.request):
            time.sleep(POLL_S)
            now = time.monotonic()
            if os.getppid() != self._ppid:
                raise ProtocolError("the supervisor (parent process) is gone; the commit request "
                                    f"{self.request} will not be answered")
            if now - last >= self._ack_warn_s:
                last = now
                log(f"still waiting for the supervisor to commit ({now - t0:.0f} s)")

    def wait(self) -> Optional[CommitResult]:
        if self._pending is None:
            return None
        step = self._pending
        self._await_gone()
        self._pending = None
        try:
            with open(self.request + ".result", encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise CommitError(step, f"cannot read the supervisor's answer {self.request}.result: {e}") from e
        if res.get("ok") is True:
            return CommitResult(step, str(res.get("checkpoint")))
        raise CommitError(step, str(res.get("error")))


def find_binary(explicit: Optional[str] = None) -> Optional[str]:
    for cand in (explicit, os.environ.get("HPC_CKPT_BIN")):
        if cand:
            return cand if os.path.isfile(cand) and os.access(cand, os.X_OK) else None
    return shutil.which("hpc-ckpt")


class LocalTransport(Transport):
    """Outside ``wrap``: a run dir of our own, committed with ``hpc-ckpt commit`` (synchronous)."""

    kind = "local"

    def __init__(self, run_dir: str, binary: Optional[str] = None,
                 commit_args: Iterable[str] = (), resume: bool = True) -> None:
        found = find_binary(binary)
        if found is None:
            raise ProtocolError(
                "not under `hpc-ckpt wrap`, and a local run dir needs the `hpc-ckpt` binary to "
                f"commit checkpoints: none found ({'HPC_CKPT_BIN=' + repr(os.environ['HPC_CKPT_BIN']) + ' is not an executable file; ' if os.environ.get('HPC_CKPT_BIN') else ''}"
                "not on PATH). Put it on PATH, set HPC_CKPT_BIN, or run under `hpc-ckpt wrap`.")
        self.bin: str = found
        self.run_dir = os.path.abspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.commit_args = list(commit_args)
        self.dir = os.path.join(self.run_dir, f"staging.local-{os.getpid()}")
        self._last: Optional[CommitResult] = None
        self.resume_from = self._resume_point() if resume else None

    def _run(self, args: List[str]) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([self.bin, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False)

    def _resume_point(self) -> Optional[str]:
        """The checkpoint a resume uses: the pointer's, verified, else the newest that verifies."""
        if not os.path.isdir(os.path.join(self.run_dir, "checkpoints")):
            return None
        p = self._run(["status", "--json", self.run_dir])
        if p.returncode != 0:
            raise ProtocolError(f"`hpc-ckpt status --json {self.run_dir}` failed "
                                f"(exit {p.returncode}): {p.stderr.strip()[-2000:]}")
        st = json.loads(p.stdout)
        if st.get("fell_back"):
            log(f"the pointer's checkpoint does not verify; resuming from an older one ({st.get('pointer')})")
        name = st.get("resume_from")
        if not name:
            faulty = [c["name"] for c in st.get("checkpoints", []) if c.get("verified") is False]
            if faulty:
                raise ProtocolError(f"no checkpoint of {self.run_dir} verifies ({', '.join(faulty)})")
            return None
        path = name if os.path.isabs(name) else os.path.join(self.run_dir, "checkpoints", name)
        return path

    def staging(self) -> str:
        if os.path.isdir(self.dir):
            _clear_dir(self.dir)
        else:
            os.makedirs(self.dir)
        return self.dir

    def submit(self, step: int, epoch: Optional[int], metrics: Dict[str, float], done: bool,
               sharded: bool = False, reshardable: bool = False, stopping: bool = False) -> None:
        check_staged(self.dir)
        args = ["commit", "--run-dir", self.run_dir, "--step", str(int(step)), "--json"]
        if epoch is not None:
            args += ["--epoch", str(int(epoch))]
        for k, v in metrics.items():
            args += ["--metric", f"{k}={v!r}"]
        p = self._run(args + self.commit_args + [self.dir])
        _clear_dir(self.dir)
        if p.returncode != 0:
            raise CommitError(step, f"`hpc-ckpt commit` exit {p.returncode}: {p.stderr.strip()[-2000:]}")
        self._last = CommitResult(step, json.loads(p.stdout).get("checkpoint", ""))

    @property
    def pending(self) -> Optional[int]:
        return self._last.step if self._last is not None else None

    def wait(self) -> Optional[CommitResult]:
        last, self._last = self._last, None
        return last

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class NullTransport(Transport):
    """No supervisor, no run dir: checkpoints are not saved (a warning says so once)."""

    kind = "none"


def make_transport(env: Environment, run_dir: Optional[str], binary: Optional[str],
                   commit_args: Iterable[str], resume: bool,
                   warn: Callable[[str], None] = log) -> Transport:
    if env.under_wrap:
        if run_dir and env.run_dir and os.path.abspath(run_dir) != os.path.abspath(env.run_dir):
            warn(f"run_dir={run_dir!r} ignored: under `hpc-ckpt wrap` the run dir is {env.run_dir}")
        return WrapTransport(env)
    rd = run_dir or env.run_dir
    if rd:
        return LocalTransport(rd, binary, commit_args, resume)
    warn("not under `hpc-ckpt wrap` and no run_dir given: checkpoints are NOT saved "
         "(run under `hpc-ckpt wrap -- ...`, or pass run_dir=...)")
    return NullTransport()
