"""``Checkpointer``: complete PyTorch training state, saved and resumed in a few lines.

    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=100)
    start = ck.restore()                  # the step to run next: 0 on a fresh start
    for step in range(start, total):
        ...train one step...
        ck.step_done(step + 1, metrics={"loss": loss})   # saves on cadence or on the stop signal
        if ck.should_stop():
            break
    ck.finish()                           # the final checkpoint, or the end of a stop

A checkpoint at step N holds the state after N optimizer steps; ``restore()`` returns N.

The class is the face: it holds what to save and when; the state capture (files <-> objects)
is :mod:`hpc_ckpt.capture`, the ranks' file names and stop agreement :mod:`hpc_ckpt.ranks`, the
protocol calls :class:`hpc_ckpt.Session`, the state of each kind of object :mod:`hpc_ckpt.state`.

Files (all plain names, no pickle): ``model.safetensors``, ``optimizer.safetensors``,
``rng.safetensors``, ``trainer_state.json`` (counters, scheduler, scaler, data position, RNG of
Python and numpy, best metric, metrics, config, extras, versions; no timestamps, so identical
states give identical bytes), ``state.safetensors`` when extras or stateful objects hold tensors,
``reference_batch.safetensors`` with a reference batch.

Multi-rank jobs (``hpc-ckpt wrap --ranks N``, ``slurm.ntasks: N``; README, "Multi-rank jobs"):
rank 0 alone stages the replicated state (models, optimizers that are not sharded, schedulers,
scaler, counters, metrics, best, config, extras, other stateful objects: ``trainer_state.json``
and its tensor files); every rank stages its own state (``rng.safetensors`` and
``rank_state.json``: its RNG streams, its data position, its shard of a sharded optimizer).
The supervisor commits them all as one checkpoint, rank r's file NAME as ``rank<r:05d>.NAME``.
With torch.distributed initialized, :meth:`step_done` agrees across ranks on stopping (one
``all_reduce(MAX)`` per step), so every rank saves and stops at the same step.

Sharded models (DTensor parameters: FSDP2, tensor parallel; or FSDP1): models and optimizers go
through torch.distributed.checkpoint instead (:mod:`hpc_ckpt.sharded`): every rank writes its
shards with ``dcp.save`` (or ``dcp.async_save``), DCP's files keep their names in the checkpoint,
``trainer_state.json`` marks them ``{"dcp": true}``, and the checkpoint resumes on any world size.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, Mapping, MutableMapping, Optional, Sequence, Set, Tuple, Union

from . import capture
from . import sharded as dcp_state
from ._codec import is_tensor
from .capture import DCP_ENTRY, FORMAT, PER_RANK_STATEFUL, RANK_STATE_FILE, RNG_FILE, STATE_FILE, is_zero
from .protocol import log
from .ranks import StopAgreement, check_world_seen
from .session import Session, SignalSpec

__all__ = ["Checkpointer", "FORMAT", "STATE_FILE", "RANK_STATE_FILE", "RNG_FILE", "DCP_ENTRY",
           "PER_RANK_STATEFUL"]


def _named(obj: Any, what: str) -> Dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str) or not k or not all(c.isalnum() or c in "_-" for c in k):
                raise ValueError(f"{what} names must be letters, digits, '_' or '-': {k!r}")
        return dict(obj)
    return {"": obj}


class Checkpointer:
    """Saves and restores a training run's complete state through ``hpc-ckpt``.

    Args:
        model: an ``nn.Module``, or ``{name: module}`` (e.g. a model and its EMA).
        optimizer: an optimizer, or ``{name: optimizer}``.
        scheduler: an LR scheduler, or ``{name: scheduler}``; its state must be JSON-able.
        scaler: an AMP ``GradScaler`` (enabled or not).
        loader: a resumable data loader (:class:`hpc_ckpt.ResumableLoader`, or anything with
            ``state_dict``/``load_state_dict``); it also supplies the epoch.
        rngs: extra random generators ``{name: gen}`` (``random.Random``, numpy ``Generator``
            or ``RandomState``, ``torch.Generator``). Python's ``random``, numpy's global state,
            torch's CPU generator and every CUDA device's are always saved.
        stateful: other objects with ``state_dict``/``load_state_dict`` ``{name: obj}``.
        extra: a dict of your own JSON-able values (tensors allowed); restored in place.
        config: what must match between a checkpoint and the run resuming from it (JSON);
            a mismatch raises :class:`ConfigMismatchError` unless ``allow_config_change`` or the
            key is in ``mutable_config``.
        every_steps / every_seconds: the save cadence of :meth:`step_done` (besides the stop
            signal and :meth:`finish`).
        total_steps: the last step, if known: :meth:`step_done` makes no periodic save there,
            so the final checkpoint is the one :meth:`finish` commits marked done.
        monitor / mode: the metric whose best value (``min``/``max``) and step are tracked.
        reference_batch / reference_loss: after a load, ``reference_loss(reference_batch)`` is
            recomputed (models in eval mode, no grad) and compared bit for bit (CPU) with the
            value stored at save time.
        sharded: which optimizers hold only this rank's shard of the state (saved per rank;
            resumable only with the same world size): None (default) for every
            ``ZeroRedundancyOptimizer``, True for all, or a list of names (``""`` for a single
            unnamed optimizer).
        dcp: save the models and optimizers through torch.distributed.checkpoint (DCP): None
            (default) when a model holds DTensors (FSDP2 ``fully_shard``, tensor parallel) or is
            FSDP1; their files are DCP's, the checkpoint resumes on any world size (DCP
            reshards) and loads with plain ``dcp.load`` too (:mod:`hpc_ckpt.sharded`).
        async_save: with ``dcp``, save with ``dcp.async_save``: :meth:`save` returns once the
            state is copied, the files are written in the background and the commit is asked
            for when they are durable; the next save and a stop wait for it.
        stop_agreement / agree_every: in a multi-rank job with torch.distributed initialized,
            agree on stopping every ``agree_every`` steps with one ``all_reduce(MAX)`` (off:
            each rank stops on its own signal, and ranks stopping at different steps are refused).
        run_dir, signals, binary, commit_args, resume, on_commit_error, verbose: see
            :class:`hpc_ckpt.Session`.

    After :meth:`restore`: :attr:`resumed_world_size` is the number of ranks that wrote the
    checkpoint, :attr:`rank_state_restored` whether this rank's own state (RNG) was in it.
    """

    def __init__(self, model: Any = None, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                 *, loader: Any = None, rngs: Optional[Mapping[str, Any]] = None,
                 stateful: Optional[Mapping[str, Any]] = None,
                 extra: Optional[MutableMapping[str, Any]] = None,
                 config: Optional[Mapping[str, Any]] = None, allow_config_change: bool = False,
                 mutable_config: Sequence[str] = (),
                 every_steps: Optional[int] = None, every_seconds: Optional[float] = None,
                 total_steps: Optional[int] = None, monitor: Optional[str] = None, mode: str = "min",
                 reference_batch: Any = None, reference_loss: Optional[Callable[[Any], Any]] = None,
                 run_dir: Optional[str] = None, signals: Optional[Sequence[SignalSpec]] = None,
                 binary: Optional[str] = None, commit_args: Sequence[str] = (), resume: bool = True,
                 on_commit_error: str = "raise", verbose: bool = True,
                 session: Optional[Session] = None,
                 sharded: Union[None, bool, Sequence[str]] = None,
                 dcp: Optional[bool] = None, async_save: bool = False,
                 stop_agreement: bool = True, agree_every: int = 1) -> None:
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        if (reference_batch is None) != (reference_loss is None):
            raise ValueError("give both reference_batch and reference_loss, or neither")
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be >= 1")
        self.models = _named(model, "model")
        self.optimizers = _named(optimizer, "optimizer")
        self.schedulers = _named(scheduler, "scheduler")
        self.scaler = scaler
        self.loader = loader
        self.rngs = dict(rngs or {})
        self.stateful = dict(stateful or {})
        if loader is not None:
            if "loader" in self.stateful:
                raise ValueError("stateful['loader'] clashes with loader=")
            self.stateful["loader"] = loader
        self.extra: MutableMapping[str, Any] = extra if extra is not None else {}
        self.config = dict(config) if config is not None else None
        self.allow_config_change = allow_config_change
        self.mutable_config = set(mutable_config)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.total_steps = total_steps
        self.monitor, self.mode = monitor, mode
        self.reference_batch, self.reference_loss = reference_batch, reference_loss

        self.step = 0
        self.epoch: Optional[int] = None
        self.metrics: Dict[str, Any] = {}
        self._step_metrics: Dict[str, Any] = {}
        self.best: Optional[Dict[str, Any]] = None  # {"value": v, "step": s}
        self._stopped = False
        self._finished = False
        self._last_save = time.monotonic()
        self.session = session or Session(run_dir=run_dir, signals=signals, binary=binary,
                                          commit_args=commit_args, resume=resume,
                                          on_commit_error=on_commit_error, verbose=verbose)
        self.verbose = verbose
        self.rank = self.session.rank
        self.world_size = self.session.world_size
        self.sharded: Set[str] = self._resolve_sharded(sharded)
        self.dcp = self._resolve_dcp(dcp, async_save)
        self.async_save = async_save
        self._async_saver = dcp_state.AsyncSaver() if async_save else None
        self.agreement = StopAgreement(self.world_size, every=agree_every, enabled=stop_agreement)
        self.resumed_world_size: Optional[int] = None
        self.rank_state_restored: Optional[bool] = None
        self._world_checked = False

    def _resolve_sharded(self, sharded: Union[None, bool, Sequence[str]]) -> Set[str]:
        if sharded is None:
            return {n for n, o in self.optimizers.items() if is_zero(o)}
        if sharded is True:
            return set(self.optimizers)
        if sharded is False:
            return set()
        names = set(sharded)
        unknown = sorted(names - set(self.optimizers))
        if unknown:
            raise ValueError(f"sharded={sorted(names)}: no optimizer named {unknown} "
                             f"(optimizers: {sorted(self.optimizers)})")
        return names

    def _resolve_dcp(self, dcp: Optional[bool], async_save: bool) -> bool:
        use = any(dcp_state.is_sharded_module(m) for m in self.models.values()) if dcp is None else dcp
        if use and self.sharded:
            raise ValueError(f"optimizers {sorted(self.sharded)} are saved one shard per rank "
                             "(sharded=...), and the models through DCP (dcp=...): choose one; DCP "
                             "saves sharded optimizer state of FSDP/DTensor models by itself")
        if async_save and not use:
            raise ValueError("async_save=True applies to state saved through DCP (a sharded "
                             "model, or dcp=True)")
        return use

    @property
    def multi_rank(self) -> bool:
        """Several ranks: per-rank files, rank 0 writes the replicated state."""
        return self.world_size > 1

    def _check_world(self) -> None:
        """Refuse a torch.distributed job of several ranks that the supervisor sees as one
        (:func:`hpc_ckpt.ranks.check_world_seen`); checked once."""
        if self._world_checked:
            return
        self._world_checked = True
        check_world_seen(self.world_size, self.session.enabled)

    # ------------------------------------------------------------------ protocol-facing
    @property
    def resume_from(self) -> Optional[str]:
        return self.session.resume_from

    def restore(self) -> int:
        """Load the checkpoint to resume from, if any; returns the step to run next (0: fresh).

        RNG states are set last, so call this after building everything, right before the loop.
        """
        path = self.session.resume_from
        if path is None:
            return 0
        self.load(path)
        self.session.committed_step = self.step
        if self.verbose:
            log(f"resumed from {path} at step={self.step} epoch={self.epoch}")
        return self.step

    def step_done(self, step: int, *, epoch: Optional[int] = None,
                  metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Record that ``step`` optimizer steps are done; save if due or if a stop signal came.

        ``epoch``: completed epochs (default: the loader's, else unchanged). ``metrics``: numbers
        (tensors are read with ``.item()``) measured at this step: sent with this step's commit
        request (what ``keep_best`` retention sees), and kept in :attr:`metrics` (the latest value
        of each, saved and restored).
        """
        self.step = int(step)
        self._step_metrics = {}
        if epoch is not None:
            self.epoch = int(epoch)
        elif self.loader is not None and hasattr(self.loader, "epoch"):
            self.epoch = int(self.loader.epoch)
        if metrics:
            for k, v in metrics.items():
                self._step_metrics[k] = float(v.detach().cpu().item()) if is_tensor(v) else v
            self.metrics.update(self._step_metrics)
            self._update_best()
        if self._stopped:
            return
        self._check_world()
        stop, timed = self._decide()
        if stop:
            self._stop()
            return
        due = (self.every_steps is not None and self.step % self.every_steps == 0) or timed
        if self.total_steps is not None and self.step >= self.total_steps:
            due = False  # finish() commits it, marked done
        if due and not self.session.covered(self.step):
            self.save(reason="periodic")

    def _decide(self) -> Tuple[bool, bool]:
        """(stop now, a time-based save is due) at :attr:`step`: this rank's view, or, with
        several ranks agreeing, the MAX over every rank at agreement steps (False between them)."""
        stop = self.session.stop_requested
        timed = self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds
        if not self.agreement.active():
            return stop, timed
        if not self.agreement.due(self.step):
            return False, False
        s, t = self.agreement.agree([stop, timed])
        return bool(s), bool(t)

    def should_stop(self) -> bool:
        """True once a stop signal came: the current state is then committed (or requested);
        leave the loop and call :meth:`finish` (the process should exit 0). With several ranks
        agreeing, True only once they agreed (in :meth:`step_done`): every rank sees True after
        the same step."""
        if not self._stopped and self.session.stop_requested and not self.agreement.active():
            self._stop()
        return self._stopped

    def _stop(self) -> None:
        if self.session.enabled and not self.session.covered(self.step):
            self.save(reason=self.session.stop_reason)
        self.session.wait()
        self._stopped = True

    def finish(self) -> bool:
        """End of training: True if it completed (the final state is committed as done),
        False after a stop signal (its checkpoint committed). Restores the signal handlers."""
        if self._finished:
            return not self._stopped
        try:
            if not self._stopped and self.agreement.active():
                # One last agreement (every rank calls finish()): all save the same way.
                if self.agreement.agree([self.session.stop_requested])[0]:
                    self._stop()
            if self._stopped or (self.session.stop_requested and not self.agreement.active()):
                self.should_stop()
            elif self.session.enabled and not self.session.covered(self.step):
                self.save(done=True, reason="final")
        finally:
            self._finished = True
            self.session.close()
        return not self._stopped

    def close(self) -> None:
        """Restore the signal handlers (no save). :meth:`finish` does this too."""
        self._finished = True
        self.session.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        self.close()

    def request_stop(self) -> None:
        """Act as if the stop signal had arrived (e.g. from an early-stopping rule)."""
        self.session.request_stop()

    def save(self, *, done: bool = False, reason: str = "manual") -> None:
        """Stage the current state and ask for its commit as :attr:`step` now."""
        self._check_world()
        self.session.commit(self.step, self.write, epoch=self.epoch, metrics=self._step_metrics,
                            done=done, reason=reason,
                            sharded=self.multi_rank and (bool(self.sharded) or self.dcp),
                            reshardable=self.dcp)
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ state <-> files
    # (the capture itself is hpc_ckpt.capture)
    def _update_best(self) -> None:
        if self.monitor is None or self.monitor not in self.metrics:
            return
        v = self.metrics[self.monitor]
        try:
            v = float(v)
        except (TypeError, ValueError):
            return
        if math.isnan(v):
            return
        b = self.best
        if b is None or (v < b["value"] if self.mode == "min" else v > b["value"]):
            self.best = {"value": v, "step": self.step}

    def state(self) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
        """(trainer_state.json content, {file name: tensors}) of the current state, as a 1-rank
        job saves it (:func:`hpc_ckpt.capture.state`)."""
        return capture.state(self)

    def rank_state(self) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any], Dict[str, Dict[str, Any]]]:
        """What this rank of a multi-rank job stages (:func:`hpc_ckpt.capture.rank_state`)."""
        return capture.rank_state(self)

    def write(self, directory: str) -> Optional["Future[Any]"]:
        """Write the current state's files into ``directory`` (:func:`hpc_ckpt.capture.write`)."""
        return capture.write(self, directory)

    def load(self, path: str) -> None:
        """Load every registered object's state from checkpoint dir ``path``
        (:func:`hpc_ckpt.capture.load`)."""
        capture.load(self, path)

    def _check_dcp(self, st: Mapping[str, Any], where: str) -> None:
        capture.check_dcp(self, st, where)
