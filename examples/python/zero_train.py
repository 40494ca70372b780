#!/usr/bin/env python3
"""Data-parallel training with a sharded optimizer (ZeroRedundancyOptimizer, gloo on CPU) on the
hpc_ckpt package.

    hpc-ckpt wrap --ranks 2 -- .venv/bin/python examples/python/zero_train.py [--steps N]
        [--checkpoint-every K] [--seed S] [--step-delay SECONDS]

An MLP with dropout in DistributedDataParallel; AdamW through ``ZeroRedundancyOptimizer``: each
rank keeps the AdamW state of its own part of the parameters only. ``hpc_ckpt.Checkpointer``
sees a ZeroRedundancyOptimizer and saves it sharded: every rank stages its own shard
(``rank<r:05d>.optimizer.safetensors`` in the checkpoint), rank 0 the replicated weights, every
rank its RNG and data position; the commit requests say ``"sharded": true``. Such a checkpoint
resumes exactly with the same number of ranks. With another number the supervisor refuses to
start (exit 7), and with ``distributed.reshard: true`` the program itself refuses with an
error naming both world sizes: hpc_ckpt does not reshard optimizer state.

stdout (rank 0): ``step=<n> loss=<repr>`` after every step, ``resumed from ... at step=<n>``
after a resume, ``final step=<n>`` at the end.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.optim import ZeroRedundancyOptimizer

import hpc_ckpt

N_TRAIN, N_FEATURES, N_CLASSES, HIDDEN, DROPOUT, BATCH, LR = 1024, 16, 4, 32, 0.2, 32, 1e-2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    return p.parse_args(argv)


def init_dist():
    """gloo through env://; a 1-rank run (no launcher variables) is a world of one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world


def make_data(seed):
    g = torch.Generator().manual_seed(seed * 2 + 1)
    x = torch.randn(N_TRAIN, N_FEATURES, generator=g)
    y = (x[:, :N_CLASSES] * 2 + torch.randn(N_TRAIN, N_CLASSES, generator=g)).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def main(argv):
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world = init_dist()
    hpc_ckpt.seed_all(args.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT),
        torch.nn.Linear(HIDDEN, N_CLASSES))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR,
                                  weight_decay=0.01)
    loader = hpc_ckpt.ResumableLoader(make_data(args.seed), BATCH // world, seed=args.seed,
                                      drop_last=True, rank=rank, world_size=world)
    torch.manual_seed(args.seed * 7919 + rank)  # this rank's dropout stream
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, loader=loader,  # sharded: ZeRO
                               every_steps=args.checkpoint_every or None, total_steps=args.steps,
                               config={"seed": args.seed, "steps": args.steps, "batch": BATCH})
    step = ck.restore()
    if step and rank == 0:
        print(f"resumed from {ck.resume_from} at step={step}", flush=True)
    while step < args.steps and not ck.should_stop():
        for xb, yb in loader:
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if rank == 0:
                print(f"step={step} loss={loss.item()!r}", flush=True)
            if args.step_delay:
                time.sleep(args.step_delay)
            ck.step_done(step, metrics={"loss": loss.item()})
            if step >= args.steps or ck.should_stop():
                break
    if ck.finish() and rank == 0:
        print(f"final step={ck.step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
