#!/usr/bin/env python3
"""Benchmark: saving a sharded (FSDP2) state of >= 500 MB from 2 ranks, four ways, interleaved.

    .venv/bin/python tests/bench/dcp_saves.py [--rounds 3] [--saves 3] [--width 4096] [--layers 3]

Each round runs, in turn, one 2-rank job per mode under `hpc-ckpt wrap --ranks 2` (the
supervisor starts the ranks and, for the hpc_ckpt modes, commits); every job trains one step,
then `--saves` times: saves, waits until durable, trains one step. Modes:

- ``hpc_ckpt``: ``Checkpointer.save()`` (dcp.save into the rank's staging), durable = the
  supervisor's commit answered (adopted, checksummed, fsynced, renamed, pointer moved);
- ``hpc_ckpt_async``: the same with ``async_save=True`` (dcp.async_save, then the commit);
- ``dcp``: plain ``dcp.save`` into a directory (DCP fsyncs its files);
- ``dcp_async``: plain ``dcp.async_save`` (default group), durable = its future done.

Stall: how long training was blocked by the save call (rank 0). Durable: from the call until the
checkpoint is durable. Prints one table of medians over every save of every round, and writes
the raw figures as JSON (``--json``). A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("hpc_ckpt", "hpc_ckpt_async", "dcp", "dcp_async")


def rank_main(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import hpc_ckpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(a.width, a.width) for _ in range(a.layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, a.width)

    def train() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train()
    ck = None
    if a.mode.startswith("hpc_ckpt"):
        ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, async_save=a.mode.endswith("async"),
                                   verbose=False)
    rows = []
    for i in range(a.saves):
        dist.barrier()
        t0 = time.perf_counter()
        if ck is not None:
            ck.step = i + 1
            ck.save(reason="bench")
            stall = time.perf_counter() - t0
            ck.session.wait()
        else:
            target = os.path.join(a.out, f"save-{i}")  # one directory for the save, as DCP expects
            msd, osd = get_state_dict(model, opt)
            if a.mode == "dcp":
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=target)
                stall = time.perf_counter() - t0
            else:
                fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=target)
                stall = time.perf_counter() - t0
                getattr(fut, "upload_completion", fut).result()
        durable = time.perf_counter() - t0
        dist.barrier()
        rows.append({"stall": stall, "durable": durable})
        train()
    if ck is not None:
        ck.close()
    if rank == 0:
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        state = sum(local(t).numel() * t.element_size() for t in
                    [p for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()
                                                       if torch.is_tensor(v)])
        print("BENCH " + json.dumps({"mode": a.mode, "rows": rows, "state_bytes_rank0": state,
                                     "world": world}), flush=True)
    dist.barrier()
    os._exit(0)


def driver(a: argparse.Namespace) -> None:
    binary = os.environ.get("HPC_CKPT_BIN") or os.path.join(REPO, "target", "release", "hpc-ckpt")
    if not os.path.exists(binary):
        binary = os.path.join(REPO, "target", "debug", "hpc-ckpt")
    modes = [m for m in a.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        sys.exit(f"--modes: unknown {bad}; known: {', '.join(MODES)}")
    results = {m: [] for m in modes}
    info = {}
    root = tempfile.mkdtemp(prefix="dcp-bench-", dir=a.dir)
    try:
        for r in range(a.rounds):
            for mode in modes:
                d = os.path.join(root, f"{mode}-{r}")
                os.makedirs(os.path.join(d, "plain"))
                cmd = [binary, "wrap", "--ranks", "2", "--run-dir", os.path.join(d, "run"), "--",
                       sys.executable, os.path.abspath(__file__), "--rank", "--mode", mode,
                       "--saves", str(a.saves), "--width", str(a.width), "--layers", str(a.layers),
                       "--out", os.path.join(d, "plain")]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BENCH ")), None)
                if line is None:
                    sys.exit(f"{mode} round {r}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
                rec = json.loads(line[6:])
                results[mode].extend(rec["rows"])
                info = {"state_bytes_rank0": rec["state_bytes_rank0"], "world": rec["world"]}
                shutil.rmtree(d)
                print(f"round {r + 1}/{a.rounds} {mode}: " + ", ".join(
                    f"{x['stall']:.3f}/{x['durable']:.3f}" for x in rec["rows"]), file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = info["state_bytes_rank0"] * info["world"]
    print(f"\nsharded state: {total / 1e6:.0f} MB over {info['world']} ranks "
          f"({a.layers} x Linear({a.width}, {a.width}) + AdamW), {a.rounds} rounds x {a.saves} saves")
    print(f"{'mode':<16} {'stall median s':>15} {'durable median s':>17}")
    for m in modes:
        st = statistics.median(x["stall"] for x in results[m])
        du = statistics.median(x["durable"] for x in results[m])
        print(f"{m:<16} {st:>15.3f} {du:>17.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    p.add_argument("--dir", default=None, help="where runs are written (default: $TMPDIR)")
    p.add_argument("--json", default=None, help="write the raw figures here")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank:
        rank_main(a)
    else:
        driver(a)


if __name__ == "__main__":
    main()
