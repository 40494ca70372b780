"""Multi-rank jobs: where each rank's files are in a committed checkpoint, and the stop agreement.

Under ``hpc-ckpt wrap --ranks N`` (or ``slurm.ntasks: N``) every rank stages into its own dir and
asks for its own commit; the supervisor commits once every rank has asked for the same step, and
names rank r's staged file NAME ``rank<r:05d>.NAME`` in the one checkpoint (a 1-rank job's files
keep their plain names). :func:`checkpoint_world_size` and :func:`rank_file` find them again.

The ranks must save and stop at the same step: a rank that stops alone leaves its peers blocked
in the next collective, and ranks asking for different steps are refused by the supervisor.
:class:`StopAgreement` makes that decision collective with one ``all_reduce(MAX)`` of a few
integers through the job's own torch.distributed process group.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, List, Optional, Sequence

from ._codec import torch_module
from .errors import IncompatibleCheckpointError, ProtocolError

MANIFEST = "MANIFEST.json"


def rank_file(rank: int, name: str, world_size: int) -> str:
    """The committed name of rank ``rank``'s staged file ``name`` in a checkpoint written by
    ``world_size`` ranks (``rank00003.name``; the plain name for a 1-rank checkpoint)."""
    return name if world_size <= 1 else f"rank{rank:05d}.{name}"


def checkpoint_world_size(path: str, hint: Optional[int] = None) -> int:
    """The number of ranks that wrote checkpoint dir ``path``: its manifest's
    ``extra.world_size`` (absent: 1). Without a readable manifest, ``hint`` (the supervisor's
    ``HPC_CKPT_RESUME_WORLD_SIZE``), else whether ``rank00000.*`` files are there."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        w = (m.get("extra") or {}).get("world_size", 1)
        if isinstance(w, int) and w >= 1:
            return w
        raise IncompatibleCheckpointError(f"checkpoint {path}: {MANIFEST} has extra.world_size={w!r}")
    except (OSError, ValueError):
        pass
    if hint is not None:
        return hint
    ranks = {n[4:9] for n in os.listdir(path) if n.startswith("rank") and n[4:9].isdigit()
             and n[9:10] == "."}
    return max(1, len(ranks))


def _dist() -> Any:
    torch = torch_module()
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


class StopAgreement:
    """Agree across ranks, at step boundaries, on whether to stop (and whether a time-based save
    is due): every rank gets the element-wise MAX of every rank's flags.

    Guarantees: on every rank :meth:`agree` returns the same flags for the same call (it is one
    collective: every rank must call it the same number of times, which a loop calling
    ``Checkpointer.step_done`` once per step does); with one rank, or with no torch.distributed
    process group, it returns the local flags without any communication.

    Args:
        world_size: the ranks the supervisor started (``HPC_CKPT_WORLD_SIZE``).
        every: agree only at steps that are multiples of ``every`` (cost / ``every``; a stop then
            waits up to ``every`` steps); other steps report no stop.
        reduce: for tests, ``reduce(list_of_ints) -> list_of_ints`` instead of torch.distributed.
    """

    def __init__(self, world_size: int, every: int = 1, enabled: bool = True,
                 reduce: Optional[Callable[[List[int]], List[int]]] = None) -> None:
        if every < 1:
            raise ValueError("agree_every must be >= 1")
        self.world_size = world_size
        self.every = every
        self.enabled = enabled
        self._reduce = reduce
        self._checked = False
        self._tensor: Any = None
        self.seconds: List[float] = []  # the duration of each agreement (bounded, see _record)
        self.calls = 0

    def active(self) -> bool:
        """Whether agreements communicate: several ranks, enabled, and a process group (or a
        test reducer). Checked once, at the first agreement; a process group whose size or rank
        disagrees with the supervisor's raises :class:`ProtocolError`."""
        if not self.enabled or self.world_size <= 1:
            return False
        if self._reduce is not None:
            return True
        d = _dist()
        if d is None:
            if not self._checked:
                self._checked = True
                from .protocol import log  # noqa: PLC0415

                log(f"WARNING: {self.world_size} ranks but torch.distributed is not initialized: the "
                    "ranks cannot agree on their stop step (call init_process_group before the "
                    "training loop); the supervisor refuses ranks asking for different steps")
            return False
        if not self._checked:
            self._checked = True
            if d.get_world_size() != self.world_size:
                raise ProtocolError(
                    f"torch.distributed has world size {d.get_world_size()} but hpc-ckpt started "
                    f"{self.world_size} ranks (HPC_CKPT_WORLD_SIZE): run the same number of ranks "
                    "(wrap --ranks / distributed.world_size / slurm.ntasks)")
        return True

    def due(self, step: int) -> bool:
        """Is ``step`` an agreement step?"""
        return step % self.every == 0

    def agree(self, flags: Sequence[int]) -> List[int]:
        """The element-wise MAX of ``flags`` over every rank (a collective when :meth:`active`)."""
        local = [int(f) for f in flags]
        if not self.active():
            return local
        t0 = time.perf_counter()
        if self._reduce is not None:
            out = [int(v) for v in self._reduce(local)]
        else:
            out = self._all_reduce(local)
        self._record(time.perf_counter() - t0)
        return out

    def _all_reduce(self, local: List[int]) -> List[int]:
        torch = torch_module()
        d = _dist()
        if self._tensor is None or self._tensor.numel() != len(local):
            backend = str(d.get_backend()).lower()
            dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
            self._tensor = torch.zeros(len(local), dtype=torch.int32, device=dev)
        t = self._tensor
        t.copy_(torch.tensor(local, dtype=torch.int32))
        d.all_reduce(t, op=d.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def _record(self, s: float) -> None:
        self.calls += 1
        if len(self.seconds) < 100_000:
            self.seconds.append(s)

    def median_us(self) -> Optional[float]:
        """The median duration of one agreement, in microseconds (None before the first)."""
        return 1e6 * statistics.median(self.seconds) if self.seconds else None


def check_world_seen(world_size: int, supervised: bool) -> None:
    """A torch.distributed job of several ranks that the supervisor sees as one would commit
    each rank's files as the whole checkpoint: refuse it (:class:`ProtocolError`)."""
    torch = torch_module()
    d = torch.distributed
    if world_size == 1 and supervised and d.is_available() and d.is_initialized() \
            and d.get_world_size() > 1:
        raise ProtocolError(
            f"torch.distributed runs {d.get_world_size()} ranks but hpc-ckpt sees one (no "
            "HPC_CKPT_WORLD_SIZE): every rank would commit its files as the whole checkpoint. "
            f"Run under `hpc-ckpt wrap --ranks {d.get_world_size()}` (or slurm.ntasks / "
            "distributed.world_size; with torchrun, distributed.launcher: command and "
            "`hpc-ckpt rank -- CMD` per rank)")
