"""Hugging Face ``transformers.Trainer`` under ``hpc-ckpt wrap``.

    from hpc_ckpt.integrations.hf import HpcCkptCallback
    cb = HpcCkptCallback()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_from)   # None on a fresh start

Every checkpoint the Trainer saves (``save_strategy``/``save_steps``, the stop signal, the final
step) is committed through the supervisor: its files in ``output_dir/checkpoint-N`` are hard-linked
(copied across filesystems) into the staging dir and the commit is awaited before training goes on,
so the Trainer never rewrites a file the supervisor is reading. On the stop signal the callback
has the Trainer save at the end of the current optimizer step and stop; the script then returns
from ``train()`` and should exit 0. The next allocation resumes through the Trainer's own
``resume_from_checkpoint`` path, which restores model, optimizer, scheduler, GradScaler, the RNG
states (Python, numpy, torch CPU/CUDA), ``TrainerState`` and the data position (it skips the
batches already seen in the epoch, with the sampler seeded per epoch).

Several ranks (``hpc-ckpt wrap --ranks N``, ``srun``: the Trainer runs distributed from the
``env://`` variables the supervisor sets; the same script, the callback on every rank):

- the ranks stop together: at every optimizer step the callback joins a
  :class:`hpc_ckpt.StopAgreement` (one ``all_reduce(MAX)`` through the Trainer's process group),
  so a signal seen by any rank makes every rank save and stop after the same step;
- every rank asks for the commit of every save; each stages only the files it wrote itself
  (rank r its ``rng_state_<r>.pth``; rank 0 everything else: model, optimizer, scheduler,
  scaler, ``trainer_state.json``), so no rank reads a file another is still writing, and the
  supervisor commits once every rank has asked: one checkpoint, ``rank<r:05d>.<Trainer's name>``;
- on resume each rank lays the checkpoint out again under the Trainer's own names, as hard links,
  in ``output_dir/.hpc-ckpt-resume/rank<r:05d>/checkpoint-N`` (a folder of its own: no rank
  waits for another), and :attr:`HpcCkptCallback.resume_from` names that folder.

The files are the Trainer's own formats: ``model.safetensors``, ``trainer_state.json``, and
``optimizer.pt`` / ``scheduler.pt`` / ``rng_state[_<r>].pth`` / ``scaler.pt`` (torch.save; the
Trainer loads them with ``torch.load(weights_only=True)``, which runs no code).
``training_args.bin`` is a full pickle the resume path never reads: it is not committed.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from ..errors import IncompatibleCheckpointError, ProtocolError
from ..protocol import log
from ..ranks import MANIFEST, StopAgreement, checkpoint_world_size
from ..session import Session, flat_files

SKIP = ("training_args.bin",)
# Files a rank of a multi-process Trainer writes for itself (its RNG state; XLA's and
# SageMaker's per-rank optimizer shards); every other file is written by rank 0 alone.
_OWN_FILE = re.compile(r"^(?:rng_state_(\d+)\.pth|rank(\d+)-of-\d+-.+)$")
_RANK_PREFIX = re.compile(r"^rank(\d{5})\.(.+)$")
RESUME_DIR = ".hpc-ckpt-resume"


def writer_of(name: str) -> int:
    """The process index that writes file ``name`` of a multi-process Trainer's checkpoint."""
    m = _OWN_FILE.match(name)
    return int(m.group(1) or m.group(2)) if m else 0


def own_files(folder: str, process_index: int, world_size: int) -> Dict[str, str]:
    """The files of the Trainer's checkpoint ``folder`` that this process stages: all of them on
    one process; on several, the ones it wrote itself (:func:`writer_of`), so every file is
    staged once, by the process that finished writing it before its ``on_save``."""
    files = flat_files(folder, skip=SKIP)
    if world_size <= 1:
        return files
    return {n: p for n, p in files.items() if writer_of(n) == process_index}


