#!/usr/bin/env python3
"""A tiny GPT-2 (built from a config: no download) trained by transformers' Trainer under
`hpc-ckpt wrap`, made preemption-proof by hpc_ckpt's HF callback.

    hpc-ckpt wrap [--ranks N] -- python tests/python/jobs/hf_train.py --output-dir DIR [--step-delay S]

On N ranks (the supervisor's env:// variables) the Trainer runs DDP over gloo on CPU; each rank
takes 8/N sequences a micro-batch, so the global batch, the steps and the save cadence are the
same for every N. Rank 0 prints "step=N loss=L" per optimizer step (logging_steps=1) and
"final step=N" at the end.

Test knob: ``HF_JOB_PRINT_STOP=1`` makes every rank print "rank=R stopped at step=N" when its
callback stopped it (so a test sees that the ranks stopped at the same step).
"""

import argparse
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

from hpc_ckpt.integrations.hf import HpcCkptCallback

VOCAB, SEQ, N_SEQ = 64, 16, 192


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, a pure function of the seed (next-token prediction)."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=g)

    def __len__(self):
        return N_SEQ

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Print(TrainerCallback):
    def __init__(self, delay):
        self.delay = delay

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and state.is_world_process_zero:
            print(f"step={state.global_step} loss={logs['loss']!r}", flush=True)

    def on_step_end(self, args, state, control, **kw):
        if self.delay:
            time.sleep(self.delay)


class RankStreams(TrainerCallback):
    """Each rank its own dropout stream (the Trainer seeds every rank alike, so a checkpoint's
    RNG files would all be equal); set before the Trainer restores the saved ones on a resume."""

    def on_train_begin(self, args, state, control, **kw):
        if args.world_size > 1:
            torch.manual_seed(args.seed * 1000 + args.process_index)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if 8 % world:
        p.error(f"the global micro-batch of 8 sequences does not split over {world} ranks")
    set_seed(a.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=a.output_dir, num_train_epochs=a.epochs, per_device_train_batch_size=8 // world,
        gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=4, lr_scheduler_type="cosine",
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=1, save_strategy="steps", save_steps=5,
        save_total_limit=2, seed=a.seed, data_seed=a.seed, full_determinism=True, use_cpu=True, report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo" if world > 1 else None,
        ddp_find_unused_parameters=False)
    ck = HpcCkptCallback()
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(a.seed), callbacks=[ck, Print(a.step_delay), RankStreams()])
    trainer.train(resume_from_checkpoint=ck.resume_from)
    if ck.stopped and os.environ.get("HF_JOB_PRINT_STOP"):
        print(f"rank={trainer.args.process_index} stopped at step={trainer.state.global_step}", flush=True)
    if not ck.stopped and trainer.is_world_process_zero():
        print(f"final step={trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
