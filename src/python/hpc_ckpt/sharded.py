"""Sharded model and optimizer state (FSDP2, DTensor, tensor parallel) through
torch.distributed.checkpoint (DCP): DCP's state-dict API, planner, metadata and files, no
resharder of ours.

What :class:`hpc_ckpt.Checkpointer` does with a model whose parameters are DTensors (or an FSDP1
module): every rank takes its shards with ``get_model_state_dict`` / ``get_optimizer_state_dict``
and writes them with ``dcp.save`` into its own staging dir; DCP's files (``__<rank>_<n>.distcp``
from every rank, ``.metadata`` from the coordinator) keep their names in the one committed
checkpoint, so the checkpoint directory *is* a DCP checkpoint:

    dcp.load(state_dict, checkpoint_id="runs/job/checkpoints/step-000000000040")   # plain DCP
    hpc_ckpt.sharded.load(state_dict, "runs/job/checkpoints/step-000000000040")    # no pickle

Guarantees:
- the bytes are a function of the state: the metadata records no path and no random save id
  (:class:`Writer`), so the same state saved twice gives identical files;
- loading runs no code from the checkpoint (:func:`load`): ``.metadata`` is unpickled with an
  allow-list of DCP's own metadata classes (:class:`SafeReader`), and non-tensor entries (an
  optimizer's hyper-parameters) with ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`);
  plain ``dcp.load`` uses ``pickle.load`` and ``torch.load(weights_only=False)`` for both;
- another world size than the one that saved: DCP reshards (its planner maps the saved chunks
  onto this rank's shards), so the loaded full tensors equal the saved ones;
- asynchronous saves (:class:`AsyncSaver`) copy the state before they return and write it on a
  process group of their own, so training's collectives never interleave with the save's.
"""

from __future__ import annotations

import io
import pickle
import warnings
from concurrent.futures import Future
from typing import Any, Dict, Mapping, Optional

from ._codec import torch_module
from .errors import IncompatibleCheckpointError

# Top-level keys of the state dict DCP saves: {"model": {name: sd}, "optimizer": {name: sd}}.
MODEL, OPTIMIZER = "model", "optimizer"
UNNAMED = "_"  # the key of a single unnamed model or optimizer (DCP joins keys with ".")


def _dcp() -> Any:
    torch_module()
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    return dcp


def is_sharded_module(module: Any) -> bool:
    """Does ``module`` hold state that only DCP saves whole: DTensor parameters or buffers
    (FSDP2's ``fully_shard``, tensor parallel), or an FSDP1 wrapper?"""
    torch = torch_module()
    if not (torch.distributed.is_available()):
        return False
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    if any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()):
        return True
    return any(isinstance(t, DTensor) for t in list(module.parameters()) + list(module.buffers()))


def _key(name: str) -> str:
    return name or UNNAMED


def _owner(models: Mapping[str, Any], name: str, opt: Any) -> Any:
    """The model whose parameters ``opt`` steps (DCP's optimizer API needs it)."""
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for m in models.values():
        if params <= {id(p) for p in m.parameters()}:
            return m
    label = f"optimizer {name!r}" if name else "the optimizer"
    raise ValueError(f"{label}: its parameters are not all in one of the models given to the "
                     "Checkpointer; sharded (DCP) state needs each optimizer's model")


def state_of(models: Mapping[str, Any], optimizers: Mapping[str, Any]) -> Dict[str, Any]:
    """This rank's shards of every model and optimizer, as DCP saves them (DTensors, no copy)."""
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_model_state_dict, get_optimizer_state_dict)

    return {
        MODEL: {_key(n): get_model_state_dict(m) for n, m in models.items()},
        OPTIMIZER: {_key(n): get_optimizer_state_dict(_owner(models, n, o), o)
                    for n, o in optimizers.items()},
    }


