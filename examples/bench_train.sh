#!/usr/bin/env bash
# Benchmark: training speed of the built-in trainer (`hpc-ckpt train`, libtorch through tch) vs
# the same model, optimizer, batch and thread count in eager PyTorch on the same libtorch
# (tests/bench/py_train.py), for mlp and gpt; plus the cost of checkpointing every 100 steps.
#
# Usage: examples/bench_train.sh
#   env: ROUNDS (default 3), THREADS (default "1 2"), MLP_STEPS (1500), GPT_STEPS (300),
#        MLP_WARM (100), GPT_WARM (30), PY (default .venv/bin/python, torch 2.13 as pinned)
#
# Each round runs, per model and thread count, interleaved (order rotated every round):
#   ours/off   the trainer with checkpoint.every_steps > max_steps (only the final checkpoint,
#              which comes after the last timed step and is not counted);
#   ours/100   the same job with checkpoint.every_steps: 100;
#   python     tests/bench/py_train.py with the same settings.
# Ours is timed from the run dir's metrics.jsonl: steps/s = STEPS / (ts of the last step − ts of
# step WARM) — wall clock between step ends, so it includes everything the loop does between
# steps (metrics line, checkpoints) but not start-up or the final checkpoint. Python times
# STEPS steps after WARM untimed ones with perf_counter.
# Checkpoint overhead (% of training time), two estimates:
#   in-run:    in ours/100, the extra time of the step gaps that contain a commit (gap − that
#              step's compute time from samples_per_s − the mean gap overhead of other steps),
#              over the rest of the timed span;
#   cross-run: median steps/s of ours/off ÷ median of ours/100 − 1.
# Prints a markdown table per thread count (medians over rounds) and every raw number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"1 2"}
MLP_WARM=${MLP_WARM:-100}
MLP_STEPS=${MLP_STEPS:-1500}
GPT_WARM=${GPT_WARM:-30}
GPT_STEPS=${GPT_STEPS:-300}
PY=${PY:-.venv/bin/python}

echo "== cargo build --release" >&2
cargo build --release -q
B=target/release/hpc-ckpt
"$PY" -c 'import torch; print("python torch", torch.__version__)' >&2

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench_train.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
RESULTS=$TMP/results.jsonl

# A fixed text for gpt (deterministic; ~200k characters, 59 distinct): both sides read it, so
# the vocabulary (the head's size) is the same.
"$PY" - "$TMP/text.txt" <<'EOF'
import random, sys
r = random.Random(0)
words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(3000)]
out, n = [], 0
while n < 200_000:
    s = " ".join(r.choice(words) for _ in range(r.randint(5, 15))).capitalize()
    s += r.choice(".,;!?") + r.choice([" ", "\n"])
    out.append(s)
    n += len(s)
open(sys.argv[1], "w", encoding="utf-8").write("".join(out))
EOF

warm_of() { if [ "$1" = mlp ]; then echo "$MLP_WARM"; else echo "$GPT_WARM"; fi; }
steps_of() { if [ "$1" = mlp ]; then echo "$MLP_STEPS"; else echo "$GPT_STEPS"; fi; }

# job MODEL THREADS EVERY FILE
job() {
    local model=$1 threads=$2 every=$3 file=$4
    local total=$(($(warm_of "$model") + $(steps_of "$model")))
    {
        echo "name: bench-$model"
        echo "checkpoint: {every_steps: $every, keep_last: 3}"
        echo "seed: 0"
        echo "threads: $threads"
        echo "max_steps: $total"
        echo "scheduler: {kind: cosine, warmup_steps: 50}"
        if [ "$model" = mlp ]; then
            echo "model: {kind: mlp, hidden: [512, 512], dropout: 0.1}"
            echo "data: {kind: synthetic, samples: 4096, features: 32, classes: 10}"
            echo "batch_size: 64"
            echo "optimizer: {kind: adam, lr: 0.001}"
        else
            echo "model: {kind: gpt, layers: 2, heads: 4, d_model: 128, context: 64, dropout: 0.1}"
            echo "data: {kind: text, path: $TMP/text.txt}"
            echo "batch_size: 16"
            echo "grad_clip: 1.0"
            echo "optimizer: {kind: adamw, lr: 0.0006, betas: [0.9, 0.95], weight_decay: 0.1}"
        fi
    } >"$file"
}

