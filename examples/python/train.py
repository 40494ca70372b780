#!/usr/bin/env python3
"""A real PyTorch training job that speaks the hpc-ckpt child protocol (v1).

    hpc-ckpt wrap -- .venv/bin/python examples/python/train.py [--steps N]
        [--checkpoint-every K] [--seed S] [--threads T] [--step-delay SECONDS]
        [--eval-every E]

An MLP (32 -> 64 -> 64 -> 10, ReLU, dropout) trained with Adam and a
linear-warmup + cosine LR schedule (LambdaLR), batch 64, on synthetic
classification data generated from the seed. Resuming from a checkpoint is
exact: a run interrupted any number of times ends with the same bytes in
model.safetensors / optimizer.safetensors as an uninterrupted one, and prints
the same loss at every step.

Child protocol (v1), as implemented here
----------------------------------------
Environment:
  HPC_CKPT_RUN_DIR        run directory (only checked to exist; nothing is written there)
  HPC_CKPT_RESUME_FROM    committed checkpoint dir to resume from (unset: fresh start);
                          read-only; MANIFEST.json in it is ignored
  HPC_CKPT_STAGING        empty dir; new checkpoint files are written here (flat names)
  HPC_CKPT_COMMIT_REQUEST path of the commit request
  HPC_CKPT_SIGNAL         name of the "checkpoint and exit" signal (USR1, SIGUSR1, or a number)

Outside the wrapper (any of STAGING / COMMIT_REQUEST unset) the script trains
without checkpointing, so it can be run by hand.

Commit: files are written (and closed) in STAGING, then
{"step": N, "epoch": E, "metrics": {...}} goes to <request>.tmp, renamed to
<request>. Before staging the next checkpoint the script polls (20 ms) until
<request> is gone, then reads <request>.result (an error is logged, training
goes on). "epoch" is the number of completed epochs, i.e. the 0-based epoch
the next step belongs to. Metrics are finite floats only (no null/NaN/inf).

Checkpoint at step N = the state after N optimizer steps; resuming runs step
N+1 next (mid-epoch resumes continue at the exact next batch).

Signals: HPC_CKPT_SIGNAL and SIGTERM only set a flag. At the next step boundary
the script stages a checkpoint of the state after the last completed step,
requests the commit, and exits 0 without waiting for the acknowledgement
(it must still wait for an earlier request to be acknowledged, since STAGING
is not free before that). If the current state is already committed or
pending (no step since the last request or since the resume point) no new
request is written, it just exits 0. Exit 0 without having received a signal
means training is complete; the final checkpoint (at step --steps) is
requested and its acknowledgement awaited before that exit (a signal during
that wait makes it exit 0 at once, the request still pending). Resuming
from a checkpoint at the final step does no work, writes no request, prints
the final line and exits 0.

Checkpoint files:
  model.safetensors      model.state_dict()
  optimizer.safetensors  every per-parameter optimizer state tensor, "state.<idx>.<key>"
                         (exp_avg, exp_avg_sq, step -- step kept as its float32 0-dim tensor)
  rng.safetensors        "torch_cpu_rng": torch.get_rng_state() (uint8); the script uses
                         no Python `random` / numpy randomness, so none is saved
  trainer_state.json     format, config (validated on resume), counters (global_step,
                         epoch, step_in_epoch, samples_seen), last loss, last/best val loss
                         and step, optimizer param_groups, scheduler state_dict
Nothing is pickled.

stdout: "step=<n> loss=<repr(float)>" after every optimizer step, one line per
checkpoint request / result, and a final "final step=<n> loss=<repr(float)>".
"""

import argparse
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FORMAT = "hpc-ckpt-example-train/1"

# Data / model shape (part of the config checked on resume).
N_TRAIN = 4096
N_VAL = 1024
N_FEATURES = 32
N_CLASSES = 10
HIDDEN = 64
DROPOUT = 0.1
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 20
MIN_LR_FRACTION = 0.05

POLL_S = 0.02
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

_stop = {"signal": None}


def log(msg):
    print(msg, flush=True)


def err(msg):
    print(f"train.py: {msg}", file=sys.stderr, flush=True)


def _on_signal(signum, _frame):
    # Only set a flag; the training loop acts on it at the next step boundary.
    if _stop["signal"] is None:
        _stop["signal"] = signum