def apply(models: Mapping[str, Any], optimizers: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Set every model and optimizer from ``state`` (what :func:`load` filled in)."""
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        set_model_state_dict, set_optimizer_state_dict)

    for n, m in models.items():
        set_model_state_dict(m, state[MODEL][_key(n)])
    for n, o in optimizers.items():
        set_optimizer_state_dict(_owner(models, n, o), o, state[OPTIMIZER][_key(n)])


def _writer(directory: str, **kw: Any) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter  # noqa: PLC0415

    class Writer(FileSystemWriter):  # type: ignore[misc]
        """DCP's file-system writer (one file per rank, fsynced), without the save's path and
        random id in ``.metadata``: identical states give identical bytes."""

        def storage_meta(self) -> None:
            return None

    return Writer(directory, single_file_per_rank=True, sync_files=True, thread_count=1, **kw)


def save(state: Mapping[str, Any], directory: str) -> None:
    """``dcp.save`` of ``state`` into ``directory`` (this rank's shard file; ``.metadata`` on the
    coordinator). A collective: every rank calls it with its own directory."""
    _dcp().save(dict(state), storage_writer=_writer(directory))


class AsyncSaver:
    """Asynchronous DCP saves of one state, one at a time (the caller waits for the previous
    one's future before the next save: :class:`hpc_ckpt.Session` does).

    It keeps what every save reuses: a gloo process group of its own (made collectively at the
    first save, which every rank makes at the same step), so the background save's collectives
    never interleave with training's on the default group; and one writer whose staged host copy
    of the state is allocated once and refilled by each save (no allocation, no page faults on
    the training thread after the first save)."""

    def __init__(self) -> None:
        self._group: Any = None
        self._stager: Optional[_HostCopy] = None

    def _process_group(self) -> Any:
        d = torch_module().distributed
        if not (d.is_available() and d.is_initialized()):
            return None
        if self._group is None:
            self._group = d.new_group(backend="gloo")
        return self._group

    def save(self, state: Mapping[str, Any], directory: str) -> "Future[Any]":
        """``dcp.async_save`` of ``state`` into ``directory``: returns once the state is copied
        (training may then change it); the future is done once every file is written and
        fsynced."""
        pg = self._process_group()
        if pg is None:  # one process without torch.distributed: DCP's async path needs a group
            fut: Future[Any] = Future()
            try:
                save(state, directory)
                fut.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                fut.set_exception(e)
            return fut
        if self._stager is None:
            self._stager = _HostCopy()
        res = _dcp().async_save(dict(state), storage_writer=_writer(directory), process_group=pg,
                                async_stager=self._stager)
        return getattr(res, "upload_completion", res)


class _HostCopy:
    """DCP's ``AsyncStager``: copies a state into host buffers allocated at the first save and
    refilled by each later one (pinned where CUDA is, so device copies can overlap; plain host
    memory otherwise, where DCP's own caching stager fails asking for pinned memory)."""

    should_synchronize_after_execute = False
    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._cache: Any = None

    def stage(self, state_dict: Any) -> Any:
        from torch.distributed._state_dict_utils import (  # noqa: PLC0415
            _copy_state_dict, _create_cpu_state_dict)

        if self._cache is None:
            self._cache = _create_cpu_state_dict(state_dict, pin_memory=torch_module().cuda.is_available())
        return _copy_state_dict(state_dict, self._cache)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


# DCP's metadata classes (module, name): all that a ``.metadata`` written by DCP refers to.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its own dataclasses, torch dtypes and sizes, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        torch = torch_module()
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a DCP metadata type: this .metadata was not written by "
            "torch.distributed.checkpoint (hpc_ckpt runs no code from a checkpoint)")


def _reader(directory: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415
    from torch.distributed.checkpoint.metadata import StorageMeta  # noqa: PLC0415

    class SafeReader(FileSystemReader):  # type: ignore[misc]
        """DCP's file-system reader whose ``.metadata`` is unpickled with an allow-list."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(path, "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except Exception as e:  # noqa: BLE001 - any fault of the file: a clear error
                    raise IncompatibleCheckpointError(f"{path}: not readable DCP metadata ({e})") from e
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(directory)


def _planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner  # noqa: PLC0415
    from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415

    torch = torch_module()

    class SafeLoadPlanner(DefaultLoadPlanner):  # type: ignore[misc]
        """DCP's load planner; its non-tensor entries are read with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def load(state: Dict[str, Any], directory: str) -> None:
    """Fill ``state`` (this rank's state dict as a template: DTensors of this world size) from
    the DCP checkpoint in ``directory``, resharding as needed, running no code from it. A
    collective: every rank calls it. Faults (a torn shard, missing keys) raise
    :class:`IncompatibleCheckpointError` naming the directory."""
    try:
        _dcp().load(state, storage_reader=_reader(directory), planner=_planner())
    except IncompatibleCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException, RuntimeError, ...
        raise IncompatibleCheckpointError(f"{directory}: the sharded (DCP) state does not load: {e}") from e


def full_tensors(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` (as :func:`state_of` gives it) flattened the way DCP names its entries, every
    tensor gathered whole (DTensor ``full_tensor()``: a collective) and on the CPU."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # noqa: PLC0415
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    torch = torch_module()
    flat, _ = flatten_state_dict(dict(state))
    out: Dict[str, Any] = {}
    for k in sorted(flat):
        v = flat[k]
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
    return out


def read_full(directory: str) -> Dict[str, Any]:
    """Every tensor of the DCP checkpoint in ``directory`` gathered whole, in this one process
    and without a process group (inspection, export, tests): ``{key: tensor}`` with DCP's keys
    (``model._.0.weight``, ``optimizer._.state.0.weight.exp_avg``; ``_`` an unnamed model or
    optimizer), as :func:`full_tensors` names a live state. Runs no code from the checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    torch = torch_module()
    md = _reader(directory).read_metadata()
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
           for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _dcp().load(out, storage_reader=_reader(directory), planner=_planner(), no_dist=True)
    except Exception as e:  # noqa: BLE001 - as load()
        raise IncompatibleCheckpointError(f"{directory}: the sharded (DCP) state does not load: {e}") from e
    return dict(sorted(out.items()))


def load_into(directory: str, models: Mapping[str, Any],
              optimizers: Optional[Mapping[str, Any]] = None) -> None:
    """Load the sharded models (and optimizers) of a committed checkpoint, on any world size:
    the one ``hpc_ckpt`` call for the DCP part of a checkpoint outside a :class:`Checkpointer`
    (``{name: module}``, ``""`` for a single unnamed one, as the Checkpointer was given them)."""
    optimizers = optimizers or {}
    st = state_of(models, optimizers)
    load(st, directory)
    apply(models, optimizers, st)
