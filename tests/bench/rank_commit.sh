#!/usr/bin/env bash
# Commit time of a 2-rank checkpoint against a 1-rank one of the same total size.
#
#   tests/bench/rank_commit.sh [--mib 512] [--rounds 3] [--dir /tmp/rank-commit] [--bin target/release/hpc-ckpt]
#
# Each round, interleaved: `hpc-ckpt wrap --ranks 1` with a child that stages one file of MIB MiB,
# then `hpc-ckpt wrap --ranks 2` with ranks that stage MIB/2 MiB each (the local launcher, no
# Slurm). Each child asks for the commit of step 1 and waits for the answer. The commit's own
# time is the journal's `checkpoint_committed.seconds` (from the last rank's request to the
# pointer's move: checksums, fsync, renames). Prints one line per commit and the medians.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MIB=512 ROUNDS=3 DIR=/tmp/rank-commit BIN=target/release/hpc-ckpt
while (($#)); do
    case $1 in
    --mib) MIB=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    *) echo "usage: $0 [--mib N] [--rounds N] [--dir DIR] [--bin PATH]" >&2; exit 2 ;;
    esac
done
[[ -x $BIN ]] || { echo "no binary at $BIN: cargo build --release (or --bin PATH)" >&2; exit 2; }

# The child: rank r of w stages MIB/w MiB of non-constant bytes, asks, waits.
CHILD='set -e
n=$((MIB / ${HPC_CKPT_WORLD_SIZE:-1}))
head -c $((n << 20)) /dev/urandom > "$HPC_CKPT_STAGING/shard.bin"
printf "{\"step\": 1}" > "$HPC_CKPT_COMMIT_REQUEST.tmp"
mv "$HPC_CKPT_COMMIT_REQUEST.tmp" "$HPC_CKPT_COMMIT_REQUEST"
while [ ! -e "$HPC_CKPT_COMMIT_REQUEST.result" ]; do sleep 0.01; done'

declare -A times=([1]="" [2]="")
for ((r = 1; r <= ROUNDS; r++)); do
    for w in 1 2; do
        run=$DIR/r$r-w$w
        rm -rf "$run"
        mkdir -p "$DIR"
        MIB=$MIB HPC_CKPT_LOG=warn "$BIN" wrap --run-dir "$run" --ranks "$w" -- bash -c "$CHILD"
        s=$(grep "\"checkpoint_committed\"" "$run/journal.jsonl" | sed -n "s/.*\"seconds\":\([0-9.e-]*\).*/\1/p" | tail -n 1)
        [[ -n $s ]] || { echo "no commit in $run: see $run/journal.jsonl" >&2; exit 1; }
        printf 'round %d  ranks %d  %d MiB  commit %.3f s\n' "$r" "$w" "$MIB" "$s"
        times[$w]+="$s "
        rm -rf "$run"
    done
done
for w in 1 2; do
    # shellcheck disable=SC2086
    printf 'median commit, %d rank(s): %s s\n' "$w" "$(printf '%s\n' ${times[$w]} | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
