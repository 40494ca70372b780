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
import os
import struct
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import (Any, Callable, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence, Set,
                    Tuple, Union)

from . import sharded as dcp_state
from . import state as S
from ._codec import TensorSink, decode, dumps, encode, is_tensor, loads_file, torch_module
from .errors import ConfigMismatchError, IncompatibleCheckpointError, ReferenceMismatchError
from .protocol import log
from .ranks import StopAgreement, checkpoint_world_size, rank_file
from .session import Session, SignalSpec

FORMAT = "hpc-ckpt-python/1"
STATE_FILE = "trainer_state.json"
RANK_STATE_FILE = "rank_state.json"
RNG_FILE = "rng.safetensors"
# trainer_state.json's entry of a model or optimizer whose state is in the checkpoint's DCP files.
DCP_ENTRY = {"dcp": True}
# ``stateful`` entries that are per rank (the rest is replicated): the data position.
PER_RANK_STATEFUL = ("loader",)


def _is_zero(opt: Any) -> bool:
    """Is ``opt`` a ``torch.distributed.optim.ZeroRedundancyOptimizer`` (its state is sharded)?"""
    return type(opt).__name__ == "ZeroRedundancyOptimizer" and hasattr(opt, "optim")


def _optimizer_target(opt: Any) -> Any:
    """The object whose ``state_dict`` is this rank's optimizer state: a ZeRO optimizer's local
    optimizer (its shard; ZeRO's own ``state_dict`` needs a consolidation), else ``opt``."""
    return opt.optim if _is_zero(opt) else opt


def _after_optimizer_load(opt: Any) -> None:
    """ZeRO keeps hyper-parameters (lr, ...) in its own param_groups too: copy the loaded ones."""
    if _is_zero(opt):
        for mine, loaded in zip(opt.param_groups, opt.optim.param_groups):
            for k, v in loaded.items():
                if k != "params":
                    mine[k] = v


def _named(obj: Any, what: str) -> Dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str) or not k or not all(c.isalnum() or c in "_-" for c in k):
                raise ValueError(f"{what} names must be letters, digits, '_' or '-': {k!r}")
        return dict(obj)
    return {"": obj}


def _file(kind: str, name: str) -> str:
    return f"{kind}.safetensors" if not name else f"{kind}-{name}.safetensors"


