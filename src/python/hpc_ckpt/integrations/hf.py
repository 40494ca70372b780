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

The files are the Trainer's own formats: ``model.safetensors``, ``trainer_state.json``, and
``optimizer.pt`` / ``scheduler.pt`` / ``rng_state.pth`` / ``scaler.pt`` (torch.save; the Trainer
loads them with ``torch.load(weights_only=True)``, which runs no code). ``training_args.bin`` is
a full pickle the resume path never reads: it is not committed.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from ..protocol import log
from ..session import Session, flat_files

SKIP = ("training_args.bin",)


class HpcCkptCallback(TrainerCallback):  # type: ignore[misc]
    """Commits the Trainer's checkpoints through ``hpc-ckpt`` and stops on its signal.

    Args:
        save_final: also save (and commit, marked done) at the last step, whatever the
            ``save_strategy``.
        session: a :class:`hpc_ckpt.Session` to use; otherwise one is made from ``session_kwargs``
            (``run_dir=`` for a local run dir outside ``wrap``, ``signals=``, ...).
    """

    def __init__(self, *, save_final: bool = True, session: Optional[Session] = None,
                 **session_kwargs: Any) -> None:
        self.session = session or Session(**session_kwargs)
        self.save_final = save_final
        self.stopped = False

    @property
    def resume_from(self) -> Optional[str]:
        """Pass this to ``trainer.train(resume_from_checkpoint=...)``."""
        return self.session.resume_from

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

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self.session.enabled:
            return control
        if self.session.stop_requested and not self.stopped:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        elif self.save_final and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.session.enabled or not args.should_save:  # later: rank 0 writes replicated state
            return
        step = state.global_step
        if self.session.covered(step):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(folder):
            log(f"WARNING: the Trainer saved, but {folder} does not exist (hyper-parameter search?): "
                f"not committed")
            return
        done = step >= state.max_steps and not self.stopped
        reason = self.session.stop_reason if self.stopped else ("final" if done else "save_strategy")
        self.session.commit_files(step, flat_files(folder, skip=SKIP), epoch=int(state.epoch or 0),
                                  metrics=_metrics(state), done=done, reason=reason, wait=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.close()


def _metrics(state: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for entry in state.log_history[-8:]:
        out.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    if state.best_metric is not None:
        out["best_metric"] = state.best_metric
    return out
