"""Complete PyTorch training state as safetensors + JSON (no pickle), and back.

Each ``*_state`` function returns ``(json_part, tensors)``; each ``load_*`` takes them back.
torch is imported lazily.
"""

from __future__ import annotations

import random
import sys

import numpy as np
from typing import Any, Dict, List, Mapping, MutableMapping, Tuple

from ._codec import TensorSink, decode, encode, torch_module
from .errors import IncompatibleCheckpointError, NotSerializableError

Tensors = Dict[str, Any]


def _own(t: Any) -> Any:
    """A detached, contiguous tensor safetensors can write (it may still share storage)."""
    return t.detach().contiguous()


def _storage_key(t: Any) -> Tuple[Any, ...]:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - e.g. meta / sparse tensors
        return ("id", id(t))
    return (t.device.type, t.device.index, ptr)


def dedupe_tensors(tensors: Mapping[str, Any]) -> Tuple[Tensors, Dict[str, str]]:
    """Tensors without shared storage (safetensors refuses it) + aliases {name: saved name}.

    Identical views (tied weights: the same storage, offset, shape, stride, dtype) are saved once
    and listed as aliases; other tensors sharing a storage (slices of one buffer) are copied.
    """
    out: Tensors = {}
    aliases: Dict[str, str] = {}
    by_storage: Dict[Tuple[Any, ...], List[str]] = {}
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.numel() == 0:
            out[name] = t.contiguous()
            continue
        key = _storage_key(t)
        twin = None
        for other in by_storage.get(key, []):
            o = tensors[other]
            if (o.storage_offset(), tuple(o.shape), o.stride(), o.dtype) == \
                    (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype):
                twin = other
                break
        if twin is not None:
            aliases[name] = aliases.get(twin, twin)
            continue
        shared = key in by_storage
        by_storage.setdefault(key, []).append(name)
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    # A contiguous tensor that is a view of a larger storage: safetensors writes only its bytes,
    # but refuses two names on one storage, which the loop above has ruled out.
    return out, aliases


# ----------------------------------------------------------------------------- model

def model_state(model: Any) -> Tuple[Dict[str, Any], Tensors]:
    """Every parameter and (persistent) buffer; tied tensors once, with their aliases."""
    sd = model.state_dict()
    bad = [k for k, v in sd.items() if not _is_torch_tensor(v)]
    if bad:
        raise NotSerializableError(f"model.state_dict()[{bad[0]!r}]", sd[bad[0]],
                                   "extra_state that is not a tensor; keep such state in extra=")
    tensors, aliases = dedupe_tensors(sd)
    return {"aliases": aliases, "keys": len(sd)}, tensors


def load_model(model: Any, meta: Mapping[str, Any], tensors: Tensors, where: str) -> None:
    sd = dict(tensors)
    for alias, src in meta.get("aliases", {}).items():
        sd[alias] = sd[src]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise IncompatibleCheckpointError(f"{where}: the model does not match the checkpoint: {e}") from e


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# ----------------------------------------------------------------------------- optimizer etc.

def stateful_state(obj: Any, name: str) -> Tuple[Any, Tensors]:
    """``obj.state_dict()`` (optimizer, scheduler, scaler, loader, ...) as JSON + tensors."""
    sink = TensorSink(strip=name)  # tensor names as in the state dict: state.0.exp_avg
    js = encode(obj.state_dict(), name, sink,
                hint=f"{type(obj).__name__}.state_dict() must hold only tensors and JSON-able values")
    return dedupe_encoded(js, sink.tensors)


def dedupe_encoded(js: Any, tensors: Mapping[str, Any]) -> Tuple[Any, Tensors]:
    """``js`` (encoded into a sink holding ``tensors``) and the tensors to save, each once.

    A tensor under several names (``(x, x)``, identical views of one storage) is saved once and
    every ``{"$tensor": name}`` of it points at that copy, so decoding ties them again (one tensor
    object), as :func:`load_model` ties a model's aliases. ``js`` may be a list of such parts.
    """
    out, aliases = dedupe_tensors(tensors)
    return (_realias(js, aliases) if aliases else js), out


def _realias(js: Any, aliases: Mapping[str, str]) -> Any:
    if isinstance(js, list):
        return [_realias(v, aliases) for v in js]
    if isinstance(js, dict):
        if set(js) == {"$tensor"} and js["$tensor"] in aliases:
            return {"$tensor": aliases[js["$tensor"]]}
        return {k: _realias(v, aliases) for k, v in js.items()}
    return js


def load_stateful(obj: Any, js: Any, tensors: Tensors, where: str) -> None:
    state = decode(js, tensors)
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise IncompatibleCheckpointError(
            f"{where}: {type(obj).__name__}.load_state_dict failed: {e}") from e


def scheduler_state(sched: Any, name: str) -> Any:
    """A scheduler's state as JSON (tensors are refused: a scheduler's state is hyper-parameters)."""
    return encode(sched.state_dict(), name, None,
                  hint="scheduler state must be JSON-able; a lambda's closure state cannot be saved"
                       " (LambdaLR saves None for plain functions and rebuilds them from your code)")


# ----------------------------------------------------------------------------- RNG

