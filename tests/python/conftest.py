"""Shared helpers for the hpc_ckpt pytest suite: the real binary, `wrap` runs, signals.

The binary: $HPC_CKPT_BIN, else <repo>/target/debug/hpc-ckpt (`cargo build` first); a missing
binary fails every test that needs it with that message (nothing is skipped).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = os.path.join(REPO, "tests", "python", "jobs")
PY = sys.executable
STEP_RE = re.compile(r"^step=(\d+) loss=(\S+)$")

# wrap's exit codes (README, "Exit codes"): done; work left, run again (no Slurm here); stopped
# by policy (a bare TERM outside Slurm is a user's stop: not requeued, running again resumes).
DONE, RUN_AGAIN, STOPPED = 0, 11, 12
# ("USR1_CHILD": the program alone got the signal; its commit says it stopped: work is left.)
EXIT_AFTER = {"USR1": RUN_AGAIN, "TERM": STOPPED, "KILL_CHILD": RUN_AGAIN, "USR1_CHILD": RUN_AGAIN}


def binary_path() -> str:
    return os.environ.get("HPC_CKPT_BIN") or os.path.join(REPO, "target", "debug", "hpc-ckpt")


@pytest.fixture(scope="session")
def hpc_bin() -> str:
    p = binary_path()
    if not (os.path.isfile(p) and os.access(p, os.X_OK)):
        pytest.fail(f"the hpc-ckpt binary {p} does not exist: build it (`cargo build`) or set "
                    f"HPC_CKPT_BIN to one", pytrace=False)
    return p


def require(module: str) -> None:
    """Import a framework the test needs, or fail (not skip) saying how to install it."""
    try:
        __import__(module)
    except ImportError as e:
        pytest.fail(f"{module} is not installed ({e}): run tests/setup.sh --torch", pytrace=False)


def child_pids(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces/parens: split after the last ')'
        comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        # The supervisor's guards (one per process group of its program) are not the program.
        if int(rest.split()[1]) == pid and comm != "hpc-ckpt-guard":
            out.append(int(d))
    return out


def rank_pid(supervisor: int, rank: int) -> int:
    """The pid of rank ``rank`` of a local `wrap --ranks N` (a child of the supervisor)."""
    for pid in child_pids(supervisor):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"HPC_CKPT_RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"supervisor {supervisor} has no rank {rank} among {child_pids(supervisor)}")


@dataclass
class Incarnation:
    rc: int
    losses: Dict[int, str]
    out: List[str]
    err: str
    sent: bool
    resumed_at: Optional[int] = None

    def describe(self) -> str:
        return (f"rc={self.rc} sent={self.sent}\nstdout tail: {self.out[-8:]}\n"
                f"stderr tail: {self.err[-3000:]}")


@dataclass
class WrapRun:
    """One run dir driven through `hpc-ckpt wrap`, allocation after allocation."""

    bin: str
    run_dir: str
    cmd: List[str]
    config: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    args: List[str] = field(default_factory=list)  # more `wrap` options, e.g. ["--ranks", "2"]
    history: List[Incarnation] = field(default_factory=list)

    def launch(self, stop_at: Optional[int] = None, how: str = "USR1",
               timeout: float = 300.0) -> Incarnation:
        """Run one allocation. ``stop_at``: once the program printed step >= stop_at, send
        ``how``: "USR1"/"TERM" to the supervisor (it forwards), "KILL_CHILD" SIGKILL to the
        program itself, "USR1_CHILD" USR1 to the program alone (as Slurm's `--signal` without
        `B:` does), "USR1_RANK1" USR1 to rank 1 of a local multi-rank job alone."""
        args = [self.bin, "wrap", "--run-dir", self.run_dir]
        if self.config:
            args += ["--config", self.config]
        args += self.args
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        for k in list(env):
            if k.startswith("HPC_CKPT_") and k not in ("HPC_CKPT_LOG",):
                del env[k]
        p = subprocess.Popen(args + ["--"] + self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, bufsize=1, env=env, start_new_session=True)
        err: List[str] = []
        t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
        t.start()
        def kill_all() -> None:
            for c in child_pids(p.pid):
                os.kill(c, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)

        killer = threading.Timer(timeout, kill_all)
        killer.start()
        losses: Dict[int, str] = {}
        out: List[str] = []
        sent = False
        resumed_at = None
        try:
            for line in p.stdout:
                line = line.rstrip("\n")
                out.append(line)
                m = STEP_RE.match(line)
                if m:
                    n = int(m.group(1))
                    assert n not in losses, f"step {n} printed twice by one allocation"
                    losses[n] = m.group(2)
                    if stop_at is not None and n >= stop_at and not sent:
                        sent = True
                        self._stop(p.pid, how)
                elif line.startswith("resumed from ") and "step=" in line:
                    resumed_at = int(line.split("step=")[1].split()[0])
            rc = p.wait()
        finally:
            killer.cancel()
        t.join()
        inc = Incarnation(rc, losses, out, "".join(err), sent, resumed_at)
        self.history.append(inc)
        return inc

    @staticmethod
    def _stop(sup: int, how: str) -> None:
        if how in ("KILL_CHILD", "USR1_CHILD"):
            kids = child_pids(sup)
            assert len(kids) == 1, f"supervisor {sup} has children {kids}"
            os.kill(kids[0], signal.SIGKILL if how == "KILL_CHILD" else signal.SIGUSR1)
        elif how == "USR1_RANK1":  # one rank sees the signal, its peers do not
            os.kill(rank_pid(sup, 1), signal.SIGUSR1)
        else:
            os.kill(sup, getattr(signal, "SIG" + how))

    def run_to_end(self, plan: List[tuple], timeout: float = 300.0) -> List[Incarnation]:
        """Allocations stopped per ``plan`` [(step, how), ...], then one that completes."""
        for stop_at, how in plan:
            inc = self.launch(stop_at, how, timeout)
            assert inc.sent, f"the program ended before step {stop_at}: {inc.describe()}"
            assert inc.rc == EXIT_AFTER[how], f"after {how} at {stop_at}: wrap exit {inc.rc}, " \
                                              f"expected {EXIT_AFTER[how]}: {inc.describe()}"
        inc = self.launch(None, timeout=timeout)
        assert inc.rc == DONE, f"the last allocation did not complete: {inc.describe()}"
        return self.history

    # -- the run dir
    @property
    def checkpoints(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def newest(self) -> str:
        with open(os.path.join(self.run_dir, "last_checkpoint")) as f:
            return os.path.join(self.checkpoints, f.read().strip())

    def committed_steps(self) -> List[int]:
        """Steps of the checkpoints on disk now (retention deletes old ones)."""
        return sorted(int(n[5:]) for n in os.listdir(self.checkpoints) if n.startswith("step-"))

    def journal(self, event: str) -> List[dict]:
        with open(os.path.join(self.run_dir, "journal.jsonl")) as f:
            return [e for e in map(json.loads, f) if e.get("event") == event]

    def commits(self) -> List[int]:
        """Steps of every commit ever made, in order (from the journal)."""
        return [e["step"] for e in self.journal("checkpoint_committed")]

    def all_losses(self) -> Dict[int, List[str]]:
        out: Dict[int, List[str]] = {}
        for inc in self.history:
            for n, v in inc.losses.items():
                out.setdefault(n, []).append(v)
        return out


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def verify(bin: str, path: str) -> None:
    p = subprocess.run([bin, "verify", path], capture_output=True, text=True)
    assert p.returncode == 0, f"hpc-ckpt verify {path}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def get(runs: Dict[str, object], name: str) -> WrapRun:
    """A scenario's run from a module fixture that ran them side by side (its error re-raised)."""
    r = runs[name]
    if isinstance(r, BaseException):
        raise r
    return r  # type: ignore[return-value]


def assert_same_losses(ref: WrapRun, run: WrapRun, steps: int) -> None:
    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, steps + 1)), "steps missing"
    bad = [(n, want[n], v) for n, vs in got.items() for v in vs if v != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"
