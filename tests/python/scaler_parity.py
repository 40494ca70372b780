"""Reference runs of torch.amp.GradScaler for tests/it/train_precision.rs.

    scaler_parity.py CONFIGS_JSON OUT_DIR
        Creates a small model's parameters from a fixed seed (init.safetensors) and 40 steps of
        *scaled* gradients (grads.safetensors, `<step>.<param>`), some of them holding an inf or a
        NaN (the steps listed in BAD). For each config of CONFIGS_JSON ({"id": {"init_scale",
        "growth_factor", "backoff_factor", "growth_interval", "lr"}}) it runs, per step:
        p.grad = the step's gradient; scaler.unscale_(opt); scaler.step(opt); scaler.update() with torch.optim.SGD(lr, foreach=False) and
        torch.amp.GradScaler("cpu", ...), and saves OUT_DIR/<id>.safetensors: `scale` (float32
        [40], the scale after each update), `growth_tracker` (int32 [40]), `found_inf` (float32
        [40]: 1.0 where the step was skipped) and `param.<name>` (the final parameters).

One intra-op thread (results depend on the thread count).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

SEED = 4321
STEPS = 40
SHAPES = {"enc.weight": (33, 17), "enc.bias": (33,), "head.weight": (5, 33)}
# (step, param, value): non-finite gradients, as an fp16 backward overflow leaves them.
BAD = [(3, "enc.weight", float("inf")), (4, "head.weight", float("nan")),
       (5, "enc.bias", float("-inf")), (17, "enc.weight", float("nan")),
       (30, "head.weight", float("inf"))]


def make_inputs(out_dir):
    g = torch.Generator().manual_seed(SEED)
    init = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    grads = {}
    for k in range(STEPS):
        for n, s in SHAPES.items():
            # Scaled gradients over several decades (the scale is ~1e3..1e5).
            grads[f"{k}.{n}"] = torch.randn(s, generator=g) * torch.exp(2.0 * torch.randn(s, generator=g)) * 1000.0
    for k, n, v in BAD:
        grads[f"{k}.{n}"].view(-1)[k % grads[f"{k}.{n}"].numel()] = v
    save_file(init, os.path.join(out_dir, "init.safetensors"))
    save_file(grads, os.path.join(out_dir, "grads.safetensors"))
    return init, grads


def run(cfg, init, grads):
    params = [init[n].clone().requires_grad_(True) for n in SHAPES]
    opt = torch.optim.SGD(params, lr=cfg["lr"], foreach=False)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=cfg["init_scale"],
        growth_factor=cfg["growth_factor"],
        backoff_factor=cfg["backoff_factor"],
        growth_interval=cfg["growth_interval"],
    )
    scales, trackers, found = [], [], []
    for k in range(STEPS):
        for n, p in zip(SHAPES, params):
            p.grad = grads[f"{k}.{n}"].clone()
        scaler.scale(torch.zeros(()))  # as a loss would be: creates the scale on first use
        scaler.unscale_(opt)
        skipped = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        scaler.step(opt)
        scaler.update()
        scales.append(scaler._scale.item())
        trackers.append(int(scaler._growth_tracker.item()))
        found.append(float(skipped))
    out = {
        "scale": torch.tensor(scales, dtype=torch.float32),
        "growth_tracker": torch.tensor(trackers, dtype=torch.int32),
        "found_inf": torch.tensor(found, dtype=torch.float32),
    }
    for n, p in zip(SHAPES, params):
        out[f"param.{n}"] = p.detach().clone()
    return out


def main():
    torch.set_num_threads(1)
    configs = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    init, grads = make_inputs(out_dir)
    for cid, cfg in configs.items():
        out = run(cfg, init, grads)
        save_file(out, os.path.join(out_dir, f"{cid}.safetensors"))
        print(f"{cid}: {int(out['found_inf'].sum())} skipped, final scale {out['scale'][-1].item()}")


if __name__ == "__main__":
    main()
