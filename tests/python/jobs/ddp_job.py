#!/usr/bin/env python3
"""A 2-rank DDP job (gloo, CPU) on the hpc_ckpt package, for tests/python/test_ranks.py.

    hpc-ckpt wrap --ranks 2 -- python ddp_job.py --steps N --every K [--seed S] [--step-delay D]

An MLP with dropout (each rank its own dropout stream), AdamW, a shard loader
(``ResumableLoader(rank=, world_size=)``: per-rank data shards of one global batch). Rank 0
prints ``step=<n> loss=<repr>`` after every step and ``resumed from ... step=<n>`` after a resume.

Test knob: ``DDP_JOB_KILL_RANK1_AT=S`` makes rank 1, while staging its checkpoint of step S,
write its files, remove one (a half-written staging) and SIGKILL itself before it asks for the
commit.
"""

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import hpc_ckpt


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    hpc_ckpt.seed_all(a.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4] * 3 + torch.randn(512, 4, generator=g)).argmax(dim=1)
    loader = hpc_ckpt.ResumableLoader(torch.utils.data.TensorDataset(x, y), 16, seed=a.seed,
                                      drop_last=True, rank=rank, world_size=world)
    torch.manual_seed(a.seed * 1000 + rank)  # this rank's dropout stream (saved per rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, loader=loader, every_steps=a.every,
                               total_steps=a.steps, config={"seed": a.seed, "steps": a.steps})
    kill_at = int(os.environ.get("DDP_JOB_KILL_RANK1_AT", "0"))
    if rank == 1 and kill_at:
        write = ck.write

        def write_then_die(d):
            write(d)
            if ck.step == kill_at:
                os.unlink(os.path.join(d, "rank_state.json"))
                os.kill(os.getpid(), signal.SIGKILL)
        ck.write = write_then_die

    step = ck.restore()
    if step and rank == 0:
        print(f"resumed from {ck.resume_from} at step={step} epoch={loader.epoch}", flush=True)
    while step < a.steps and not ck.should_stop():
        for xb, yb in loader:
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if rank == 0:
                print(f"step={step} loss={loss.item()!r}", flush=True)
            if a.step_delay:
                time.sleep(a.step_delay)
            ck.step_done(step, metrics={"loss": loss.item()})
            if step >= a.steps or ck.should_stop():
                break
    ck.finish()
    if rank == 0:
        print(f"agree_median_us={ck.agreement.median_us()}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # all committed; skip torch's seconds of interpreter teardown


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
