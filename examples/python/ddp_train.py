#!/usr/bin/env python3
"""A data-parallel (DDP, gloo on CPU) PyTorch job on the hpc_ckpt package, one rank per process.

    hpc-ckpt wrap --ranks 2 -- .venv/bin/python examples/python/ddp_train.py [--steps N]
        [--checkpoint-every K] [--seed S] [--step-delay SECONDS]

or, under Slurm, a job config with `slurm.ntasks: 2` and this as its `command` (the supervisor
starts the ranks with `srun … hpc-ckpt rank -- CMD`). A 1-rank run needs no launcher at all.

An MLP (32 -> 64 -> 64 -> 10, ReLU, dropout) wrapped in DistributedDataParallel, AdamW, synthetic
classification data; each step takes a global batch of 64 samples from a permutation of
(seed, epoch) and rank r trains on samples r, r+W, r+2W, ... of it (its shard). An interrupted
run ends with the same bytes as an uninterrupted one of the same world size.

hpc_ckpt.Checkpointer does the protocol (README, "Multi-rank jobs"): rank 0 stages the
replicated state (model, optimizer, counters: rank00000.model.safetensors,
rank00000.optimizer.safetensors, rank00000.trainer_state.json), every rank its own RNG (which
drives its dropout: rank<r:05d>.rng.safetensors, rank<r:05d>.rank_state.json), and every rank
asks for every commit with the same step. The data position is the step (a global sample
index), so it needs no state of its own.

Stopping: the signal (HPC_CKPT_SIGNAL, and TERM) only sets a local flag; every --agree-every
steps `step_done` all_reduces(MAX) it, so all ranks stop after the same step and none is left
waiting in a collective; that agreement's cost is printed at the end (`agree_us_per_step`).
Having staged and asked, a stopping rank exits at once (os._exit): a bare TERM leaves only
Slurm's KillWait, and torch's interpreter teardown takes seconds. Resuming with another world
size: the replicated state and the data position load exactly; every rank then derives a fresh
RNG from (seed, rank, step).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import hpc_ckpt

N_TRAIN = 2048
N_FEATURES = 32
N_CLASSES = 10
HIDDEN = 64
DROPOUT = 0.1
BATCH = 64  # global
LR = 3e-3


def log(rank, msg):
    if rank == 0:
        print(msg, flush=True)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(N_FEATURES, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, N_CLASSES)
        self.drop = torch.nn.Dropout(DROPOUT)

    def forward(self, x):
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.out(x)


def make_data(seed):
    g = torch.Generator().manual_seed(seed * 2 + 1)
    teacher = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    x = torch.randn(N_TRAIN, N_FEATURES, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(N_TRAIN, N_CLASSES, generator=g)).argmax(dim=1)
    return x, y


def epoch_order(seed, epoch):
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    return torch.randperm(N_TRAIN, generator=g)


def exit_now():
    """Everything is staged and committed: skip the interpreter's teardown (seconds with torch)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--agree-every", type=int, default=1,
                   help="agree on stopping every K steps (cost / K; a stop waits up to K steps)")
    p.add_argument("--no-stop-agreement", action="store_true",
                   help="benchmark only: skip the per-step all_reduce of the stop flag (a rank "
                        "stopping alone would leave its peers blocked in a collective)")
    args = p.parse_args(argv)

    rank = int(os.environ.get("HPC_CKPT_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("HPC_CKPT_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)

    config = {"seed": args.seed, "steps": args.steps, "batch": BATCH, "lr": LR,
              "hidden": HIDDEN, "dropout": DROPOUT, "n_train": N_TRAIN}
    x, y = make_data(args.seed)
    hpc_ckpt.seed_all(args.seed)  # python, numpy and torch: every stream a checkpoint captures
    model = MLP()  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    torch.manual_seed(args.seed * 7919 + rank)  # this rank's dropout stream
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, config=config, verbose=False,
                               on_commit_error="warn",
                               every_steps=args.checkpoint_every or None, total_steps=args.steps,
                               stop_agreement=not args.no_stop_agreement,
                               agree_every=max(1, args.agree_every))
    step = ck.restore()
    if ck.resume_from:
        if not (ck.resumed_world_size == world and ck.rank_state_restored):
            torch.manual_seed(args.seed * 7919 + rank + 1_000_003 * step)  # another world size
        log(rank, f"resumed at step {step} (saved by {ck.resumed_world_size} ranks, now {world})")
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    per_epoch = N_TRAIN // BATCH
    started, first_step = time.perf_counter(), step
    while step < args.steps:
        epoch, pos = divmod(step, per_epoch)
        idx = epoch_order(args.seed, epoch)[pos * BATCH:(pos + 1) * BATCH][rank::world]
        ddp.train()
        loss = F.cross_entropy(ddp(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if args.step_delay:
            time.sleep(args.step_delay)
        log(rank, f"step={step} loss={loss.item()!r}")
        ck.step_done(step, epoch=step * BATCH // N_TRAIN)
        if ck.should_stop():
            log(rank, f"stopped at step {step}")
            exit_now()
    if not ck.finish():
        log(rank, f"stopped at step {step}")
        exit_now()
    steps_run = max(1, step - first_step)
    agreed = ck.agreement.seconds
    log(rank, f"agree_us_per_step={1e6 * sum(agreed) / max(1, len(agreed)):.1f} "
              f"agree_median_us={ck.agreement.median_us() or 0.0:.1f} "
              f"step_ms={1e3 * (time.perf_counter() - started) / steps_run:.3f} over {steps_run} steps")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