def _save_tensors(path: str, tensors: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file(dict(tensors), path, metadata={"format": "pt"})


def _load_tensors(path: str, where: str) -> Dict[str, Any]:
    from safetensors.torch import load_file  # noqa: PLC0415

    if not os.path.isfile(path):
        raise IncompatibleCheckpointError(f"{where}: {os.path.basename(path)} is missing")
    tensors: Dict[str, Any] = load_file(path, device="cpu")
    return tensors


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


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
            return {n for n, o in self.optimizers.items() if _is_zero(o)}
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
        """A torch.distributed job of several ranks that the supervisor sees as one would commit
        each rank's files as the whole checkpoint: refuse it."""
        if self._world_checked:
            return
        self._world_checked = True
        torch = torch_module()
        d = torch.distributed
        if self.world_size == 1 and self.session.enabled and d.is_available() and d.is_initialized() \
                and d.get_world_size() > 1:
            from .errors import ProtocolError  # noqa: PLC0415

            raise ProtocolError(
                f"torch.distributed runs {d.get_world_size()} ranks but hpc-ckpt sees one (no "
                "HPC_CKPT_WORLD_SIZE): every rank would commit its files as the whole checkpoint. "
                f"Run under `hpc-ckpt wrap --ranks {d.get_world_size()}` (or slurm.ntasks / "
                "distributed.world_size; with torchrun, distributed.launcher: command and "
                "`hpc-ckpt rank -- CMD` per rank)")

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
        job saves it (everything in one place)."""
        files: Dict[str, Dict[str, Any]] = {}
        st = self._replicated_state(files, multi=False)
        # RNG last, and nothing above may consume randomness (the reference runs in fork_rng).
        st["rng"], files[RNG_FILE] = S.rng_state(self.rngs, cuda=True)
        return st, files

    def rank_state(self) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any], Dict[str, Dict[str, Any]]]:
        """What this rank of a multi-rank job stages: (trainer_state.json content on rank 0,
        else None; rank_state.json content; {file name: tensors}). Rank 0 adds the replicated
        state; every rank its RNG streams, data position and optimizer shards."""
        files: Dict[str, Dict[str, Any]] = {}
        # A sharded model's forward is a collective: every rank computes the reference loss.
        ref = self._reference_value(self.reference_batch) \
            if self.dcp and self.reference_batch is not None else None
        rep = self._replicated_state(files, multi=True, reference=ref) if self.rank == 0 else None
        rs: Dict[str, Any] = {"format": FORMAT, "rank": self.rank, "world_size": self.world_size,
                              "step": self.step, "optimizer": {}}
        for name in sorted(self.sharded):
            js, t = S.stateful_state(_optimizer_target(self.optimizers[name]),
                                     "optimizer" + (f"-{name}" if name else ""))
            rs["optimizer"][name] = js
            files[_file("optimizer", name)] = t
        rs["stateful"] = {n: encode(o.state_dict(), f"stateful.{n}", None,
                                    f"{type(o).__name__}.state_dict() must be JSON-able (per-rank state)")
                          for n, o in self.stateful.items() if n in PER_RANK_STATEFUL}
        rs["rng"], files[RNG_FILE] = S.rng_state(self.rngs, cuda=True)
        return rep, rs, files

    def _replicated_state(self, files: Dict[str, Dict[str, Any]], multi: bool,
                          reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Everything but the RNG streams (trainer_state.json), its tensors added to ``files``.
        ``multi``: a multi-rank job's rank 0 (sharded optimizers and per-rank stateful objects
        are left to each rank's rank_state.json). Models and optimizers saved through DCP are
        only marked here (``{"dcp": true}``). ``reference``: the reference loss, when every rank
        computed it."""
        st: Dict[str, Any] = {"format": FORMAT, "versions": S.versions(), "step": self.step,
                              "epoch": self.epoch}
        st["metrics"] = encode(self.metrics, "metrics", None, "metrics must be numbers or JSON values")
        st["best"] = None if self.monitor is None else {"monitor": self.monitor, "mode": self.mode,
                                                         **(encode(self.best, "best", None) or {})}
        st["config"] = None if self.config is None else encode(self.config, "config", None)
        st["model"] = {}
        for name, m in self.models.items():
            if self.dcp:
                st["model"][name] = dict(DCP_ENTRY)
                continue
            st["model"][name], files[_file("model", name)] = S.model_state(m)
        st["optimizer"] = {}
        for name, o in self.optimizers.items():
            if self.dcp:
                st["optimizer"][name] = dict(DCP_ENTRY)
                continue
            if multi and name in self.sharded:
                st["optimizer"][name] = {"sharded": True}
                continue
            js, t = S.stateful_state(_optimizer_target(o), "optimizer" + (f"-{name}" if name else ""))
            st["optimizer"][name] = js
            files[_file("optimizer", name)] = t
        st["scheduler"] = {n: S.scheduler_state(s, f"scheduler{'.' + n if n else ''}")
                           for n, s in self.schedulers.items()}
        aux = TensorSink()
        st["scaler"] = None if self.scaler is None else encode(self.scaler.state_dict(), "scaler", aux)
        st["stateful"] = {n: encode(o.state_dict(), f"stateful.{n}", aux,
                                    f"{type(o).__name__}.state_dict() must be JSON-able or tensors")
                          for n, o in self.stateful.items() if not (multi and n in PER_RANK_STATEFUL)}
        st["extra"] = encode(dict(self.extra), "extra", aux, "extra must be JSON-able or tensors")
        if aux.tensors:  # one tensor in several places (also across parts): saved once, re-tied on load
            (st["scaler"], st["stateful"], st["extra"]), files["state.safetensors"] = S.dedupe_encoded(
                [st["scaler"], st["stateful"], st["extra"]], aux.tensors)
        st["reference"] = None
        if self.reference_batch is not None:
            sink = TensorSink()
            batch, files["reference_batch.safetensors"] = S.dedupe_encoded(
                encode(self.reference_batch, "batch", sink), sink.tensors)
            st["reference"] = {"batch": batch, **(reference or self._reference_value(self.reference_batch))}
        if multi:
            st["world_size"] = self.world_size
            st["rng"] = None  # per rank: rank_state.json
        return st

    def write(self, directory: str) -> Optional["Future[Any]"]:
        """Write the current state's files into ``directory`` (what a commit stages): all of it
        in a 1-rank job; this rank's part in a multi-rank job (with DCP, a collective). With
        ``async_save``, returns the future of the DCP files (the rest is written)."""
        sharded = dcp_state.state_of(self.models, self.optimizers) if self.dcp else None
        jsons: Dict[str, Any] = {}
        if self.multi_rank:
            rep, rs, files = self.rank_state()
            jsons[RANK_STATE_FILE] = rs
            if rep is not None:
                jsons[STATE_FILE] = rep
        else:
            jsons[STATE_FILE], files = self.state()
        for name, tensors in files.items():
            _save_tensors(os.path.join(directory, name), tensors)
        for name, content in jsons.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(dumps(content))
        if sharded is None:
            return None
        if self._async_saver is not None:
            return self._async_saver.save(sharded, directory)
        dcp_state.save(sharded, directory)
        return None

    def load(self, path: str) -> None:
        """Load every registered object's state from checkpoint dir ``path``: the replicated
        state (rank 0's files) and this rank's own (its RNG and data position).

        Another world size than the checkpoint's: the replicated state loads; the data position
        is a global sample index and is mapped to this world size (the loader raises when it
        cannot be mapped exactly); a rank the checkpoint has no files of keeps its RNG streams
        as the program seeded them (a warning says so); sharded optimizer state raises
        :class:`IncompatibleCheckpointError` (it loads only with the world size that wrote it).
        """
        where = f"checkpoint {path}"
        saved_world = checkpoint_world_size(path, self.session.env.resume_world_size)
        name = lambda r, n: rank_file(r, n, saved_world)  # noqa: E731
        sp = os.path.join(path, name(0, STATE_FILE))
        if not os.path.isfile(sp):
            raise IncompatibleCheckpointError(
                f"{where}: no {os.path.basename(sp)} (not written by hpc_ckpt.Checkpointer?)")
        st = loads_file(sp)
        if st.get("format") != FORMAT:
            raise IncompatibleCheckpointError(f"{where}: format {st.get('format')!r}, expected {FORMAT!r}")
        if saved_world != self.world_size:
            log(f"{where} was written by {saved_world} rank(s), this job has {self.world_size}: "
                "replicated state loads as saved, sharded (DCP) state is resharded by DCP, the "
                "data position is mapped by sample index")
        self._check_config(st.get("config"), where)
        for kind, mine in (("model", self.models), ("optimizer", self.optimizers),
                           ("scheduler", self.schedulers)):
            saved = set(st.get(kind, {}))
            if saved != set(mine):
                raise IncompatibleCheckpointError(
                    f"{where}: {kind}s {sorted(saved)} saved, {sorted(mine)} given (names of {kind}=...)")
        own = self._own_rank_state(path, st, saved_world, where)
        self._check_dcp(st, where)
        if self.dcp:  # a collective: every rank loads its shards, resharded by DCP
            dcp_state.load_into(path, self.models, self.optimizers)
        else:
            for n, m in self.models.items():
                S.load_model(m, st["model"][n],
                             _load_tensors(os.path.join(path, name(0, _file("model", n))), where), where)
            for n, o in self.optimizers.items():
                self._load_optimizer(path, n, o, st, own, saved_world, where)
        for n, s in self.schedulers.items():
            S.load_stateful(s, st["scheduler"][n], {}, where)
        aux_path = os.path.join(path, name(0, "state.safetensors"))
        aux = _load_tensors(aux_path, where) if os.path.isfile(aux_path) else {}
        if self.scaler is not None:
            if st.get("scaler") is None:
                raise IncompatibleCheckpointError(f"{where}: no GradScaler state saved")
            S.load_stateful(self.scaler, st["scaler"], aux, where)
        self._load_stateful(path, st, own, saved_world, aux, where)
        S.apply_extra(self.extra, decode(st.get("extra", {}), aux))
        self.step = int(st["step"])
        self.epoch = st.get("epoch")
        self.metrics = decode(st.get("metrics") or {})
        b = st.get("best")
        self.best = {"value": decode(b["value"]), "step": b["step"]} if b and "value" in b else None
        ref = st.get("reference")
        if self.reference_batch is not None and ref is not None:
            batch = decode(ref["batch"], _load_tensors(
                os.path.join(path, name(0, "reference_batch.safetensors")), where))
            self._check_reference(ref, batch, where)
        self.resumed_world_size = saved_world
        self.rank_state_restored = own is not None
        if own is None:
            log(f"{where}: no state of rank {self.rank} (written by {saved_world} rank(s)): its RNG "
                "streams stay as the program seeded them")
            return
        S.load_rng(own["rng"], _load_tensors(own["rng_file"], where), self.rngs, where, log)

    def _check_dcp(self, st: Mapping[str, Any], where: str) -> None:
        """The models and optimizers were saved the way they are saved now (DCP or not)."""
        saved = [st[k][n] == DCP_ENTRY for k in ("model", "optimizer") for n in st.get(k, {})]
        if saved and any(saved) != self.dcp:
            how = lambda d: "through DCP (sharded)" if d else "as safetensors (not sharded)"  # noqa: E731
            raise IncompatibleCheckpointError(
                f"{where}: the models and optimizers were saved {how(any(saved))} and are saved "
                f"{how(self.dcp)} now: shard the model as the run that saved it did (or pass "
                "Checkpointer(dcp=...) to match it)")

    def _own_rank_state(self, path: str, st: Mapping[str, Any], saved_world: int,
                        where: str) -> Optional[Dict[str, Any]]:
        """This rank's saved state {"rng", "stateful", "optimizer", "rng_file"}, or None when the
        checkpoint has none of this rank. A 1-rank checkpoint's is rank 0's, in trainer_state.json."""
        if "world_size" not in st:  # the 1-rank layout: everything in trainer_state.json
            if self.rank != 0:
                return None
            return {"rng": st["rng"], "stateful": st.get("stateful", {}), "optimizer": {},
                    "rng_file": os.path.join(path, RNG_FILE)}
        if self.rank >= saved_world:
            return None
        rp = os.path.join(path, rank_file(self.rank, RANK_STATE_FILE, saved_world))
        if not os.path.isfile(rp):
            raise IncompatibleCheckpointError(f"{where}: {os.path.basename(rp)} is missing (rank {self.rank}'s state)")
        rs = loads_file(rp)
        if rs.get("format") != FORMAT or rs.get("rank") != self.rank:
            raise IncompatibleCheckpointError(
                f"{where}: {os.path.basename(rp)} has format {rs.get('format')!r} and rank {rs.get('rank')!r}, "
                f"expected {FORMAT!r} and {self.rank}")
        return {**rs, "rng_file": os.path.join(path, rank_file(self.rank, RNG_FILE, saved_world))}

    def _load_optimizer(self, path: str, n: str, o: Any, st: Mapping[str, Any],
                        own: Optional[Mapping[str, Any]], saved_world: int, where: str) -> None:
        """A replicated optimizer from rank 0's files; a sharded one from this rank's, only with
        the world size that wrote it."""
        label = f"optimizer {n!r}" if n else "the optimizer"
        saved_sharded = st["optimizer"][n] == {"sharded": True}
        mine_sharded = self.multi_rank and n in self.sharded
        if saved_sharded and saved_world != self.world_size:
            raise IncompatibleCheckpointError(
                f"{where}: {label} is sharded (one shard per rank, written by {saved_world} ranks) and "
                f"this job has {self.world_size}: sharded state loads only with the world size that "
                f"wrote it. Resume with {saved_world} ranks (hpc_ckpt does not reshard optimizer state)")
        if saved_sharded != mine_sharded:
            raise IncompatibleCheckpointError(
                f"{where}: {label} was saved {'sharded' if saved_sharded else 'replicated'} and is "
                f"{'sharded' if mine_sharded else 'replicated'} now (Checkpointer(sharded=...) and "
                "the optimizer type must match the run that saved it)")
        if saved_sharded:
            assert own is not None
            js = own["optimizer"].get(n)
            if js is None:
                raise IncompatibleCheckpointError(f"{where}: rank {self.rank} saved no shard of {label}")
            f = rank_file(self.rank, _file("optimizer", n), saved_world)
        else:
            js, f = st["optimizer"][n], rank_file(0, _file("optimizer", n), saved_world)
        S.load_stateful(_optimizer_target(o), js, _load_tensors(os.path.join(path, f), where), where)
        _after_optimizer_load(o)

    def _load_stateful(self, path: str, st: Mapping[str, Any], own: Optional[Mapping[str, Any]],
                       saved_world: int, aux: Mapping[str, Any], where: str) -> None:
        """Replicated stateful objects from rank 0's state; per-rank ones (the loader) from this
        rank's, else from rank 0's (the data position is global: every rank is at the same one)."""
        saved = dict(st.get("stateful", {}))
        per_rank: Mapping[str, Any] = own["stateful"] if own is not None else {}
        if own is None and "world_size" in st:  # a rank the checkpoint lacks: rank 0's position
            r0 = loads_file(os.path.join(path, rank_file(0, RANK_STATE_FILE, saved_world)))
            per_rank = r0.get("stateful", {})
        elif own is None:
            per_rank = saved
        saved.update({k: v for k, v in per_rank.items() if k in PER_RANK_STATEFUL})
        missing = sorted(set(self.stateful) - set(saved))
        if missing:
            raise IncompatibleCheckpointError(f"{where}: no state for {missing} in the checkpoint")
        for n, o in self.stateful.items():
            S.load_stateful(o, saved[n], aux, where)
    def _check_config(self, saved: Any, where: str) -> None:
        if self.config is None:
            return
        now = decode(encode(self.config, "config", None))
        saved = decode(saved) if saved is not None else {}
        changed = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                   if saved.get(k) != now.get(k) and k not in self.mutable_config}
        if changed:
            if not self.allow_config_change:
                raise ConfigMismatchError(where, changed)
            log(f"WARNING: {where} was made with another config: {changed} (allowed)")

    # ------------------------------------------------------------------ reference batch
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        torch = torch_module()
        flags: List[Tuple[Any, bool]] = [(m, m.training) for model in self.models.values()
                                         for m in model.modules()]
        devices: List[int] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices = list(range(torch.cuda.device_count()))
        try:
            for model in self.models.values():
                model.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                yield
        finally:
            for m, f in flags:
                m.training = f

    def _reference_value(self, batch: Any) -> Dict[str, Any]:
        assert self.reference_loss is not None
        with self._eval_mode():
            loss = self.reference_loss(batch)
        dev = str(loss.device) if is_tensor(loss) else "cpu"
        v = float(loss.detach().cpu().double().item()) if is_tensor(loss) else float(loss)
        return {"loss": encode(v, "loss", None), "loss_bits": _bits(v).hex(), "device": dev}

    def _check_reference(self, ref: Mapping[str, Any], batch: Any, where: str) -> None:
        now = self._reference_value(batch)
        if now["loss_bits"] == ref["loss_bits"]:
            return
        a, b = decode(ref["loss"]), decode(now["loss"])
        if ref.get("device", "cpu") != "cpu" or now["device"] != "cpu":
            if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
                return  # accelerator kernels need not be bit-reproducible
        raise ReferenceMismatchError(
            f"{where}: the reference batch's loss is {b!r} after the load, {a!r} when saved "
            f"(device {now['device']}): the restored model does not compute what was saved")
