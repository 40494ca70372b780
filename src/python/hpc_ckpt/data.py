"""A data loader that resumes at the exact next batch, mid-epoch.

The order of epoch ``e`` is a permutation derived from ``(seed, e)`` only, and the loader counts
the batches it has handed to the training loop (in the main process, so DataLoader workers
prefetching ahead do not matter). Its ``state_dict()`` is that position; after
``load_state_dict()`` the next batch is the one an uninterrupted run would have seen next.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

from ._codec import torch_module

_MIX = 0x9E3779B97F4A7C15


def _mix(*xs: int) -> int:
    h = 0x243F6A8885A308D3
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + _MIX) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class ResumableLoader:
    """Batches of ``dataset`` in an order fixed by ``(seed, epoch)``, resumable mid-epoch.

    ``for batch in loader`` runs the rest of the current epoch (all of it on a fresh start), then
    the next ``for`` starts the next epoch. Extra keyword arguments (``num_workers``,
    ``collate_fn``, ``pin_memory``, ...) go to the ``torch.utils.data.DataLoader`` it builds.
    Use ``loader.epoch`` as the epoch counter: it is restored with the position.

    Randomness inside DataLoader *worker processes* is not checkpointed (no library can reach
    it); with ``num_workers > 0`` the workers are seeded from ``(seed, epoch, position)``, so
    make augmentation in workers a function of that seed or of the sample index.

    Data-parallel ranks: ``rank``/``world_size`` make it a shard loader. Each step takes a
    global batch of ``batch_size * world_size`` samples from the epoch's order (the same on
    every rank, independent of the world size) and rank r gets samples r, r+W, r+2W, ... of it.
    The position is then a global sample index: a checkpoint of W ranks resumes with W' ranks
    at the exact next sample when the new global batch divides the samples already seen in the
    epoch (e.g. the same global batch: 2 x 32 -> 4 x 16); otherwise ``load_state_dict`` raises
    ``ValueError`` saying which numbers do not divide.
    """

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 **dataloader_kwargs: Any) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        for k in ("sampler", "batch_sampler", "shuffle", "generator"):
            if k in dataloader_kwargs:
                raise TypeError(f"ResumableLoader chooses the order itself: {k}= is not accepted")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.kwargs = dataloader_kwargs
        self._epoch = 0
        self._position = 0  # batches of the current epoch handed out

    # -- geometry
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps (global batches) per epoch."""
        n, g = self.num_samples, self.global_batch
        return n // g if self.drop_last else -(-n // g)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (= completed epochs)."""
        return self._epoch + (1 if len(self) and self._position >= len(self) else 0)

    @property
    def position(self) -> int:
        """Batches of :attr:`epoch` already handed out."""
        return 0 if len(self) and self._position >= len(self) else self._position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (a no-op if it is the current epoch)."""
        if epoch != self.epoch:
            self._epoch, self._position = int(epoch), 0

    def order(self, epoch: int) -> List[int]:
        """The sample indices of ``epoch``, in order."""
        torch = torch_module()
        n = self.num_samples
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
        order: List[int] = torch.randperm(n, generator=g).tolist()
        return order

    def __iter__(self) -> Iterator[Any]:
        return self._run()

    def _run(self) -> Iterator[Any]:
        torch = torch_module()
        if len(self) and self._position >= len(self):
            self._epoch, self._position = self._epoch + 1, 0
        epoch, start = self._epoch, self._position
        order = self.order(epoch)
        g, r, w = self.global_batch, self.rank, self.world_size
        batches = [order[i * g:(i + 1) * g][r::w] for i in range(start, len(self))]
        # A dedicated generator: creating the iterator draws its base seed from it, never from
        # the global torch RNG (which the training loop's checkpoint captures).
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, start, 2))
        dl = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, generator=gen,
                                         **self.kwargs)
        for batch in dl:
            if self._epoch != epoch:  # set_epoch / load_state_dict while iterating: stop
                return
            self._position += 1
            yield batch

    # -- state
    def state_dict(self) -> Dict[str, Any]:
        """The position (the same on every rank: it counts global batches)."""
        sd = {"epoch": self.epoch, "position": self.position, "seed": self.seed,
              "num_samples": self.num_samples, "batch_size": self.batch_size,
              "shuffle": self.shuffle, "drop_last": self.drop_last}
        if self.world_size != 1:
            sd["world_size"] = self.world_size
        return sd

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Resume at the saved position; another global batch (batch size x ranks) is mapped by
        sample index, or refused with ``ValueError`` when the new one does not divide it."""
        mine = self.state_dict()
        diff = {k: (sd.get(k), mine[k]) for k in ("seed", "num_samples", "shuffle", "drop_last")
                if k in sd and sd[k] != mine[k]}
        if diff:
            raise ValueError(f"the data loader differs from the checkpoint's (saved, now): {diff}")
        epoch, position = int(sd["epoch"]), int(sd["position"])
        saved_w = int(sd.get("world_size", 1))
        saved_g = int(sd.get("batch_size", self.batch_size)) * saved_w
        if saved_g != self.global_batch:
            seen = position * saved_g
            if seen % self.global_batch:
                raise ValueError(
                    f"data position: the checkpoint is {seen} samples into epoch {epoch} ({position} "
                    f"global batches of {saved_g} = batch_size {sd.get('batch_size')} x {saved_w} "
                    f"rank(s)); the global batch is now {self.global_batch} (batch_size "
                    f"{self.batch_size} x {self.world_size} rank(s)), which does not divide {seen}, so "
                    f"no batch starts at the next sample. Resume with a global batch that divides "
                    f"{seen} (e.g. {saved_g}), or from a checkpoint at an epoch boundary")
            position = seen // self.global_batch
        self._epoch, self._position = epoch, position

