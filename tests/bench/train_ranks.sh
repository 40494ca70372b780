#!/usr/bin/env bash
# Scaling of the built-in trainer: steps/s of 1 rank vs 2 data-parallel ranks (c10d Gloo, local
# launcher, no Slurm) on the same job — same global batch, same steps.
#
#   tests/bench/train_ranks.sh [--config examples/jobs/gpt.yaml] [--steps 300] [--rounds 3]
#                              [--dir /tmp/train-ranks] [--bin target/release/hpc-ckpt]
#
# Each round, interleaved, three set-ups: 1 rank × 1 thread, 1 rank × 2 threads (libtorch's
# intra-op threads), 2 ranks × 1 thread (two `hpc-ckpt train-rank` processes). Each runs
# `hpc-ckpt wrap --ranks N -- train` on a fresh run dir with the config's model, data, batch and
# optimizer, max_steps overridden, no eval and one commit at the end. steps/s is taken from
# metrics.jsonl's timestamps between the 10th and the last step (start-up, the join and the
# final commit excluded). Prints one line per run and the medians.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CONFIG=examples/jobs/gpt.yaml STEPS=300 ROUNDS=3 DIR=/tmp/train-ranks BIN=target/release/hpc-ckpt
while (($#)); do
    case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    *) echo "usage: $0 [--config F] [--steps N] [--rounds N] [--dir DIR] [--bin PATH]" >&2; exit 2 ;;
    esac
done
[[ -x $BIN ]] || { echo "no binary at $BIN: cargo build --release (or --bin PATH)" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
mkdir -p "$DIR"

# job THREADS: the config without its run-time sections, with max_steps and THREADS; its path.
job() {
    local out=$DIR/job-t$1.yaml
    "$PY" - "$CONFIG" "$STEPS" "$1" "$out" <<'PYEOF'
import re, sys
src, steps, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
drop = {"max_steps", "epochs", "eval", "checkpoint", "run_dir", "distributed", "slurm",
        "threads", "device"}
lines, skipping = [], False
for line in open(src):
    if line.strip() and not line.startswith((" ", "\t", "#")):
        key = re.match(r"([A-Za-z_]+)", line)
        skipping = key is not None and key.group(1) in drop
    if not skipping:
        lines.append(line)
lines += [f"max_steps: {steps}\n", f"threads: {threads}\n", "device: cpu\n",
          "checkpoint: {every_steps: 1000000}\n"]
open(out, "w").writelines(lines)
PYEOF
    echo "$out"
}

# rate RUN_DIR: steps/s between step 10 and the last step of its metrics.jsonl.
rate() {
    "$PY" - "$1/metrics.jsonl" <<'PYEOF'
import json, sys
from datetime import datetime
pts = []
for line in open(sys.argv[1]):
    v = json.loads(line)
    pts.append((v["step"], datetime.fromisoformat(v["ts"].replace("Z", "+00:00")).timestamp()))
pts = [p for p in pts if p[0] >= 10]
(s0, t0), (s1, t1) = pts[0], pts[-1]
print(f"{(s1 - s0) / (t1 - t0):.2f}")
PYEOF
}

SETUPS=("1x1" "1x2" "2x1")
declare -A rates=()
for ((r = 1; r <= ROUNDS; r++)); do
    for s in "${SETUPS[@]}"; do
        w=${s%x*} t=${s#*x}
        run=$DIR/r$r-$s
        rm -rf "$run"
        HPC_CKPT_LOG=warn "$BIN" wrap --ranks "$w" --config "$(job "$t")" --run-dir "$run" -- train
        x=$(rate "$run")
        rates[$s]+="$x "
        echo "round $r, $w rank(s) x $t thread(s): $x steps/s"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for s in "${SETUPS[@]}"; do
    echo "median, ${s%x*} rank(s) x ${s#*x} thread(s): $(echo "${rates[$s]}" | median) steps/s"
done
