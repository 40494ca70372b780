"""The state capture of :class:`hpc_ckpt.Checkpointer`: its registered objects' state to files
and back, for one rank or for each rank of a multi-rank job.

A checkpoint's files (all plain names, no pickle): ``model.safetensors``,
``optimizer.safetensors``, ``rng.safetensors``, ``trainer_state.json`` (counters, scheduler,
scaler, data position, RNG of Python and numpy, best metric, metrics, config, extras, versions;
no timestamps, so identical states give identical bytes), ``state.safetensors`` when extras or
stateful objects hold tensors, ``reference_batch.safetensors`` with a reference batch. In a
multi-rank job rank 0 alone writes the replicated state and every rank its own
(``rank_state.json``, ``rng.safetensors``: RNG streams, data position, optimizer shards); models
and optimizers of sharded models go through torch.distributed.checkpoint (:mod:`.sharded`).

Each function takes the :class:`~hpc_ckpt.Checkpointer` whose objects it saves or restores:
:func:`state` / :func:`rank_state` capture, :func:`write` writes what a commit stages,
:func:`load` restores (checking the checkpoint fits: format, names, config, world size,
DCP or not, the reference batch's loss). Guarantees: the RNG streams are captured last and
restored last, and nothing in between consumes randomness (the reference loss runs in
``fork_rng``).
"""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from . import sharded as dcp_state
from . import state as S
from ._codec import TensorSink, decode, dumps, encode, is_tensor, loads_file, torch_module
from .errors import ConfigMismatchError, IncompatibleCheckpointError, ReferenceMismatchError
from .protocol import log
from .ranks import checkpoint_world_size, rank_file

if TYPE_CHECKING:
    from .checkpointer import Checkpointer

FORMAT = "hpc-ckpt-python/1"
STATE_FILE = "trainer_state.json"
RANK_STATE_FILE = "rank_state.json"
RNG_FILE = "rng.safetensors"
# trainer_state.json's entry of a model or optimizer whose state is in the checkpoint's DCP files.
DCP_ENTRY = {"dcp": True}
# ``stateful`` entries that are per rank (the rest is replicated): the data position.
PER_RANK_STATEFUL = ("loader",)


def is_zero(opt: Any) -> bool:
    """Is ``opt`` a ``torch.distributed.optim.ZeroRedundancyOptimizer`` (its state is sharded)?"""
    return type(opt).__name__ == "ZeroRedundancyOptimizer" and hasattr(opt, "optim")


def _optimizer_target(opt: Any) -> Any:
    """The object whose ``state_dict`` is this rank's optimizer state: a ZeRO optimizer's local
    optimizer (its shard; ZeRO's own ``state_dict`` needs a consolidation), else ``opt``."""
    return opt.optim if is_zero(opt) else opt


def _after_optimizer_load(opt: Any) -> None:
    """ZeRO keeps hyper-parameters (lr, ...) in its own param_groups too: copy the loaded ones."""
    if is_zero(opt):
        for mine, loaded in zip(opt.param_groups, opt.optim.param_groups):
            for k, v in loaded.items():
                if k != "params":
                    mine[k] = v


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


def state(ck: "Checkpointer") -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """(trainer_state.json content, {file name: tensors}) of the current state, as a 1-rank
    job saves it (everything in one place)."""
    files: Dict[str, Dict[str, Any]] = {}
    st = _replicated_state(ck, files, multi=False)
    # RNG last, and nothing above may consume randomness (the reference runs in fork_rng).
    st["rng"], files[RNG_FILE] = S.rng_state(ck.rngs, cuda=True)
    return st, files


