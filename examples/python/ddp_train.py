#!/usr/bin/env python3
"""A data-parallel (DDP, gloo on CPU) PyTorch job that speaks the hpc-ckpt child protocol per rank.

    hpc-ckpt wrap --ranks 2 -- .venv/bin/python examples/python/ddp_train.py [--steps N]
        [--checkpoint-every K] [--seed S] [--step-delay SECONDS]

or, under Slurm, a job config with `slurm.ntasks: 2` and this as its `command` (the supervisor
starts the ranks with `srun … hpc-ckpt rank -- CMD`). A 1-rank run needs no launcher at all.

An MLP (32 -> 64 -> 64 -> 10, ReLU, dropout) wrapped in DistributedDataParallel, AdamW, synthetic
classification data; each step takes a global batch of 64 samples from a permutation of
(seed, epoch) and rank r trains on samples r, r+W, r+2W, ... of it (its shard). An interrupted
run ends with the same bytes as an uninterrupted one of the same world size.

The protocol, per rank (README, "Multi-rank jobs"):
  HPC_CKPT_RANK / HPC_CKPT_WORLD_SIZE   this rank and the number of ranks
  HPC_CKPT_STAGING / HPC_CKPT_COMMIT_REQUEST   this rank's own staging dir and request
  HPC_CKPT_RESUME_FROM   the same committed checkpoint for every rank (unset: fresh start)
  HPC_CKPT_RESUME_WORLD_SIZE   how many ranks wrote it
  MASTER_ADDR / MASTER_PORT   torch.distributed's env:// rendezvous (set by the supervisor)

Replicated state (model, optimizer, counters) is staged by rank 0 alone; per-rank state (the
rank's torch RNG, which drives its dropout) by every rank. A committed checkpoint names rank r's
file NAME `rank<r:05d>.NAME`. Every rank asks for every commit with the same step; the
supervisor commits when all have asked.

Stopping: the signal (HPC_CKPT_SIGNAL, and TERM) only sets a local flag. At every step boundary
(every --agree-every steps) the ranks all_reduce(MAX) the flag, so they all stop after the same
step and none is left waiting in a collective; that agreement's cost is printed at the end
(`agree_us_per_step`). Having staged and asked, a stopping rank exits at once (os._exit): a
bare TERM leaves only Slurm's KillWait, and torch's interpreter teardown takes seconds.
Resuming with another world size: the replicated state and the data position (a global sample
index) load exactly; a rank with no saved RNG derives one from (seed, rank, step).
"""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FORMAT = "hpc-ckpt-example-ddp/1"
N_TRAIN = 2048
N_FEATURES = 32
N_CLASSES = 10
HIDDEN = 64
DROPOUT = 0.1
BATCH = 64  # global
LR = 3e-3
POLL_S = 0.02

_flag = {"stop": 0}


def log(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def on_signal(_signum, _frame):
    _flag["stop"] = 1


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


def optimizer_tensors(opt):
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"state.{idx}.{k}"] = v.detach().clone().contiguous()
    return out


def load_optimizer(opt, tensors):
    sd = opt.state_dict()
    state = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    sd["state"] = state
    opt.load_state_dict(sd)


