#!/usr/bin/env python3
"""The GPU check's training job: a model on one device, preemption-proof through hpc_ckpt.

    hpc-ckpt wrap --run-dir R -- python3 tests/gpu/job.py --device cuda [--precision bf16]
        [--steps 60] [--every 10] [--width 256]

A small transformer-style block stack (LayerNorm, Linear, GELU, dropout, residual) trained with
AdamW and a linear warmup on synthetic data drawn from the seed, in bf16 autocast (fp32 master
weights) or fp32, with deterministic algorithms on. The dropout masks come from the device's
generator (CUDA's on a GPU), so a resume that did not restore it ends with other weights.
stdout: "step=<n> loss=<repr>" a step, "resumed from ... at step=<n>" after a resume, and
"final step=<n> loss=<repr>". Set CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts
(tests/gpu/check.sh does): deterministic cuBLAS needs it.
"""

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import hpc_ckpt

FEATURES, CLASSES, SAMPLES, BATCH, LR, WARMUP, DROPOUT = 64, 16, 2048, 32, 2e-3, 10, 0.1


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)
        self.drop = torch.nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


def build(width: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, width), *[Block(width) for _ in range(layers)],
                               torch.nn.LayerNorm(width), torch.nn.Linear(width, CLASSES))


def data(seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed + 7)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x @ teacher + 0.3 * torch.randn(SAMPLES, CLASSES, generator=g)).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="periodic checkpoint every N steps")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("job.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    hpc_ckpt.seed_all(a.seed)  # python, numpy, torch CPU and every CUDA device
    if dev.type == "cuda":
        torch.cuda.init()  # so the CUDA generators exist and are saved from the first checkpoint

    model = build(a.width, a.layers).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / WARMUP, total_iters=WARMUP)
    loader = hpc_ckpt.ResumableLoader(data(a.seed), BATCH, shuffle=True, seed=a.seed, drop_last=True)
    ck = hpc_ckpt.Checkpointer(
        model=model, optimizer=opt, scheduler=sched, loader=loader, every_steps=a.every,
        total_steps=a.steps, config={"seed": a.seed, "width": a.width, "layers": a.layers,
                                     "precision": a.precision, "device": dev.type})
    step = ck.restore()
    if step:
        print(f"resumed from {ck.resume_from} at step={step}", flush=True)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    model.train()
    while step < a.steps and not ck.should_stop():
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = loss.item()
            print(f"step={step} loss={value!r}", flush=True)
            ck.step_done(step, metrics={"loss": value})
            if step >= a.steps or ck.should_stop():
                break
    if ck.finish():
        print(f"final step={ck.step} loss={ck.metrics.get('loss', math.nan)!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