def rng_state(rngs: Mapping[str, Any], cuda: bool) -> Tuple[Dict[str, Any], Tensors]:
    """Python ``random``, numpy's legacy global state, torch CPU (+ CUDA), and ``rngs``.

    The big states go to tensors (``python``: the 625 words of Mersenne Twister, ``numpy.key``:
    numpy's 624), the rest to JSON.
    """
    torch = torch_module()
    version, words, gauss = random.getstate()
    js: Dict[str, Any] = {"python": {"version": version, "gauss_next": encode(gauss, "gauss", None)}}
    tensors: Tensors = {"python": torch.tensor(words, dtype=torch.int64)}
    name, key, pos, has_gauss, cached = np.random.get_state()
    js["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached_gaussian": encode(float(cached), "numpy", None)}
    tensors["numpy.key"] = torch.from_numpy(key.astype(np.int64))
    tensors["torch.cpu"] = torch.get_rng_state()
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        js["cuda_devices"] = len(states)
        for i, st in enumerate(states):
            tensors[f"torch.cuda.{i}"] = st.cpu()
    user: Dict[str, Any] = {}
    for name, g in rngs.items():
        kind, state = _rng_get(g, name)
        if kind == "torch":
            tensors[f"user.{name}"] = state
            user[name] = {"kind": kind}
        elif kind == "python":
            tensors[f"user.{name}"] = torch.tensor(state[1], dtype=torch.int64)
            user[name] = {"kind": kind, "version": state[0], "gauss_next": encode(state[2], name, None)}
        elif kind == "numpy_randomstate":
            tensors[f"user.{name}"] = torch.from_numpy(state[1].astype(np.int64))
            user[name] = {"kind": kind, "name": state[0], "pos": int(state[2]), "has_gauss": int(state[3]),
                          "cached_gaussian": encode(float(state[4]), name, None)}
        else:
            user[name] = {"kind": kind, "state": encode(state, f"rngs.{name}", None)}
    js["user"] = user
    return js, tensors


def _rng_get(g: Any, name: str) -> Tuple[str, Any]:
    torch = sys.modules.get("torch")
    if isinstance(g, random.Random):
        return "python", g.getstate()
    if isinstance(g, np.random.Generator):
        return "numpy_generator", g.bit_generator.state
    if isinstance(g, np.random.RandomState):
        return "numpy_randomstate", g.get_state()
    if torch is not None and isinstance(g, torch.Generator):
        return "torch", g.get_state()
    raise NotSerializableError(f"rngs[{name!r}]", g, "supported: random.Random, numpy Generator / "
                                                     "RandomState, torch.Generator")


def _mt_words(t: Any) -> Tuple[int, ...]:
    return tuple(int(x) for x in t.tolist())


def load_rng(js: Mapping[str, Any], tensors: Tensors, rngs: Mapping[str, Any], where: str,
             warn: Any) -> None:
    torch = torch_module()
    py = js["python"]
    random.setstate((py["version"], _mt_words(tensors["python"]), decode(py["gauss_next"])))
    n = js["numpy"]
    np.random.set_state((n["name"], tensors["numpy.key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], decode(n["cached_gaussian"])))
    torch.set_rng_state(tensors["torch.cpu"])
    ndev = js.get("cuda_devices", 0)
    if ndev:
        if not torch.cuda.is_available():
            warn(f"{where}: the checkpoint has CUDA RNG states but CUDA is not available here")
        else:
            have = torch.cuda.device_count()
            if have != ndev:
                warn(f"{where}: CUDA RNG states of {ndev} devices, {have} here: restoring {min(ndev, have)}")
            for i in range(min(ndev, have)):
                torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"], i)
    saved = js.get("user", {})
    missing = sorted(set(rngs) - set(saved))
    if missing:
        raise IncompatibleCheckpointError(f"{where}: no state for rngs {missing} in the checkpoint")
    for name, g in rngs.items():
        ent = saved[name]
        kind, _ = _rng_get(g, name)
        if kind != ent["kind"]:
            raise IncompatibleCheckpointError(f"{where}: rngs[{name!r}] is a {kind}, the checkpoint has a {ent['kind']}")
        t: Any = tensors.get(f"user.{name}")
        if t is None and kind != "numpy_generator":
            raise IncompatibleCheckpointError(f"{where}: rng.safetensors has no state for rngs[{name!r}]")
        if kind == "torch":
            g.set_state(t)
        elif kind == "python":
            g.setstate((ent["version"], _mt_words(t), decode(ent["gauss_next"])))
        elif kind == "numpy_randomstate":
            g.set_state((ent["name"], t.numpy().astype(np.uint32), ent["pos"], ent["has_gauss"],
                         decode(ent["cached_gaussian"])))
        else:
            g.bit_generator.state = decode(ent["state"])


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, numpy's global state and torch (CPU and every CUDA device).

    Call it first thing: the global generators a checkpoint captures then start from known
    states, so a resumed run's checkpoints can be byte-identical to an uninterrupted run's.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)  # seeds every CUDA device too


def versions() -> Dict[str, str]:
    from . import __version__  # noqa: PLC0415

    out = {"hpc_ckpt": __version__, "python": sys.version.split()[0]}
    for mod in ("torch", "numpy", "safetensors"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


def apply_extra(target: MutableMapping[str, Any], saved: Mapping[str, Any]) -> None:
    target.clear()
    target.update(saved)
