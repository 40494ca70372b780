"""State <-> (JSON, tensors): the one serializer of hpc_ckpt. Never pickle.

``encode`` turns nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays)
into strict JSON, moving tensors into a :class:`TensorSink` (written as safetensors) and leaving
``{"$tensor": name}`` in their place. What plain JSON cannot say exactly is tagged:

  ``{"$tuple": [...]}``            a tuple (optimizer betas must come back as tuples)
  ``{"$float": "nan"|"inf"|"-inf"}`` a non-finite float
  ``{"$dict": [[k, v], ...]}``     a dict whose keys are not all strings, or start with ``$``
  ``{"$ndarray": {...}}``          a numpy array (dtype, shape, flat data)
  ``{"$dtype": "float32"}``        a torch dtype
  ``{"$bytes": "hex"}``            bytes

Anything else (functions, arbitrary objects) raises :class:`NotSerializableError` naming the key.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable, Dict, Mapping, Optional

from .errors import NotSerializableError

_TAGS = ("$tensor", "$tuple", "$float", "$dict", "$ndarray", "$dtype", "$bytes")


def torch_module() -> Any:
    """torch if it is importable (imported lazily: hpc_ckpt itself does not need it)."""
    import torch  # noqa: PLC0415

    return torch


def is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class TensorSink:
    """Tensors collected while encoding, by unique name (``strip``: a key prefix to drop)."""

    def __init__(self, strip: str = "") -> None:
        self.tensors: Dict[str, Any] = {}
        self.strip = strip + "." if strip else ""

    def add(self, name: str, t: Any) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip):]
        base, n = name or "tensor", 1
        while name in self.tensors or not name:
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = t.detach()
        return name


def _join(key: str, part: Any) -> str:
    return f"{key}.{part}" if key else str(part)


def encode(obj: Any, key: str, sink: Optional[TensorSink], hint: str = "") -> Any:
    """``obj`` as strict JSON; tensors go to ``sink`` (None: a tensor is an error)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if is_tensor(obj):
        if sink is None:
            raise NotSerializableError(key, obj, hint or "tensors are not allowed here")
        return {"$tensor": sink.add(key, obj)}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v, _join(key, k), sink, hint) for k, v in obj.items()}
        return {"$dict": [[encode(k, _join(key, "<key>"), None, hint), encode(v, _join(key, k), sink, hint)]
                          for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, f"{key}[{i}]", sink, hint) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{key}[{i}]", sink, hint) for i, v in enumerate(obj)]
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": bytes(obj).hex()}
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biuf":
                raise NotSerializableError(key, obj, f"numpy dtype {obj.dtype} is not supported")
            data = [encode(v, key, None) for v in obj.ravel().tolist()]
            return {"$ndarray": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": data}}
        if isinstance(obj, np.generic):
            return encode(obj.item(), key, sink, hint)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).replace("torch.", "")}
    raise NotSerializableError(key, obj, hint)


def decode(obj: Any, tensors: Optional[Mapping[str, Any]] = None) -> Any:
    """The inverse of :func:`encode`; ``tensors`` maps the sink's names to loaded tensors."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "$tensor":
            if tensors is None or val not in tensors:
                raise KeyError(f"tensor {val!r} is missing from the checkpoint")
            return tensors[val]
        if tag == "$tuple":
            return tuple(decode(v, tensors) for v in val)
        if tag == "$float":
            return float(val)
        if tag == "$dict":
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in val}
        if tag == "$ndarray":
            import numpy as np  # noqa: PLC0415

            data = [decode(v) for v in val["data"]]
            return np.array(data, dtype=np.dtype(val["dtype"])).reshape(val["shape"])
        if tag == "$dtype":
            return getattr(torch_module(), val)
        if tag == "$bytes":
            return bytes.fromhex(val)
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def dumps(obj: Any) -> str:
    """Strict, stable JSON (sorted keys, no NaN): byte-identical for identical state."""
    return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def loads_file(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def jsonable_metrics(metrics: Optional[Mapping[str, Any]],
                     warn: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Metrics a commit request can carry: finite numbers by string key (others are dropped)."""
    out: Dict[str, float] = {}
    for k, v in (metrics or {}).items():
        try:
            if is_tensor(v):
                v = v.detach().cpu().item()
            f = float(v)
        except (TypeError, ValueError):
            if warn:
                warn(f"metric {k!r} = {v!r} is not a number: not sent with the commit request")
            continue
        if isinstance(v, bool) or not math.isfinite(f):
            continue
        out[str(k)] = f
    return out
