#!/usr/bin/env python3
"""A real PyTorch training job, preemption-proof through the hpc_ckpt package.

    hpc-ckpt wrap -- .venv/bin/python examples/python/train.py [--steps N]
        [--checkpoint-every K] [--seed S] [--threads T] [--step-delay SECONDS] [--eval-every E]

An MLP (32 -> 64 -> 64 -> 10, ReLU, dropout) trained with AdamW, linear warmup then cosine
(SequentialLR), a GradScaler (enabled on CPU too), numpy noise augmentation, batch 64, on
synthetic data generated from the seed. Under `hpc-ckpt wrap` it resumes exactly: a run stopped
by USR1/TERM or killed any number of times ends with the same bytes in every checkpoint file as
an uninterrupted one. The lines marked `# hpc_ckpt` are all it takes (see the README, "Python
package"). Outside wrap it trains without checkpoints.

stdout: "step=<n> loss=<repr(float)>" after every step, "resumed from ... at step=<n> ..." after
a resume, and a final "final step=<n> loss=<repr(float)>".
"""

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import hpc_ckpt  # hpc_ckpt

N_TRAIN, N_VAL, N_FEATURES, N_CLASSES, HIDDEN = 4096, 1024, 32, 10, 64
DROPOUT, BATCH, LR, WEIGHT_DECAY, WARMUP_STEPS, NOISE = 0.1, 64, 3e-3, 1e-4, 20, 0.05


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    p.add_argument("--checkpoint-every", type=int, default=50, help="periodic checkpoint every K steps (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--eval-every", type=int, default=25, help="validation loss every E steps (best metric)")
    a = p.parse_args(argv)
    if min(a.steps, a.checkpoint_every, a.step_delay) < 0 or a.threads < 1 or a.eval_every < 1:
        p.error("bad argument value")
    return a


def make_data(seed):
    """Synthetic, learnable but noisy classification data, a pure function of the seed."""
    g = torch.Generator().manual_seed(seed * 2 + 1)
    teacher = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    x = torch.randn(N_TRAIN + N_VAL, N_FEATURES, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(N_TRAIN + N_VAL, N_CLASSES, generator=g)).argmax(dim=1)
    return (torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), x[N_TRAIN:], y[N_TRAIN:])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    hpc_ckpt.seed_all(args.seed)  # hpc_ckpt: random, numpy and torch, all captured by checkpoints

    train_set, x_val, y_val = make_data(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT),
        torch.nn.Linear(HIDDEN, N_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / WARMUP_STEPS, total_iters=WARMUP_STEPS),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.steps - WARMUP_STEPS), eta_min=LR / 20),
    ], milestones=[WARMUP_STEPS])
    scaler = torch.amp.GradScaler("cpu")
    augment = np.random.default_rng(args.seed)
    loader = hpc_ckpt.ResumableLoader(train_set, BATCH, shuffle=True, seed=args.seed, drop_last=True)  # hpc_ckpt

    ck = hpc_ckpt.Checkpointer(  # hpc_ckpt
        model=model, optimizer=opt, scheduler=sched, scaler=scaler, loader=loader,  # hpc_ckpt
        rngs={"augment": augment}, every_steps=args.checkpoint_every or None,  # hpc_ckpt
        total_steps=args.steps,  # hpc_ckpt
        monitor="val_loss", mode="min",  # hpc_ckpt
        config={"seed": args.seed, "steps": args.steps, "batch": BATCH, "lr": LR},  # hpc_ckpt
        reference_batch=(x_val[:64], y_val[:64]),  # hpc_ckpt
        reference_loss=lambda b: F.cross_entropy(model(b[0]), b[1]))  # hpc_ckpt
    step = ck.restore()  # hpc_ckpt
    if step:  # hpc_ckpt
        print(f"resumed from {ck.resume_from} at step={step} epoch={loader.epoch} "  # hpc_ckpt
              f"step_in_epoch={loader.position}", flush=True)  # hpc_ckpt

    model.train()
    while step < args.steps and not ck.should_stop():  # hpc_ckpt: should_stop()
        for xb, yb in loader:
            xb = xb + torch.from_numpy(augment.normal(0.0, NOISE, size=xb.shape).astype(np.float32))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            metrics = {"loss": loss.item(), "lr": sched.get_last_lr()[0]}
            print(f"step={step} loss={metrics['loss']!r}", flush=True)
            if step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    metrics["val_loss"] = F.cross_entropy(model(x_val), y_val).item()
                model.train()
            if args.step_delay > 0:
                end = time.monotonic() + args.step_delay
                while not ck.session.stop_requested and time.monotonic() < end:  # hpc_ckpt
                    time.sleep(min(0.02, max(0.0, end - time.monotonic())))
            ck.step_done(step, metrics=metrics)  # hpc_ckpt
            if step >= args.steps or ck.should_stop():  # hpc_ckpt: should_stop()
                break

    if ck.finish():  # hpc_ckpt: the final checkpoint (or, after a stop signal, False)
        loss = ck.metrics.get("loss", math.nan)
        print(f"final step={ck.step} loss={loss!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