def trainer_layout(checkpoint: str, dest: str) -> str:
    """Lay out the committed multi-rank ``checkpoint`` in ``dest`` (created, emptied first) as
    the Trainer wrote it: ``rank<r>.NAME`` becomes ``NAME`` (hard links; copies across file
    systems). Two ranks' files with one name, or a checkpoint without rank 0's
    ``trainer_state.json``, raise :class:`IncompatibleCheckpointError`."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    linked: Dict[str, str] = {}
    for n in sorted(os.listdir(checkpoint)):
        if n == MANIFEST:
            continue
        m = _RANK_PREFIX.match(n)
        name = m.group(2) if m else n
        if name in linked:
            raise IncompatibleCheckpointError(
                f"checkpoint {checkpoint}: {linked[name]} and {n} are both the Trainer's {name}: "
                "not a checkpoint of this callback")
        linked[name] = n
        src, dst = os.path.join(checkpoint, n), os.path.join(dest, name)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    if "trainer_state.json" not in linked:
        raise IncompatibleCheckpointError(
            f"checkpoint {checkpoint} holds no rank00000.trainer_state.json: not a checkpoint of "
            "the Trainer's callback (resume it with the code that wrote it)")
    return dest


class HpcCkptCallback(TrainerCallback):  # type: ignore[misc]
    """Commits the Trainer's checkpoints through ``hpc-ckpt`` and stops on its signal, on one
    rank or several (see the module's doc).

    Args:
        save_final: also save (and commit, marked done) at the last step, whatever the
            ``save_strategy``.
        stop_agreement: on several ranks, agree on the stop step through torch.distributed
            (without it a rank that sees the signal alone stops alone, and its peers hang).
        agree_every: agree every K optimizer steps only (its cost / K; a stop waits up to K steps).
        session: a :class:`hpc_ckpt.Session` to use; otherwise one is made from ``session_kwargs``
            (``run_dir=`` for a local run dir outside ``wrap``, ``signals=``, ...).
    """

    def __init__(self, *, save_final: bool = True, stop_agreement: bool = True, agree_every: int = 1,
                 session: Optional[Session] = None, **session_kwargs: Any) -> None:
        self.session = session or Session(**session_kwargs)
        self.save_final = save_final
        self.stopped = False
        self.agreement = StopAgreement(self.session.world_size, every=agree_every, enabled=stop_agreement)
        self._output_dir: Optional[str] = None
        self._layout: Optional[str] = None

    @property
    def resume_from(self) -> Optional[str]:
        """Pass this to ``trainer.train(resume_from_checkpoint=...)``: the committed checkpoint
        (one rank), or this rank's layout of it under the Trainer's names (several ranks; made
        on first use, so create the Trainer with this callback before reading it)."""
        d = self.session.resume_from
        if d is None or checkpoint_world_size(d, self.session.env.resume_world_size) <= 1:
            return d
        if self._layout is None:
            if self._output_dir is None:
                raise ProtocolError(
                    "resume_from was read before the Trainer was created: on several ranks the "
                    "callback lays the checkpoint out in the Trainer's output_dir; create "
                    "Trainer(..., callbacks=[this callback]) first, then read resume_from")
            step = os.path.basename(d).rsplit("-", 1)[-1].lstrip("0") or "0"
            dest = os.path.join(self._output_dir, RESUME_DIR, f"rank{self.session.rank:05d}",
                                f"checkpoint-{step}")
            self._layout = trainer_layout(d, dest)
        return self._layout

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._output_dir = args.output_dir
        if self.session.world_size > 1 and args.world_size != self.session.world_size:
            raise ProtocolError(
                f"the Trainer runs {args.world_size} process(es) but hpc-ckpt started "
                f"{self.session.world_size} ranks: let the Trainer take its ranks from the "
                "environment the supervisor sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                "MASTER_PORT), e.g. no other launcher inside `hpc-ckpt wrap --ranks N`")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session.resume_from is not None:
            if state.global_step == 0:
                log("WARNING: there is a checkpoint to resume from but the Trainer starts at step 0: "
                    "call trainer.train(resume_from_checkpoint=callback.resume_from)")
            else:
                self.session.committed_step = state.global_step
        if self.session.enabled and getattr(args, "save_only_model", False):
            log("WARNING: save_only_model=True: checkpoints hold no optimizer, scheduler or RNG "
                "state, so a resume is not exact")

    def _stop_agreed(self, step: int) -> bool:
        """Did any rank see a stop signal? The same answer on every rank (a collective on
        agreement steps; off them, and on one rank, this rank's own flag decides)."""
        if self.agreement.world_size <= 1:
            return self.session.stop_requested
        if not self.agreement.due(step):
            return False
        return bool(self.agreement.agree([int(self.session.stop_requested)])[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self.session.enabled or self.stopped:
            return control
        if self._stop_agreed(state.global_step):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        elif self.save_final and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.session.enabled:
            return
        step = state.global_step
        if self.session.covered(step):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(folder):
            log(f"WARNING: the Trainer saved, but {folder} does not exist (hyper-parameter search?): "
                f"not committed")
            return
        files = own_files(folder, args.process_index, self.session.world_size)
        done = step >= state.max_steps and not self.stopped
        reason = self.session.stop_reason if self.stopped else ("final" if done else "save_strategy")
        self.session.commit_files(step, files, epoch=int(state.epoch or 0),
                                  metrics=_metrics(state), done=done, reason=reason, wait=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.close()
        if self._layout is not None:  # hard links only: the committed checkpoint stays whole
            shutil.rmtree(self._layout, ignore_errors=True)
            self._layout = None


def _metrics(state: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for entry in state.log_history[-8:]:
        out.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    if state.best_metric is not None:
        out["best_metric"] = state.best_metric
    return out