# ours MODEL THREADS VARIANT(off|100) ROUND: one run, appends a result line.
ours() {
    local model=$1 threads=$2 variant=$3 round=$4
    local every total dir
    total=$(($(warm_of "$model") + $(steps_of "$model")))
    if [ "$variant" = off ]; then every=$((total * 10)); else every=100; fi
    dir=$TMP/run-$model-$threads-$variant-$round
    job "$model" "$threads" "$every" "$TMP/job.yaml"
    "$B" train --config "$TMP/job.yaml" --run-dir "$dir" >"$TMP/train.log" 2>&1 ||
        { cat "$TMP/train.log" >&2; exit 1; }
    "$PY" - "$dir/metrics.jsonl" "$model" "$threads" "$variant" "$round" \
        "$(warm_of "$model")" "$(steps_of "$model")" >>"$RESULTS" <<'EOF'
import datetime, json, statistics, sys
path, model, threads, variant, rnd, warm, steps = sys.argv[1:]
warm, steps = int(warm), int(steps)
rows = {r["step"]: r for r in map(json.loads, open(path))}
ts = lambda s: datetime.datetime.fromisoformat(rows[s]["ts"].replace("Z", "+00:00")).timestamp()
batch = 64 if model == "mlp" else 16
step_s = {s: batch / rows[s]["metrics"]["samples_per_s"] for s in rows}
span = ts(warm + steps) - ts(warm)
out = {"side": "ours", "variant": variant, "model": model, "threads": int(threads), "round": int(rnd),
       "steps_per_s": steps / span,
       "step_ms_median": 1e3 * statistics.median(step_s[s] for s in range(warm + 1, warm + steps + 1))}
if variant != "off":
    # gap k = ts(k) − ts(k−1) holds step k, plus the commit of step k−1 when k−1 % 100 == 0
    ck = [k for k in range(warm + 1, warm + steps + 1) if (k - 1) % 100 == 0]
    other = [k for k in range(warm + 1, warm + steps + 1) if (k - 1) % 100 != 0]
    base = statistics.mean(ts(k) - ts(k - 1) - step_s[k] for k in other)
    extra = sum(ts(k) - ts(k - 1) - step_s[k] - base for k in ck)
    out.update(commits=len(ck), commit_ms_mean=1e3 * extra / max(len(ck), 1),
               overhead_pct=100 * extra / (span - extra))
print(json.dumps(out))
EOF
    rm -rf "$dir"
}

# python MODEL THREADS ROUND
python_side() {
    local model=$1 threads=$2 round=$3 extra=()
    local warm steps
    warm=$(warm_of "$model")
    steps=$(steps_of "$model")
    [ "$model" = gpt ] && extra=(--text "$TMP/text.txt" --grad-clip 1.0)
    "$PY" tests/bench/py_train.py --model "$model" --threads "$threads" --warmup "$warm" \
        --steps "$steps" --warmup-lr-steps 50 "${extra[@]}" |
        "$PY" -c 'import json,sys; d=json.load(sys.stdin); d.update(side="python", variant="-", round=int(sys.argv[1])); print(json.dumps(d))' "$round" \
            >>"$RESULTS"
}

for threads in $THREADS; do
    for round in $(seq 1 "$ROUNDS"); do
        for model in mlp gpt; do
            echo "== threads $threads, round $round/$ROUNDS, $model" >&2
            case $((round % 3)) in
                1) ours "$model" "$threads" off "$round"; python_side "$model" "$threads" "$round"; ours "$model" "$threads" 100 "$round" ;;
                2) python_side "$model" "$threads" "$round"; ours "$model" "$threads" 100 "$round"; ours "$model" "$threads" off "$round" ;;
                0) ours "$model" "$threads" 100 "$round"; ours "$model" "$threads" off "$round"; python_side "$model" "$threads" "$round" ;;
            esac
        done
    done
done

"$PY" - "$RESULTS" <<'EOF'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
print("\nraw (steps/s per round):")
for r in rs:
    extra = f"  overhead {r['overhead_pct']:.2f}% ({r['commits']} commits, {r['commit_ms_mean']:.1f} ms each)" if "overhead_pct" in r else ""
    step = f"  step median {r['step_ms_median']:.3f} ms" if "step_ms_median" in r else ""
    print(f"  threads {r['threads']} {r['model']:3} round {r['round']} {r['side']:6} {r['variant']:3} {r['steps_per_s']:8.2f}{step}{extra}")
for t in sorted({r["threads"] for r in rs}):
    print(f"\n### threads: {t}\n")
    print("| model | ours steps/s (median) | python steps/s (median) | ratio ours/python | ours steps/s, ckpt every 100 | checkpoint overhead % (in-run; cross-run) | spread (max/min−1) ours; python |")
    print("|---|---|---|---|---|---|---|")
    for m in ("mlp", "gpt"):
        sel = lambda side, var: [r for r in rs if r["threads"] == t and r["model"] == m and r["side"] == side and r["variant"] == var]
        off, ck, py = sel("ours", "off"), sel("ours", "100"), sel("python", "-")
        if not (off and ck and py):
            continue
        o, c, p = (med(r["steps_per_s"] for r in x) for x in (off, ck, py))
        inrun = med(r["overhead_pct"] for r in ck)
        spread = lambda x: max(r["steps_per_s"] for r in x) / min(r["steps_per_s"] for r in x) - 1
        print(f"| {m} | {o:.1f} | {p:.1f} | {o / p:.3f} | {c:.1f} | {inrun:.2f}; {100 * (o / c - 1):.2f} | {100 * spread(off):.1f}%; {100 * spread(py):.1f}% |")
EOF
