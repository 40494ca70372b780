"""One process's side of the protocol: stop signals, staging, commits, acknowledgements.

:class:`Session` is what :class:`hpc_ckpt.Checkpointer` and the framework callbacks share; use it
directly to commit files your code (or a framework) writes itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

from ._codec import jsonable_metrics
from .errors import CommitError
from .protocol import (CommitResult, Environment, NullTransport, Transport, log, make_transport,
                       parse_signal, StopSignals)

SignalSpec = Union[str, int, signal.Signals]


class Session:
    """Signals + transport. Under ``hpc-ckpt wrap`` everything comes from the environment.

    Args:
        run_dir: outside ``wrap`` only: a local run dir, committed with ``hpc-ckpt commit``
            (``HPC_CKPT_BIN`` or ``PATH``). Neither ``wrap`` nor ``run_dir``: nothing is saved.
        signals: the stop signals (default: ``HPC_CKPT_SIGNAL`` (USR1 outside wrap) and TERM).
            Their handlers only set a flag; :meth:`close` restores the previous handlers.
        binary: path of the ``hpc-ckpt`` binary for a local run dir.
        commit_args: extra ``hpc-ckpt commit`` flags for a local run dir (``--keep-last 3``).
        resume: False: ignore any checkpoint (a fresh start); local run dirs only.
        on_commit_error: ``"raise"`` (default) raises :class:`CommitError` with the supervisor's
            message; ``"warn"`` logs it and trains on (the previous checkpoint stays the resume point).
        verbose: log each commit on stderr.
    """

    def __init__(self, *, run_dir: Optional[str] = None, signals: Optional[Sequence[SignalSpec]] = None,
                 binary: Optional[str] = None, commit_args: Iterable[str] = (), resume: bool = True,
                 on_commit_error: str = "raise", verbose: bool = True,
                 env: Optional[Environment] = None) -> None:
        if on_commit_error not in ("raise", "warn"):
            raise ValueError("on_commit_error must be 'raise' or 'warn'")
        self.env = env or Environment.from_env()
        self.verbose = verbose
        self.on_commit_error = on_commit_error
        self.transport: Transport = make_transport(self.env, run_dir, binary, commit_args, resume)
        self.committed_step: Optional[int] = None
        self.last_result: Optional[CommitResult] = None
        self.last_save_seconds: Optional[float] = None
        self._manual_stop: Optional[str] = None
        # An asynchronous save whose files are still being written: (step, thread that asks for
        # the commit once they are durable, the error it met).
        self._inflight: Optional[_Inflight] = None
        if self.enabled:
            if signals is None:
                signals = [self.env.signal_name or "USR1", "TERM"]
            sigs = [s if isinstance(s, signal.Signals) else
                    (signal.Signals(s) if isinstance(s, int) else parse_signal(s)) for s in signals]
            self._signals: Optional[StopSignals] = StopSignals(sigs)
        else:
            self._signals = None

    # -- state
    @property
    def enabled(self) -> bool:
        """False when checkpoints are not saved (no ``wrap``, no run dir)."""
        return not isinstance(self.transport, NullTransport)

    @property
    def rank(self) -> int:
        """This rank (0 outside a multi-rank job)."""
        return self.env.rank

    @property
    def world_size(self) -> int:
        """The number of ranks the supervisor started (1 outside a multi-rank job)."""
        return self.env.world_size

    @property
    def resume_from(self) -> Optional[str]:
        """The committed checkpoint dir to resume from; None on a fresh start."""
        return self.transport.resume_from

    @property
    def stop_requested(self) -> bool:
        """A stop signal arrived (or :meth:`request_stop` was called)."""
        return self._manual_stop is not None or (self._signals is not None and self._signals.received is not None)

    @property
    def stop_reason(self) -> str:
        if self._signals is not None and self._signals.received is not None:
            return f"signal {self._signals.name}"
        return self._manual_stop or ""

    def reclaim_signals(self) -> None:
        """Re-install our stop-signal handlers (after a framework installed its own)."""
        if self._signals is not None:
            self._signals.reinstall()

    def request_stop(self, reason: str = "request_stop()") -> None:
        """Behave as if a stop signal had arrived."""
        if self._manual_stop is None:
            self._manual_stop = reason

    def covered(self, step: int) -> bool:
        """Is the state at ``step`` committed, being written, or awaiting its commit?"""
        inflight = self._inflight.step if self._inflight is not None else None
        return step in (self.committed_step, self.transport.pending, inflight)

    # -- commits
    def wait(self) -> Optional[CommitResult]:
        """Wait for an asynchronous save in flight to be written and asked for, then for the
        last request's acknowledgement (errors per ``on_commit_error``)."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            t0 = time.monotonic()
            inflight.thread.join()
            if self.verbose and time.monotonic() - t0 > 0.05:
                log(f"waited {time.monotonic() - t0:.2f} s for the asynchronous save of step "
                    f"{inflight.step} to be written")
            if inflight.error is not None:
                self._commit_failed(inflight.error)
                return None
        try:
            res = self.transport.wait()
        except CommitError as e:
            self._commit_failed(e)
            return None
        if res is not None:
            self.committed_step = res.step
            self.last_result = res
            if self.verbose:
                log(f"checkpoint step={res.step} committed as {res.checkpoint}")
        return res

    def _commit_failed(self, e: CommitError) -> None:
        if self.on_commit_error == "raise":
            raise e
        log(f"WARNING: {e} (training goes on; the previous checkpoint stays the resume point)")

    def commit(self, step: int, write: Callable[[str], "Optional[Future[Any]]"], *,
               epoch: Optional[int] = None, metrics: Optional[Mapping[str, object]] = None,
               done: bool = False, reason: str = "", wait: bool = False, sharded: bool = False,
               reshardable: bool = False) -> bool:
        """Stage a checkpoint with ``write(staging_dir)`` and ask for its commit as ``step``.

        Waits first for the previous save (in flight, then its acknowledgement: staging is ours
        only then). ``wait=True`` also waits for this one's. Returns False when nothing is saved
        (checkpoints disabled). ``sharded``: this rank's files are a shard of the state (the
        request says so; the checkpoint then loads only with the same world size, unless
        ``reshardable``: their reader reshards them, as DCP's does).

        ``write`` may return a future (an asynchronous save: files still being written): the
        request is then made by a background thread once the future is done, and this returns
        at once; :meth:`wait` (the next save, a stop, :meth:`close`) waits for it.
        """
        if not self.enabled:
            return False
        t0 = time.monotonic()
        self.wait()
        d = self.transport.staging()
        pending = write(d)
        m = jsonable_metrics(metrics, log if self.verbose else None)
        what = f"checkpoint step={step}{'' if epoch is None else f' epoch={epoch}'}"
        tail = f"{f' ({reason})' if reason else ''}{', final' if done else ''}"
        # Saved after a stop signal reached this process: the request says work is left, so a
        # signal the supervisor never got (sent to the job's steps only) still continues the job.
        stopping = not done and self._signals is not None and self._signals.received is not None

        def submit() -> None:
            self.transport.submit(step, epoch, m, done, sharded, reshardable, stopping)

        if pending is not None:
            self._inflight = _Inflight.start(step, pending, submit)
            self.last_save_seconds = time.monotonic() - t0
            if self.verbose:
                log(f"{what} copied in {self.last_save_seconds:.2f} s, written in the background{tail}")
        else:
            try:
                submit()
            except CommitError as e:  # local commits answer at once
                self._commit_failed(e)
                return True
            self.last_save_seconds = time.monotonic() - t0
            if self.verbose:
                log(f"{what} staged in {self.last_save_seconds:.2f} s{tail}")
        if wait:
            self.wait()
        return True

    def commit_files(self, step: int, files: Mapping[str, str], **kw: object) -> bool:
        """Commit existing files: ``{name in the checkpoint: source path}``. Same filesystem:
        hard links (no copy; the sources may be deleted afterwards), else copies."""
        def write(d: str) -> None:
            for name, src in files.items():
                dst = os.path.join(d, name)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
        return self.commit(step, write, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        """Wait for an outstanding acknowledgement; restore the previous signal handlers."""
        try:
            self.wait()
        finally:
            if self._signals is not None:
                self._signals.close()
            self.transport.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Inflight:
    """An asynchronous save: a thread waits for its files, then asks for the commit."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.error: Optional[CommitError] = None
        self.thread: threading.Thread

    @classmethod
    def start(cls, step: int, files: "Future[Any]", submit: Callable[[], None]) -> "_Inflight":
        me = cls(step)

        def run() -> None:
            try:
                files.result()
            except BaseException as e:  # noqa: BLE001 - reported by Session.wait
                me.error = CommitError(step, f"the asynchronous save failed before its commit was "
                                             f"asked for: {type(e).__name__}: {e}")
                return
            try:
                submit()
            except CommitError as e:
                me.error = e

        me.thread = threading.Thread(target=run, name=f"hpc-ckpt-save-{step}", daemon=True)
        me.thread.start()
        return me


def flat_files(directory: str, skip: Iterable[str] = ()) -> Dict[str, str]:
    """The regular files directly in ``directory`` as ``{name: path}`` (sub-dirs refused)."""
    skip = set(skip)
    out: Dict[str, str] = {}
    for n in sorted(os.listdir(directory)):
        p = os.path.join(directory, n)
        if n in skip:
            continue
        if os.path.isdir(p):
            raise ValueError(f"{p}: a checkpoint is a flat set of files; sub-directory {n!r} cannot be committed")
        out[n] = p
    return out
