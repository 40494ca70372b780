#!/usr/bin/env bash
# The store demo (the README's main job until the built-in trainer lands): commits a training
# state every "100 steps" with retention, SIGKILLs a commit in the middle of its write, corrupts
# the newest checkpoint on purpose, and shows that `status`/`verify` report it and that a resume
# would fall back to the newest checkpoint that verifies. Nothing here needs a cluster.
#
# Usage: examples/demo.sh [RUN_DIR]   (default runs/demo; removed and recreated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${1:-runs/demo}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building hpc-ckpt (release, no libtorch needed for the store)"
cargo build --release --no-default-features -q
B=target/release/hpc-ckpt

rm -rf "$RUN" "$RUN.src"
mkdir -p "$RUN.src"
state() { # a stand-in training state: 48 MiB of "weights", 16 of "optimizer", JSON counters
    head -c $((48 << 20)) /dev/urandom >"$RUN.src/model.bin"
    head -c $((16 << 20)) /dev/urandom >"$RUN.src/optimizer.bin"
    printf '{"global_step": %d, "epoch": %d}\n' "$1" "$2" >"$RUN.src/trainer_state.json"
}

say "committing steps 100..400 (keep the last 2 and the best by val_loss)"
for step in 100 200 300 400; do
    state $step $((step / 200))
    loss=$(awk -v s=$step 'BEGIN { printf "%.3f", 1.0 / (1 + s / 100) + (s == 200 ? -0.2 : 0) }')
    $B commit --run-dir "$RUN" --step $step --epoch $((step / 200)) --metric val_loss="$loss" \
        --keep-last 2 --keep-best val_loss:min "$RUN.src"
done

say "step 500: SIGKILL in the middle of the commit"
state 500 2
$B commit --run-dir "$RUN" --step 500 --keep-last 2 --keep-best val_loss:min "$RUN.src" &
pid=$!
sleep 0.02
kill -9 $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
echo "last_checkpoint -> $(cat "$RUN/last_checkpoint")"
$B status "$RUN"

say "flip one byte of the newest checkpoint's weights"
newest=$(cat "$RUN/last_checkpoint")
printf 'X' | dd of="$RUN/checkpoints/$newest/model.bin" bs=1 seek=12345 conv=notrunc status=none
$B status "$RUN" || true
echo
$B verify "$RUN" && echo "verify: all good" || echo "verify exit code: $? (3 = a checkpoint is corrupt)"

say "the next writer cleans the interrupted write's temp dir and commits step 500"
$B commit --run-dir "$RUN" --step 500 --metric val_loss=0.15 --keep-last 2 --keep-best val_loss:min "$RUN.src"
$B status "$RUN"
rm -rf "$RUN.src"