def parse_signal(name):
    name = name.strip()
    if name.isdigit():
        return signal.Signals(int(name))
    up = name.upper()
    if not up.startswith("SIG"):
        up = "SIG" + up
    try:
        return signal.Signals[up]
    except KeyError:
        raise SystemExit(f"train.py: unknown signal in HPC_CKPT_SIGNAL: {name!r}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="periodic checkpoint every K steps (0: only the final one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--eval-every", type=int, default=25,
                   help="validation loss every E steps (tracks the best metric)")
    a = p.parse_args(argv)
    if a.steps < 0 or a.checkpoint_every < 0 or a.threads < 1 or a.step_delay < 0 \
            or a.eval_every < 1:
        p.error("bad argument value")
    return a


# ----------------------------------------------------------------------------- model/data

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
    """Synthetic, learnable but noisy classification data, a pure function of the seed."""
    g = torch.Generator().manual_seed(seed * 2 + 1)
    teacher = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    n = N_TRAIN + N_VAL
    x = torch.randn(n, N_FEATURES, generator=g)
    logits = x @ teacher + 0.5 * torch.randn(n, N_CLASSES, generator=g)
    y = logits.argmax(dim=1)
    return x[:N_TRAIN].contiguous(), y[:N_TRAIN].contiguous(), \
        x[N_TRAIN:].contiguous(), y[N_TRAIN:].contiguous()


def epoch_order(seed, epoch):
    """Data order of one epoch: a permutation derived from (seed, epoch) only."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    return torch.randperm(N_TRAIN, generator=g)


def lr_lambda_for(total_steps):
    def f(step):  # step = number of scheduler.step() calls so far
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        span = max(1, total_steps - WARMUP_STEPS)
        t = min(1.0, (step - WARMUP_STEPS) / span)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def config_of(args):
    # What must match between a checkpoint and the run resuming from it. --threads,
    # --checkpoint-every, --step-delay and --eval-every are free to change (a different
    # thread count may change float reduction order, so it is only warned about).
    return {
        "seed": args.seed, "steps": args.steps, "n_train": N_TRAIN, "n_val": N_VAL,
        "features": N_FEATURES, "classes": N_CLASSES, "hidden": HIDDEN,
        "dropout": DROPOUT, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
        "warmup_steps": WARMUP_STEPS, "min_lr_fraction": MIN_LR_FRACTION,
        "optimizer": "Adam", "scheduler": "LambdaLR(linear warmup, cosine)",
        "torch": torch.__version__.split("+")[0],
    }


# ----------------------------------------------------------------------------- checkpoint I/O

def _json_clean(v):
    """param_groups / scheduler state -> JSON (tuples become lists; tensors refused)."""
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        raise TypeError("tensor in optimizer param_groups / scheduler state")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"non-finite float {v!r} in trainer state")
    return v


def optimizer_tensors(opt):
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"optimizer state {idx}.{key} is not a tensor")
            # clone: contiguous, owns its storage (save_file refuses shared storage)
            tensors[f"state.{idx}.{key}"] = val.detach().clone().contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(staging, model, opt, sched, counters, config):
    tensors, param_groups = optimizer_tensors(opt)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(staging, "model.safetensors"))
    save_file(tensors, os.path.join(staging, "optimizer.safetensors"))
    save_file({"torch_cpu_rng": torch.get_rng_state().clone()},
              os.path.join(staging, "rng.safetensors"))
    sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    state = {
        "format": FORMAT,
        "config": config,
        "counters": counters,
        "optimizer_param_groups": _json_clean(param_groups),
        "scheduler": _json_clean(sched_sd),
    }
    with open(os.path.join(staging, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")
    for name in os.listdir(staging):
        assert NAME_RE.match(name), name


def load_checkpoint(path, model, opt, sched, config):
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise SystemExit(f"train.py: {path}: unknown trainer_state format {state.get('format')!r}")
    saved = state["config"]
    diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if diff:
        raise SystemExit(f"train.py: checkpoint {path} was made with another config "
                         f"(saved, now): {diff}")

    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)

    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    per_param = {}
    for name, t in flat.items():
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = t
    groups = state["optimizer_param_groups"]
    for g in groups:  # JSON has no tuples; Adam's own state_dict has betas as a tuple
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    for idx, st in per_param.items():  # load_state_dict must keep `step` as saved (f32, 0-dim)
        got = opt.state[opt.param_groups[0]["params"][idx]]["step"]
        assert got.dtype == st["step"].dtype and got.shape == st["step"].shape

    sd = dict(state["scheduler"])
    sd["lr_lambdas"] = [None] * len(opt.param_groups)  # the lambdas are rebuilt from the config
    sched.load_state_dict(sd)

    rng = load_file(os.path.join(path, "rng.safetensors"))["torch_cpu_rng"]
    torch.set_rng_state(rng)  # last: building the model above consumed the RNG
    return state["counters"]


# ----------------------------------------------------------------------------- protocol

class Committer:
    def __init__(self, staging, request):
        self.staging = staging
        self.request = request
        self.pending_step = None   # step of our last request not yet acknowledged
        self.last_ok_step = None   # step of the last checkpoint known committed

    def _gone(self):
        return not os.path.lexists(self.request)

    def wait_ack(self, abort_on_signal=False):
        """Poll until the request file is gone; read our result. False if aborted."""
        while not self._gone():
            if abort_on_signal and _stop["signal"] is not None:
                return False
            time.sleep(POLL_S)
        if self.pending_step is not None:
            step, self.pending_step = self.pending_step, None
            try:
                with open(self.request + ".result") as f:
                    res = json.load(f)
            except (OSError, ValueError) as e:
                err(f"checkpoint step={step}: cannot read commit result: {e}")
                return True
            if res.get("ok") is True:
                self.last_ok_step = step
                log(f"checkpoint step={step} committed as {res.get('checkpoint')}")
            else:
                err(f"checkpoint step={step} NOT committed: {res.get('error')!r}")
        return True

    def covered(self, step):
        """Is the state at `step` already committed or pending commit?"""
        return step in (self.pending_step, self.last_ok_step)

    def request_commit(self, step, epoch, metrics, stage_fn, reason):
        self.wait_ack()  # STAGING is ours again only after the previous acknowledgement
        stage_fn(self.staging)
        tmp = self.request + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step, "epoch": epoch, "metrics": metrics}, f)
        os.rename(tmp, self.request)
        self.pending_step = step
        log(f"checkpoint step={step} epoch={epoch} requested ({reason})")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.use_deterministic_algorithms(True)

    env = os.environ
    staging = env.get("HPC_CKPT_STAGING")
    request = env.get("HPC_CKPT_COMMIT_REQUEST")
    resume = env.get("HPC_CKPT_RESUME_FROM") or None
    run_dir = env.get("HPC_CKPT_RUN_DIR")
    if run_dir and not os.path.isdir(run_dir):
        raise SystemExit(f"train.py: HPC_CKPT_RUN_DIR {run_dir!r} is not a directory")
    committer = Committer(staging, request) if staging and request else None
    if committer is None:
        err("HPC_CKPT_STAGING / HPC_CKPT_COMMIT_REQUEST not set: training without checkpoints")

    signal.signal(signal.SIGTERM, _on_signal)
    if env.get("HPC_CKPT_SIGNAL"):
        signal.signal(parse_signal(env["HPC_CKPT_SIGNAL"]), _on_signal)

    config = config_of(args)
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = make_data(args.seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(args.steps))
    steps_per_epoch = N_TRAIN // BATCH

    c = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "samples_seen": 0,
         "last_loss": None, "last_val_loss": None, "last_val_step": None,
         "best_val_loss": None, "best_val_step": None}
    if resume:
        c.update(load_checkpoint(resume, model, opt, sched, config))
        if committer:
            committer.last_ok_step = c["global_step"]
        log(f"resumed from {resume} at step={c['global_step']} epoch={c['epoch']} "
            f"step_in_epoch={c['step_in_epoch']}")

    def metrics():
        m = {"loss": c["last_loss"], "lr": opt.param_groups[0]["lr"],
             "val_loss": c["last_val_loss"], "best_val_loss": c["best_val_loss"],
             "samples_seen": c["samples_seen"]}
        return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(v)}

    def checkpoint(reason):
        snapshot = json.loads(json.dumps(c))
        committer.request_commit(
            c["global_step"], c["epoch"], metrics(),
            lambda d: save_checkpoint(d, model, opt, sched, snapshot, config), reason)

    def stop_requested():
        if _stop["signal"] is None:
            return False
        if committer is None:
            return True
        name = signal.Signals(_stop["signal"]).name
        if committer.covered(c["global_step"]):
            log(f"{name}: state at step={c['global_step']} already committed/pending; exiting")
        else:
            checkpoint(f"signal {name}")
        return True

    order = epoch_order(args.seed, c["epoch"]) if c["global_step"] < args.steps else None
    model.train()
    while c["global_step"] < args.steps:
        if stop_requested():
            return 0
        i = c["step_in_epoch"] * BATCH
        idx = order[i:i + BATCH]
        xb, yb = x_train[idx], y_train[idx]

        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()

        c["global_step"] += 1
        c["step_in_epoch"] += 1
        c["samples_seen"] += BATCH
        c["last_loss"] = loss.item()
        if c["step_in_epoch"] == steps_per_epoch:
            c["epoch"] += 1
            c["step_in_epoch"] = 0
            order = epoch_order(args.seed, c["epoch"])
        log(f"step={c['global_step']} loss={c['last_loss']!r}")

        if c["global_step"] % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                vl = F.cross_entropy(model(x_val), y_val).item()
            model.train()
            c["last_val_loss"], c["last_val_step"] = vl, c["global_step"]
            if c["best_val_loss"] is None or vl < c["best_val_loss"]:
                c["best_val_loss"], c["best_val_step"] = vl, c["global_step"]

        if args.step_delay > 0:
            end = time.monotonic() + args.step_delay
            while _stop["signal"] is None and time.monotonic() < end:
                time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))

        if committer and c["global_step"] < args.steps and args.checkpoint_every \
                and c["global_step"] % args.checkpoint_every == 0:
            if stop_requested():  # one checkpoint serves both, then exit
                return 0
            checkpoint("periodic")

    # Training complete.
    if committer and not committer.covered(c["global_step"]):
        if stop_requested():
            return 0
        checkpoint("final")
    if committer and not committer.wait_ack(abort_on_signal=True):
        log("signal while waiting for the final acknowledgement; exiting (request pending)")
        return 0
    log(f"final step={c['global_step']} loss={c['last_loss']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