def wait_ack(request):
    """Wait until the previous request is answered (staging is free again); its result."""
    while os.path.exists(request):
        time.sleep(POLL_S)
    try:
        with open(request + ".result") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_and_request(ctx, step):
    staging, request, rank = ctx["staging"], ctx["request"], ctx["rank"]
    res = wait_ack(request)
    if res is not None and not res.get("ok"):
        print(f"ddp_train.py rank {rank}: commit failed: {res.get('error')}", file=sys.stderr)
    if rank == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in ctx["model"].state_dict().items()},
                  os.path.join(staging, "model.safetensors"))
        save_file(optimizer_tensors(ctx["opt"]), os.path.join(staging, "optimizer.safetensors"))
        with open(os.path.join(staging, "trainer_state.json"), "w") as f:
            json.dump({"format": FORMAT, "global_step": step, "samples_seen": step * BATCH,
                       "config": ctx["config"],
                       "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                        for g in ctx["opt"].state_dict()["param_groups"]]}, f)
    save_file({"torch_cpu_rng": torch.get_rng_state()}, os.path.join(staging, "rng.safetensors"))
    with open(request + ".tmp", "w") as f:
        json.dump({"step": step, "epoch": step * BATCH // N_TRAIN}, f)
    os.replace(request + ".tmp", request)


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
    sig = os.environ.get("HPC_CKPT_SIGNAL", "USR1").upper()
    signal.signal(signal.Signals[sig if sig.startswith("SIG") else "SIG" + sig], on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)

    config = {"seed": args.seed, "steps": args.steps, "batch": BATCH, "lr": LR,
              "hidden": HIDDEN, "dropout": DROPOUT, "n_train": N_TRAIN}
    x, y = make_data(args.seed)
    torch.manual_seed(args.seed)
    model = MLP()  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    torch.manual_seed(args.seed * 7919 + rank)  # this rank's dropout stream
    step = 0
    src = os.environ.get("HPC_CKPT_RESUME_FROM")
    if src:
        with open(os.path.join(src, "rank00000.trainer_state.json")) as f:
            st = json.load(f)
        if st.get("format") != FORMAT or st.get("config") != config:
            raise SystemExit(f"ddp_train.py: {src} was written by another job config")
        step = st["global_step"]
        model.load_state_dict(load_file(os.path.join(src, "rank00000.model.safetensors")))
        load_optimizer(opt, load_file(os.path.join(src, "rank00000.optimizer.safetensors")))
        mine = os.path.join(src, f"rank{rank:05d}.rng.safetensors")
        saved_world = int(os.environ.get("HPC_CKPT_RESUME_WORLD_SIZE", "1"))
        if saved_world == world and os.path.exists(mine):
            torch.set_rng_state(load_file(mine)["torch_cpu_rng"])
        else:  # another world size: a fresh stream for this rank, derived from the step
            torch.manual_seed(args.seed * 7919 + rank + 1_000_003 * step)
        log(rank, f"resumed at step {step} (saved by {saved_world} ranks, now {world})")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ctx = {"staging": os.environ.get("HPC_CKPT_STAGING"),
           "request": os.environ.get("HPC_CKPT_COMMIT_REQUEST"),
           "rank": rank, "model": model, "opt": opt, "config": config}
    protocol = bool(ctx["staging"] and ctx["request"])

    per_epoch = N_TRAIN // BATCH
    agree_s, agreed = 0.0, 0
    last_saved = step
    flag = torch.zeros(1, dtype=torch.int32)
    started, first_step = time.perf_counter(), step
    while step < args.steps:
        if step % max(1, args.agree_every) == 0 and not args.no_stop_agreement:
            t = time.perf_counter()
            flag[0] = _flag["stop"]
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            agree_s += time.perf_counter() - t
            agreed += 1
        if flag.item():
            if protocol and last_saved != step:
                stage_and_request(ctx, step)
            log(rank, f"stopped at step {step}")
            # The kill is near (Slurm's KillWait after a TERM): everything is staged and asked
            # for, so skip the interpreter's teardown (seconds with torch loaded) and exit now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
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
        if protocol and (step == args.steps or
                         (args.checkpoint_every and step % args.checkpoint_every == 0)):
            stage_and_request(ctx, step)
            last_saved = step
    if protocol:
        wait_ack(ctx["request"])
    steps_run = max(1, step - first_step)
    log(rank, f"agree_us_per_step={1e6 * agree_s / max(1, agreed):.1f} "
              f"step_ms={1e3 * (time.perf_counter() - started) / steps_run:.3f} over {steps_run} steps")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
