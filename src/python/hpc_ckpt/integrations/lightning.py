"""Lightning under ``hpc-ckpt wrap``.

    from hpc_ckpt.integrations.lightning import HpcCkptCallback
    cb = HpcCkptCallback(every_n_steps=100)
    trainer = L.Trainer(callbacks=[cb], ...)
    trainer.fit(model, train_dataloaders=hpc_ckpt.ResumableLoader(ds, 32, seed=0),
                ckpt_path=cb.resume_from)                  # None on a fresh start

At the end of an optimizer step (every ``every_n_steps``, on the stop signal, and at the end of
training) the callback writes ``trainer.save_checkpoint(<staging>/lightning.ckpt)`` and asks for
its commit; on the stop signal it also sets ``trainer.should_stop``, so ``fit`` returns and the
script should exit 0. The next allocation resumes through ``fit(ckpt_path=...)``: Lightning
restores the model, optimizers, schedulers, precision plugin (GradScaler), loops (counters,
position in the epoch) and the state of *resumable* data loaders. Lightning does not save random
states; this callback does (Python, numpy, torch CPU and CUDA, in its own entry of the
checkpoint) and sets them back when training starts. A plain ``DataLoader`` with ``shuffle=True``
is not resumable mid-epoch (Lightning warns): use :class:`hpc_ckpt.ResumableLoader` (or any
loader with ``state_dict``/``load_state_dict``).

``lightning.ckpt`` is Lightning's own format (torch.save; Lightning loads it with
``torch.load(weights_only=None)``, which torch >= 2.6 treats as ``weights_only=True``: no code
runs). The callback keeps the job's stop signals to itself (Lightning's SIGTERM handler would
otherwise raise ``SIGTERMException`` out of ``fit``, and its Slurm auto-requeue would requeue a
second time): give the Trainer ``plugins=[SLURMEnvironment(auto_requeue=False)]`` on Slurm.

Several ranks (``strategy="ddp"`` under ``hpc-ckpt wrap --ranks N`` or ``srun``: Lightning takes
the ranks from the environment the supervisor sets and spawns nothing; the callback on every
rank; ``use_distributed_sampler=False`` with ``ResumableLoader(rank=, world_size=)``):

- the ranks stop together: at each optimizer-step boundary the callback joins a
  :class:`hpc_ckpt.StopAgreement` (one ``all_reduce(MAX)`` through Lightning's process group);
- a save is ``trainer.save_checkpoint`` on every rank (Lightning writes ``lightning.ckpt`` from
  rank 0 and holds a barrier) plus each rank's own random state in ``rng.safetensors`` (the
  package's format, no pickle: Mersenne Twister words and torch states as tensors, the rest as
  JSON in the file's metadata); every rank asks for the same step and the supervisor commits
  ``rank00000.lightning.ckpt`` and ``rank<r:05d>.rng.safetensors`` as one checkpoint; on resume
  every rank loads rank 0's ``lightning.ckpt`` and sets back its own RNG.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    import pytorch_lightning as pl

from .. import state as S
from .._codec import dumps
from ..errors import IncompatibleCheckpointError
from ..protocol import log
from ..ranks import StopAgreement, checkpoint_world_size, rank_file
from ..session import Session

CKPT_FILE = "lightning.ckpt"
RNG_FILE = "rng.safetensors"  # each rank's random state, in a checkpoint of several ranks
RNG_META = "hpc_ckpt.rng"  # its metadata key: the JSON part of the state


def capture_rng() -> Dict[str, Any]:
    """Random states as plain lists and tensors (loadable with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    st: Dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return st


def write_rank_rng(path: str) -> None:
    """This process's random state (Python, numpy, torch CPU and CUDA) into one safetensors
    file: the big states as tensors, the rest as JSON in its metadata (no pickle)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    js, tensors = S.rng_state({}, cuda=True)
    # One metadata key: safetensors writes its metadata map in no fixed order, and one entry
    # keeps equal states equal bytes.
    save_file(dict(tensors), path, metadata={RNG_META: dumps(js)})


def read_rank_rng(path: str) -> None:
    """Set back the random state :func:`write_rank_rng` wrote (a file without its metadata
    raises :class:`IncompatibleCheckpointError` naming it)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get(RNG_META)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta is None:
        raise IncompatibleCheckpointError(f"{path} has no {RNG_META} metadata: not a random state of this callback")
    S.load_rng(json.loads(meta), tensors, {}, path, log)


def restore_rng(st: Dict[str, Any]) -> None:
    v, words, gauss = st["python"]
    random.setstate((v, tuple(words), gauss))
    name, key, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    cuda = st.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


class HpcCkptCallback(pl.Callback):  # type: ignore[misc]
    """Commits Lightning checkpoints through ``hpc-ckpt``, stops on its signal, restores RNG.

    Args:
        every_n_steps: also save every N optimizer steps (None: only on the stop signal and at
            the end of training).
        save_final: save (and commit, marked done) when training ends without a stop signal.
        restore_rng: set the saved random states back when training resumes.
        stop_agreement: on several ranks, agree on the stop step through torch.distributed
            (without it a rank that sees the signal alone stops alone, and its peers hang).
        agree_every: agree every K optimizer steps only (its cost / K; a stop waits up to K steps).
        session: a :class:`hpc_ckpt.Session`; otherwise one is made from ``session_kwargs``.
    """

    def __init__(self, every_n_steps: Optional[int] = None, *, save_final: bool = True,
                 restore_rng: bool = True, stop_agreement: bool = True, agree_every: int = 1,
                 session: Optional[Session] = None, **session_kwargs: Any) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.session = session or Session(**session_kwargs)
        self.every_n_steps = every_n_steps
        self.save_final = save_final
        self.restore_rng = restore_rng
        self.stopped = False
        self.agreement = StopAgreement(self.session.world_size, every=agree_every, enabled=stop_agreement)
        self._rng: Optional[Dict[str, Any]] = None

    @property
    def resume_world_size(self) -> int:
        """How many ranks wrote the checkpoint to resume from (1 on a fresh start)."""
        d = self.session.resume_from
        return 1 if d is None else checkpoint_world_size(d, self.session.env.resume_world_size)

    @property
    def resume_from(self) -> Optional[str]:
        """Pass this to ``trainer.fit(..., ckpt_path=...)`` (on every rank: rank 0's file)."""
        d = self.session.resume_from
        if d is None:
            return None
        path = os.path.join(d, rank_file(0, CKPT_FILE, self.resume_world_size))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{d} holds no {os.path.basename(path)}: not a checkpoint of this callback")
        return path

    # -- the callback's own entry in Lightning's checkpoint (rank 0's dump: one rank only)
    def state_dict(self) -> Dict[str, Any]:
        return {"rng": capture_rng()} if self.session.world_size <= 1 else {"rng_file": RNG_FILE}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    # -- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.reclaim_signals()  # after Lightning's signal connector installed its own
        resumed = self.session.resume_from is not None and trainer.global_step > 0
        if resumed:
            self.session.committed_step = trainer.global_step
        if self.restore_rng and (resumed or self._rng is not None):
            self._restore_saved_rng()  # last thing before the first batch is fetched
        self._rng = None

    def _restore_saved_rng(self) -> None:
        """Set back this rank's saved random state: the callback's entry of a 1-rank checkpoint
        (rank 0 only), or this rank's ``rng.safetensors`` of a multi-rank one; a rank the
        checkpoint has no state of (another world size) keeps the seeded streams, with a warning."""
        rank = self.session.rank
        if self._rng is not None:  # the entry of a checkpoint written by one rank
            saved_w = 1
            if rank == 0:
                restore_rng(self._rng)
                return
        else:
            saved_w = self.resume_world_size
            path = os.path.join(str(self.session.resume_from), rank_file(rank, RNG_FILE, saved_w))
            if saved_w > 1 and os.path.isfile(path):
                read_rank_rng(path)
                return
        log(f"WARNING: rank {rank}: the checkpoint (written by {saved_w} rank(s)) holds no random "
            "state of this rank: it keeps the streams the program seeded (the run is not the one "
            "an uninterrupted run would have been)")

    def _stop_agreed(self, step: int) -> bool:
        """Did any rank see a stop signal? The same answer on every rank (a collective on
        agreement steps; off them, and on one rank, this rank's own flag decides)."""
        if self.agreement.world_size <= 1:
            return self.session.stop_requested
        if not self.agreement.due(step):
            return False
        return bool(self.agreement.agree([int(self.session.stop_requested)])[0])

    def _save(self, trainer: Any, *, done: bool, reason: str, wait: bool = False) -> None:
        step = trainer.global_step
        several = self.session.world_size > 1

        def write(d: str) -> None:
            if several:  # before save_checkpoint, as the 1-rank entry is taken: the same state
                write_rank_rng(os.path.join(d, RNG_FILE))
            trainer.save_checkpoint(os.path.join(d, CKPT_FILE))  # every rank; rank 0 writes it

        # completed epochs: the epoch the next batch belongs to
        epoch = trainer.current_epoch + (1 if trainer.is_last_batch and trainer.training else 0)
        self.session.commit(step, write, epoch=epoch, done=done, reason=reason,
                            metrics=_metrics(trainer), wait=wait)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.session.enabled or self.stopped:
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # not an optimizer-step boundary: the accumulated gradients are not saved
        step = trainer.global_step
        if self._stop_agreed(step):
            self.stopped = True
            trainer.should_stop = True
            if not self.session.covered(step):
                self._save(trainer, done=False, reason=self.session.stop_reason)
            self.session.wait()
            return
        final = trainer.max_steps is not None and trainer.max_steps >= 0 and step >= trainer.max_steps
        if final and self.save_final:
            if not self.session.covered(step):
                self._save(trainer, done=True, reason="final")
        elif self.every_n_steps and step % self.every_n_steps == 0 and not self.session.covered(step):
            self._save(trainer, done=False, reason="periodic")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.session.enabled:
            return
        # one more agreement on several ranks: whether to save is then every rank's same answer
        # (save_checkpoint is a collective); a signal that came after the last step skips it
        stop = self.stopped or bool(self.agreement.agree([int(self.session.stop_requested)])[0])
        if self.save_final and not stop and not self.session.covered(trainer.global_step):
            self._save(trainer, done=True, reason="final")
        self.session.wait()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.session.close()  # after Lightning put back the handlers it replaced


def _metrics(trainer: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in trainer.callback_metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            log(f"metric {k!r} is not a number: not sent")
    return out
