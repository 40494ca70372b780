#!/usr/bin/env bash
# The main job: a real training run of the built-in trainer (a small char-level GPT on the
# embedded text, examples/jobs/demo.yaml) under the supervisor, no cluster needed. It gets the
# warning signal Slurm would send (USR1) after a few seconds: checkpoint at the next step
# boundary, exit 11 ("work left; not in a Slurm job: run again"). The same command resumes
# exactly where it stopped and trains to the end; then `status` and `verify`.
#
# Usage: examples/demo.sh [RUN_DIR]   (default runs/demo; removed and recreated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${1:-runs/demo}
say() { printf '\n== %s\n' "$*"; }

say "building hpc-ckpt (release, with the built-in trainer)"
cargo build --release -q
B=target/release/hpc-ckpt
rm -rf "$RUN"

say "hpc-ckpt train --config examples/jobs/demo.yaml; USR1 after 4 s"
$B train --config examples/jobs/demo.yaml --run-dir "$RUN" &
pid=$!
sleep 4
kill -USR1 $pid 2>/dev/null || true
code=0; wait $pid || code=$?
echo "train exited with $code (11: work left, not in a Slurm job; 0: it had already finished)"

say "the same command again: resumes from the last checkpoint, trains to the end"
$B train --config examples/jobs/demo.yaml --run-dir "$RUN"

say "hpc-ckpt status $RUN"
$B status "$RUN"
say "hpc-ckpt verify $RUN"
$B verify "$RUN"
say "the last metrics"
tail -n 3 "$RUN/metrics.jsonl"
