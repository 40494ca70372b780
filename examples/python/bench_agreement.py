#!/usr/bin/env python3
"""What hpc_ckpt's stop agreement costs by itself: N back-to-back agreements (one
all_reduce(MAX) of two int32s each) between the ranks, with no training in between.

    hpc-ckpt wrap --ranks 2 -- .venv/bin/python examples/python/bench_agreement.py [--n 1000]

Rank 0 prints ``agreements=N median_us=… p90_us=… mean_us=…``. Inside a training loop the cost is
this plus the wait for the slowest rank (which the next gradient all_reduce would wait for
anyway); `examples/python/ddp_train.py --steps 1000 --checkpoint-every 0 [--no-stop-agreement]`
measures that.
"""

import argparse
import statistics
import sys

import torch.distributed as dist

import hpc_ckpt


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    ag = hpc_ckpt.StopAgreement(dist.get_world_size())
    for _ in range(50):  # warm-up
        ag.agree([0, 0])
    ag.seconds.clear()
    for _ in range(a.n):
        ag.agree([0, 0])
    us = sorted(1e6 * s for s in ag.seconds)
    if dist.get_rank() == 0:
        print(f"agreements={len(us)} median_us={statistics.median(us):.1f} "
              f"p90_us={us[int(0.9 * len(us))]:.1f} mean_us={statistics.fmean(us):.1f}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