def rank_state(ck: "Checkpointer") -> Tuple[Optional[Dict[str, Any]], Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """What this rank of a multi-rank job stages: (trainer_state.json content on rank 0,
    else None; rank_state.json content; {file name: tensors}). Rank 0 adds the replicated
    state; every rank its RNG streams, data position and optimizer shards."""
    files: Dict[str, Dict[str, Any]] = {}
    # A sharded model's forward is a collective: every rank computes the reference loss.
    ref = _reference_value(ck, ck.reference_batch) \
        if ck.dcp and ck.reference_batch is not None else None
    rep = _replicated_state(ck, files, multi=True, reference=ref) if ck.rank == 0 else None
    rs: Dict[str, Any] = {"format": FORMAT, "rank": ck.rank, "world_size": ck.world_size,
                          "step": ck.step, "optimizer": {}}
    for name in sorted(ck.sharded):
        js, t = S.stateful_state(_optimizer_target(ck.optimizers[name]),
                                 "optimizer" + (f"-{name}" if name else ""))
        rs["optimizer"][name] = js
        files[_file("optimizer", name)] = t
    rs["stateful"] = {n: encode(o.state_dict(), f"stateful.{n}", None,
                                f"{type(o).__name__}.state_dict() must be JSON-able (per-rank state)")
                      for n, o in ck.stateful.items() if n in PER_RANK_STATEFUL}
    rs["rng"], files[RNG_FILE] = S.rng_state(ck.rngs, cuda=True)
    return rep, rs, files


def _replicated_state(ck: "Checkpointer", files: Dict[str, Dict[str, Any]], multi: bool,
                      reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything but the RNG streams (trainer_state.json), its tensors added to ``files``.
    ``multi``: a multi-rank job's rank 0 (sharded optimizers and per-rank stateful objects
    are left to each rank's rank_state.json). Models and optimizers saved through DCP are
    only marked here (``{"dcp": true}``). ``reference``: the reference loss, when every rank
    computed it."""
    st: Dict[str, Any] = {"format": FORMAT, "versions": S.versions(), "step": ck.step,
                          "epoch": ck.epoch}
    st["metrics"] = encode(ck.metrics, "metrics", None, "metrics must be numbers or JSON values")
    st["best"] = None if ck.monitor is None else {"monitor": ck.monitor, "mode": ck.mode,
                                                     **(encode(ck.best, "best", None) or {})}
    st["config"] = None if ck.config is None else encode(ck.config, "config", None)
    st["model"] = {}
    for name, m in ck.models.items():
        if ck.dcp:
            st["model"][name] = dict(DCP_ENTRY)
            continue
        st["model"][name], files[_file("model", name)] = S.model_state(m)
    st["optimizer"] = {}
    for name, o in ck.optimizers.items():
        if ck.dcp:
            st["optimizer"][name] = dict(DCP_ENTRY)
            continue
        if multi and name in ck.sharded:
            st["optimizer"][name] = {"sharded": True}
            continue
        js, t = S.stateful_state(_optimizer_target(o), "optimizer" + (f"-{name}" if name else ""))
        st["optimizer"][name] = js
        files[_file("optimizer", name)] = t
    st["scheduler"] = {n: S.scheduler_state(s, f"scheduler{'.' + n if n else ''}")
                       for n, s in ck.schedulers.items()}
    aux = TensorSink()
    st["scaler"] = None if ck.scaler is None else encode(ck.scaler.state_dict(), "scaler", aux)
    st["stateful"] = {n: encode(o.state_dict(), f"stateful.{n}", aux,
                                f"{type(o).__name__}.state_dict() must be JSON-able or tensors")
                      for n, o in ck.stateful.items() if not (multi and n in PER_RANK_STATEFUL)}
    st["extra"] = encode(dict(ck.extra), "extra", aux, "extra must be JSON-able or tensors")
    if aux.tensors:  # one tensor in several places (also across parts): saved once, re-tied on load
        (st["scaler"], st["stateful"], st["extra"]), files["state.safetensors"] = S.dedupe_encoded(
            [st["scaler"], st["stateful"], st["extra"]], aux.tensors)
    st["reference"] = None
    if ck.reference_batch is not None:
        sink = TensorSink()
        batch, files["reference_batch.safetensors"] = S.dedupe_encoded(
            encode(ck.reference_batch, "batch", sink), sink.tensors)
        st["reference"] = {"batch": batch, **(reference or _reference_value(ck, ck.reference_batch))}
    if multi:
        st["world_size"] = ck.world_size
        st["rng"] = None  # per rank: rank_state.json
    return st


def write(ck: "Checkpointer", directory: str) -> Optional["Future[Any]"]:
    """Write the current state's files into ``directory`` (what a commit stages): all of it
    in a 1-rank job; this rank's part in a multi-rank job (with DCP, a collective). With
    ``async_save``, returns the future of the DCP files (the rest is written)."""
    sharded = dcp_state.state_of(ck.models, ck.optimizers) if ck.dcp else None
    jsons: Dict[str, Any] = {}
    if ck.multi_rank:
        rep, rs, files = rank_state(ck)
        jsons[RANK_STATE_FILE] = rs
        if rep is not None:
            jsons[STATE_FILE] = rep
    else:
        jsons[STATE_FILE], files = state(ck)
    for name, tensors in files.items():
        _save_tensors(os.path.join(directory, name), tensors)
    for name, content in jsons.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(dumps(content))
    if sharded is None:
        return None
    if ck._async_saver is not None:
        return ck._async_saver.save(sharded, directory)
    dcp_state.save(sharded, directory)
    return None


def load(ck: "Checkpointer", path: str) -> None:
    """Load every registered object's state from checkpoint dir ``path``: the replicated
    state (rank 0's files) and this rank's own (its RNG and data position).

    Another world size than the checkpoint's: the replicated state loads; the data position
    is a global sample index and is mapped to this world size (the loader raises when it
    cannot be mapped exactly); a rank the checkpoint has no files of keeps its RNG streams
    as the program seeded them (a warning says so); sharded optimizer state raises
    :class:`IncompatibleCheckpointError` (it loads only with the world size that wrote it).
    """
    where = f"checkpoint {path}"
    saved_world = checkpoint_world_size(path, ck.session.env.resume_world_size)
    name = lambda r, n: rank_file(r, n, saved_world)  # noqa: E731
    sp = os.path.join(path, name(0, STATE_FILE))
    if not os.path.isfile(sp):
        raise IncompatibleCheckpointError(
            f"{where}: no {os.path.basename(sp)} (not written by hpc_ckpt.Checkpointer?)")
    st = loads_file(sp)
    if st.get("format") != FORMAT:
        raise IncompatibleCheckpointError(f"{where}: format {st.get('format')!r}, expected {FORMAT!r}")
    if saved_world != ck.world_size:
        log(f"{where} was written by {saved_world} rank(s), this job has {ck.world_size}: "
            "replicated state loads as saved, sharded (DCP) state is resharded by DCP, the "
            "data position is mapped by sample index")
    _check_config(ck, st.get("config"), where)
    for kind, mine in (("model", ck.models), ("optimizer", ck.optimizers),
                       ("scheduler", ck.schedulers)):
        saved = set(st.get(kind, {}))
        if saved != set(mine):
            raise IncompatibleCheckpointError(
                f"{where}: {kind}s {sorted(saved)} saved, {sorted(mine)} given (names of {kind}=...)")
    own = _own_rank_state(ck, path, st, saved_world, where)
    check_dcp(ck, st, where)
    if ck.dcp:  # a collective: every rank loads its shards, resharded by DCP
        dcp_state.load_into(path, ck.models, ck.optimizers)
    else:
        for n, m in ck.models.items():
            S.load_model(m, st["model"][n],
                         _load_tensors(os.path.join(path, name(0, _file("model", n))), where), where)
        for n, o in ck.optimizers.items():
            _load_optimizer(ck, path, n, o, st, own, saved_world, where)
    for n, s in ck.schedulers.items():
        S.load_stateful(s, st["scheduler"][n], {}, where)
    aux_path = os.path.join(path, name(0, "state.safetensors"))
    aux = _load_tensors(aux_path, where) if os.path.isfile(aux_path) else {}
    if ck.scaler is not None:
        if st.get("scaler") is None:
            raise IncompatibleCheckpointError(f"{where}: no GradScaler state saved")
        S.load_stateful(ck.scaler, st["scaler"], aux, where)
    _load_stateful(ck, path, st, own, saved_world, aux, where)
    S.apply_extra(ck.extra, decode(st.get("extra", {}), aux))
    ck.step = int(st["step"])
    ck.epoch = st.get("epoch")
    ck.metrics = decode(st.get("metrics") or {})
    b = st.get("best")
    ck.best = {"value": decode(b["value"]), "step": b["step"]} if b and "value" in b else None
    ref = st.get("reference")
    if ck.reference_batch is not None and ref is not None:
        batch = decode(ref["batch"], _load_tensors(
            os.path.join(path, name(0, "reference_batch.safetensors")), where))
        _check_reference(ck, ref, batch, where)
    ck.resumed_world_size = saved_world
    ck.rank_state_restored = own is not None
    if own is None:
        log(f"{where}: no state of rank {ck.rank} (written by {saved_world} rank(s)): its RNG "
            "streams stay as the program seeded them")
        return
    S.load_rng(own["rng"], _load_tensors(own["rng_file"], where), ck.rngs, where, log)


def check_dcp(ck: "Checkpointer", st: Mapping[str, Any], where: str) -> None:
    """The models and optimizers were saved the way they are saved now (DCP or not)."""
    saved = [st[k][n] == DCP_ENTRY for k in ("model", "optimizer") for n in st.get(k, {})]
    if saved and any(saved) != ck.dcp:
        how = lambda d: "through DCP (sharded)" if d else "as safetensors (not sharded)"  # noqa: E731
        raise IncompatibleCheckpointError(
            f"{where}: the models and optimizers were saved {how(any(saved))} and are saved "
            f"{how(ck.dcp)} now: shard the model as the run that saved it did (or pass "
            "Checkpointer(dcp=...) to match it)")


def _own_rank_state(ck: "Checkpointer", path: str, st: Mapping[str, Any], saved_world: int,
                    where: str) -> Optional[Dict[str, Any]]:
    """This rank's saved state {"rng", "stateful", "optimizer", "rng_file"}, or None when the
    checkpoint has none of this rank. A 1-rank checkpoint's is rank 0's, in trainer_state.json."""
    if "world_size" not in st:  # the 1-rank layout: everything in trainer_state.json
        if ck.rank != 0:
            return None
        return {"rng": st["rng"], "stateful": st.get("stateful", {}), "optimizer": {},
                "rng_file": os.path.join(path, RNG_FILE)}
    if ck.rank >= saved_world:
        return None
    rp = os.path.join(path, rank_file(ck.rank, RANK_STATE_FILE, saved_world))
    if not os.path.isfile(rp):
        raise IncompatibleCheckpointError(f"{where}: {os.path.basename(rp)} is missing (rank {ck.rank}'s state)")
    rs = loads_file(rp)
    if rs.get("format") != FORMAT or rs.get("rank") != ck.rank:
        raise IncompatibleCheckpointError(
            f"{where}: {os.path.basename(rp)} has format {rs.get('format')!r} and rank {rs.get('rank')!r}, "
            f"expected {FORMAT!r} and {ck.rank}")
    return {**rs, "rng_file": os.path.join(path, rank_file(ck.rank, RNG_FILE, saved_world))}


def _load_optimizer(ck: "Checkpointer", path: str, n: str, o: Any, st: Mapping[str, Any],
                    own: Optional[Mapping[str, Any]], saved_world: int, where: str) -> None:
    """A replicated optimizer from rank 0's files; a sharded one from this rank's, only with
    the world size that wrote it."""
    label = f"optimizer {n!r}" if n else "the optimizer"
    saved_sharded = st["optimizer"][n] == {"sharded": True}
    mine_sharded = ck.multi_rank and n in ck.sharded
    if saved_sharded and saved_world != ck.world_size:
        raise IncompatibleCheckpointError(
            f"{where}: {label} is sharded (one shard per rank, written by {saved_world} ranks) and "
            f"this job has {ck.world_size}: sharded state loads only with the world size that "
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
            raise IncompatibleCheckpointError(f"{where}: rank {ck.rank} saved no shard of {label}")
        f = rank_file(ck.rank, _file("optimizer", n), saved_world)
    else:
        js, f = st["optimizer"][n], rank_file(0, _file("optimizer", n), saved_world)
    S.load_stateful(_optimizer_target(o), js, _load_tensors(os.path.join(path, f), where), where)
    _after_optimizer_load(o)


def _load_stateful(ck: "Checkpointer", path: str, st: Mapping[str, Any], own: Optional[Mapping[str, Any]],
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
    missing = sorted(set(ck.stateful) - set(saved))
    if missing:
        raise IncompatibleCheckpointError(f"{where}: no state for {missing} in the checkpoint")
    for n, o in ck.stateful.items():
        S.load_stateful(o, saved[n], aux, where)


def _check_config(ck: "Checkpointer", saved: Any, where: str) -> None:
    if ck.config is None:
        return
    now = decode(encode(ck.config, "config", None))
    saved = decode(saved) if saved is not None else {}
    changed = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
               if saved.get(k) != now.get(k) and k not in ck.mutable_config}
    if changed:
        if not ck.allow_config_change:
            raise ConfigMismatchError(where, changed)
        log(f"WARNING: {where} was made with another config: {changed} (allowed)")


@contextmanager
def _eval_mode(ck: "Checkpointer") -> Iterator[None]:
    torch = torch_module()
    flags: List[Tuple[Any, bool]] = [(m, m.training) for model in ck.models.values()
                                     for m in model.modules()]
    devices: List[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    try:
        for model in ck.models.values():
            model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, f in flags:
            m.training = f


def _reference_value(ck: "Checkpointer", batch: Any) -> Dict[str, Any]:
    assert ck.reference_loss is not None
    with _eval_mode(ck):
        loss = ck.reference_loss(batch)
    dev = str(loss.device) if is_tensor(loss) else "cpu"
    v = float(loss.detach().cpu().double().item()) if is_tensor(loss) else float(loss)
    return {"loss": encode(v, "loss", None), "loss_bits": _bits(v).hex(), "device": dev}


def _check_reference(ck: "Checkpointer", ref: Mapping[str, Any], batch: Any, where: str) -> None:
    now = _reference_value(ck, batch)
    if now["loss_bits"] == ref["loss_bits"]:
        return
    a, b = decode(ref["loss"]), decode(now["loss"])
    if ref.get("device", "cpu") != "cpu" or now["device"] != "cpu":
        if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
            return  # accelerator kernels need not be bit-reproducible
    raise ReferenceMismatchError(
        f"{where}: the reference batch's loss is {b!r} after the load, {a!r} when saved "
        f"(device {now['device']}): the restored model does not compute what was saved")
