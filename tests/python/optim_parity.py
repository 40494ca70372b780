"""Reference runs of torch.optim for tests/optim_parity.rs (and its benchmark).

    optim_parity.py run CONFIGS_JSON OUT_DIR
        Creates a small model's parameters from a fixed seed (init.safetensors) and 20 steps of
        gradients (grads.safetensors, `<step>.<param>`; `head.bias` has no gradient for the first
        5 steps, so its state starts late, as in real training with frozen-then-unfrozen parts).
        For each config of CONFIGS_JSON ({"id": {"optimizer": {...hpc-ckpt OptimizerConfig...},
        "lrs": [lr per step]}}) it runs torch.optim with foreach=False and saves
        OUT_DIR/<id>.safetensors: `param.<name>` (final parameters) and `state.<name>.<key>`
        (optimizer.state[p], PyTorch's own keys).

    optim_parity.py bench N_PARAMS STEPS THREADS
        Times torch.optim.{SGD momentum, Adam, AdamW} (foreach=False and foreach=True) steps over
        a model of about N_PARAMS parameters; prints one JSON line per optimizer.

Everything runs with torch.set_num_threads(1) unless said otherwise (results depend on the
intra-op thread count).
"""

import json
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file

SEED = 1234
STEPS = 20
SHAPES = {
    "enc.weight": (33, 17),  # odd sizes: vectorised loops and their scalar tails
    "enc.bias": (33,),
    "head.weight": (5, 33),
    "head.bias": (5,),
}
LATE = ("head.bias", 5)  # (param, first step with a gradient)


def make_inputs(out_dir):
    g = torch.Generator().manual_seed(SEED)
    init = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    grads = {}
    for k in range(STEPS):
        for n, s in SHAPES.items():
            if n == LATE[0] and k < LATE[1]:
                continue
            # Magnitudes over several decades, so eps and the bias corrections matter.
            scale = torch.exp(2.0 * torch.randn(s, generator=g))
            grads[f"{k}.{n}"] = torch.randn(s, generator=g) * scale
    save_file(init, os.path.join(out_dir, "init.safetensors"))
    save_file(grads, os.path.join(out_dir, "grads.safetensors"))
    return init, grads


def build(cfg, params):
    kind = cfg["kind"]
    if kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            dampening=cfg["dampening"],
            nesterov=cfg["nesterov"],
            weight_decay=cfg["weight_decay"],
            foreach=False,
        )
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(
        params,
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        amsgrad=cfg["amsgrad"],
        foreach=False,
    )


def run(configs_path, out_dir):
    torch.set_num_threads(1)
    with open(configs_path) as f:
        configs = json.load(f)
    init, grads = make_inputs(out_dir)
    names = list(SHAPES)
    for cid, c in configs.items():
        params = [init[n].clone().requires_grad_(True) for n in names]
        opt = build(c["optimizer"], params)
        if len(c["lrs"]) != STEPS:
            raise SystemExit(f"{cid}: {len(c['lrs'])} lrs for {STEPS} steps")
        for k, lr in enumerate(c["lrs"]):
            for group in opt.param_groups:
                group["lr"] = lr
            for n, p in zip(names, params):
                g = grads.get(f"{k}.{n}")
                p.grad = None if g is None else g.clone()
            opt.step()
        out = {f"param.{n}": p.detach().clone() for n, p in zip(names, params)}
        for n, p in zip(names, params):
            for key, v in opt.state[p].items():
                if v is None:  # SGD without momentum keeps momentum_buffer = None
                    continue
                out[f"state.{n}.{key}"] = v.detach().clone()
        save_file(out, os.path.join(out_dir, f"{cid}.safetensors"))
    print(f"optim_parity.py: {len(configs)} configs x {STEPS} steps, torch {torch.__version__}")


def bench(n_params, steps, threads):
    torch.set_num_threads(threads)
    # Transformer-ish shapes: square matrices and vectors, about n_params in all.
    side = 1024
    n_mats = max(1, n_params // (side * side + side))
    shapes = [(side, side), (side,)] * n_mats
    g = torch.Generator().manual_seed(0)
    for name, make in [
        ("sgd_momentum", lambda ps, fe: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=fe)),
        ("adam", lambda ps, fe: torch.optim.Adam(ps, lr=1e-3, foreach=fe)),
        ("adamw", lambda ps, fe: torch.optim.AdamW(ps, lr=1e-3, foreach=fe)),
    ]:
        for foreach in (False, True):
            params = [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt = make(params, foreach)
            opt.step()  # state initialisation outside the timing
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            times.sort()
            print(json.dumps({
                "optimizer": name,
                "foreach": foreach,
                "params": sum(math.prod(s) for s in shapes),
                "threads": threads,
                "median_ms": 1000 * times[len(times) // 2],
                "min_ms": 1000 * times[0],
            }), flush=True)


def main(argv):
    if len(argv) == 4 and argv[1] == "run":
        run(argv[2], argv[3])
    elif len(argv) == 5 and argv[1] == "bench":
        bench(int(argv[2]), int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
