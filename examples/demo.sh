#!/usr/bin/env bash
# The main job: a real PyTorch training run (examples/python/train.py: MLP, Adam, warmup +
# cosine, dropout, synthetic data from the seed) under the hpc-ckpt supervisor, no cluster needed.
# It is stopped once by the warning signal Slurm would send (USR1), checkpoints, and a second
# run resumes exactly where it stopped; then `status` shows the run and `verify` checks it.
#
# Usage: examples/demo.sh [RUN_DIR]   (default runs/demo; removed and recreated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${1:-runs/demo}
say() { printf '\n== %s\n' "$*"; }

say "building hpc-ckpt"
cargo build --release -q
B=target/release/hpc-ckpt
rm -rf "$RUN"

say "training under the supervisor; USR1 after ~6 s (as Slurm's --signal=B:USR1@LEAD would)"
$B wrap --config examples/jobs/python.yaml --run-dir "$RUN" &
pid=$!
sleep 6
kill -USR1 $pid
code=0; wait $pid || code=$?
echo "wrap exited with $code (11 = work left, not in a Slurm job: run the same command again)"

say "the same command again: resumes from the last checkpoint, trains to the end"
$B wrap --config examples/jobs/python.yaml --run-dir "$RUN"

say "hpc-ckpt status $RUN"
$B status "$RUN"
say "hpc-ckpt verify $RUN"
$B verify "$RUN"
