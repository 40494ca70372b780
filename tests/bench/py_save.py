#!/usr/bin/env python3
"""Baseline for hpc-ckpt's save benchmarks: how long Python takes to write a
state dict with torch.save or safetensors, up to and including fsync.

    .venv/bin/python tests/bench/py_save.py --method {torch,safetensors} \
        --out FILE [--tensors 64] [--mib 16] [--seed 0]

Builds N float32 tensors of M MiB each, named ``layer.{i}.weight`` and filled
with deterministic non-zero data (seeded uniform values in [0.5, 1.5)), all
BEFORE the clock starts. Then times only the save:

  torch:        open(FILE, "wb") + torch.save(state, f) + f.flush() + os.fsync(f)
  safetensors:  safetensors.torch.save_file(state, FILE) + open(FILE) + os.fsync

(opening/creating FILE is inside the timed region for both methods so they are
measured alike). Prints exactly one JSON line on stdout:

  {"method": "...", "bytes": <size of FILE>, "seconds": <save + fsync>}

FILE is left in place; the caller deletes it. Both methods need torch
(install it with tests/setup-python.sh --torch).
"""
import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, choices=("torch", "safetensors"))
    ap.add_argument("--out", required=True, help="file to write (left in place)")
    ap.add_argument("--tensors", type=int, default=64, help="number of tensors (default 64)")
    ap.add_argument("--mib", type=int, default=16, help="MiB per tensor (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    args = ap.parse_args()
    if args.tensors < 1 or args.mib < 1:
        ap.error("--tensors and --mib must be >= 1")

    try:
        import torch
    except ImportError as e:
        print(
            f"py_save.py: torch is required for --method {args.method} but cannot be imported ({e}); "
            "run tests/setup-python.sh --torch and use .venv/bin/python",
            file=sys.stderr,
        )
        return 2
    if args.method == "safetensors":
        try:
            import safetensors.torch
        except ImportError as e:
            print(
                f"py_save.py: safetensors cannot be imported ({e}); run tests/setup-python.sh",
                file=sys.stderr,
            )
            return 2

    # --- build the state (not timed) -----------------------------------------
    numel = args.mib * 1024 * 1024 // 4  # float32
    gen = torch.Generator().manual_seed(args.seed)
    state = {}
    for i in range(args.tensors):
        t = torch.rand(numel, dtype=torch.float32, generator=gen)
        t.add_(0.5)  # [0.5, 1.5): never zero
        state[f"layer.{i}.weight"] = t

    # --- timed save ------------------------------------------------------------
    out = args.out
    if args.method == "torch":
        t0 = time.perf_counter()
        with open(out, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        safetensors.torch.save_file(state, out)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0

    print(json.dumps({"method": args.method, "bytes": os.path.getsize(out), "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
