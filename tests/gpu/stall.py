#!/usr/bin/env python3
"""The GPU check's save-stall figure: hpc_ckpt's async save against dcp.async_save, one process.

    hpc-ckpt wrap --run-dir R -- python3 tests/gpu/stall.py --device cuda --state-gb 2.4 \
        --rounds 3 --plain DIR

Builds Linear(width, width) layers on the device with AdamW state (parameters + two moments, fp32)
of about `--state-gb` GB, trains one step, then `--rounds` times, interleaved: (1)
`hpc_ckpt.Checkpointer(dcp=True, async_save=True).save()` — the copy into reused (pinned, on CUDA)
host buffers, then DCP writes and the supervisor commits in the background; (2) plain
`dcp.async_save` of the same state into DIR. Stall: how long the call blocked the training
thread; durable: until the files are durable (the commit answered / the future done). One
training step runs between saves. Prints one line "STALL <json>" with every figure. A benchmark,
not a test: nothing is asserted.
"""

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import hpc_ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--state-gb", type=float, default=2.4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plain", required=True, help="where dcp.async_save writes")
    a = p.parse_args()
    dev = torch.device(a.device)
    # DCP plans through a process group; one rank of gloo (CPU staging) is enough here.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)

    # AdamW holds 3 fp32 copies of every parameter: 12 bytes a parameter.
    width = 4096 if a.state_gb >= 1 else 1024
    layers = max(1, round(a.state_gb * 1e9 / (12 * width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, width, device=dev)

    def train() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train()
    state_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    state_bytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                       if torch.is_tensor(v))
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, dcp=True, async_save=True, verbose=False)
    rows = {"hpc_ckpt_async": [], "dcp_async_save": []}
    for r in range(a.rounds):
        t0 = time.perf_counter()
        ck.step = r + 1
        ck.save(reason="bench")
        stall = time.perf_counter() - t0
        ck.session.wait()
        rows["hpc_ckpt_async"].append({"stall": stall, "durable": time.perf_counter() - t0})
        train()

        t0 = time.perf_counter()
        fut = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()},
                             checkpoint_id=os.path.join(a.plain, f"save-{r}"))
        stall = time.perf_counter() - t0
        getattr(fut, "upload_completion", fut).result()
        rows["dcp_async_save"].append({"stall": stall, "durable": time.perf_counter() - t0})
        train()
    ck.close()
    print("STALL " + json.dumps({"state_bytes": state_bytes, "layers": layers, "width": width,
                                 "device": str(dev), "rows": rows}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
