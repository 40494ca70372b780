"""One rank of examples/bench_allreduce.rs's Python baseline: torch.distributed's gloo all_reduce
(SUM) of the same tensor sizes, per tensor and as one flat buffer, timed like the Rust side.

    py_allreduce.py RANK WORLD PORT SIZES_JSON ROUNDS WARM OUT_JSON

SIZES_JSON: a JSON list of element counts (f32). Rank 0 writes {"connect_s", "per_tensor_s":
[...], "flat_s": [...]} to OUT_JSON.
"""

import json
import sys
import time

import torch
import torch.distributed as dist


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sizes = json.load(open(sys.argv[4]))
    rounds, warm, out = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    connect = time.perf_counter() - t0
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(n, generator=g) for n in sizes]
    flat = torch.randn(sum(sizes), generator=g)
    per, fl = [], []
    for i in range(warm + rounds):
        dist.barrier()
        t = time.perf_counter()
        for x in grads:
            dist.all_reduce(x)
        a = time.perf_counter() - t
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(flat)
        b = time.perf_counter() - t
        if i >= warm:
            per.append(a)
            fl.append(b)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"connect_s": connect, "per_tensor_s": per, "flat_s": fl}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
