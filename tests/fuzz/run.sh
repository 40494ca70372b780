#!/usr/bin/env bash
# Local fuzzing of hpc-ckpt's untrusted-input parsers (not for CI).
#
#   tests/fuzz/run.sh [RUNS]        # each target for RUNS executions (default 1000000)
#
# Environment:
#   FUZZ_TARGETS     space-separated targets (default: every target in fuzz_targets/)
#   FUZZ_SANITIZER   cargo fuzz --sanitizer (default: address; "none" is ~2-3x faster)
#
# Needs nightly-only rustc flags; with only a stable toolchain RUSTC_BOOTSTRAP=1 unlocks them.
# One fuzz process at a time (-jobs=1 -workers=1), at nice 10. New inputs go to corpus/<target>/
# (gitignored), seeds/<target>/ is read as an extra corpus, crashes land in artifacts/<target>/,
# libFuzzer's log in logs/<target>/fuzz-0.log.
set -euo pipefail

RUNS="${1:-1000000}"
FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SANITIZER="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..."
    cargo install cargo-fuzz --locked
fi

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a TARGETS <<<"$FUZZ_TARGETS"
else
    TARGETS=()
    for f in "$FUZZ_DIR"/fuzz_targets/*.rs; do
        TARGETS+=("$(basename "$f" .rs)")
    done
fi

cd "$FUZZ_DIR"
echo "building ${TARGETS[*]} (sanitizer: $SANITIZER)..."
nice -n 10 cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER"

declare -a SUMMARY=()
failed=0
for t in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t"
    logdir="$FUZZ_DIR/logs/$t"
    mkdir -p "$corpus" "$logdir" "$FUZZ_DIR/artifacts/$t"
    rm -f "$logdir/fuzz-0.log"
    seeds=()
    [[ -d "$FUZZ_DIR/seeds/$t" ]] && seeds=("$FUZZ_DIR/seeds/$t")
    echo "== $t: $RUNS runs"
    start=$(date +%s)
    rc=0
    # libFuzzer with -jobs writes its log to ./fuzz-0.log: run from the log dir.
    (cd "$logdir" && nice -n 10 cargo fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" \
        "$t" "$corpus" "${seeds[@]}" -- \
        -runs="$RUNS" -jobs=1 -workers=1 -print_final_stats=1) >"$logdir/cargo-fuzz.log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    log="$logdir/fuzz-0.log"
    [[ -f "$log" ]] || log="$logdir/cargo-fuzz.log"
    done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -n1 || true)
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)
    execs=$(grep -E '^stat::number_of_executed_units:' "$log" | tail -n1 | awk '{print $2}' || true)
    if [[ $rc -eq 0 && -n "$done_line" ]]; then
        result="ok"
    else
        result="FAILED (exit $rc)"
        failed=1
        grep -E "panicked at|SUMMARY|==ERROR|Test unit written to|Crash|deadly signal" "$log" | head -n 8 || true
        tail -n 30 "$logdir/cargo-fuzz.log" | grep -E "Reproduce|Minimize|cargo fuzz" || true
    fi
    rate="?"
    [[ -n "$execs" && $secs -gt 0 ]] && rate=$(( execs / secs ))
    line="$t: ${execs:-?} executions in ${secs}s (~${rate} exec/s): $result"
    [[ -n "$stats" ]] && line+=$'\n'"    $stats"
    echo "$line"
    SUMMARY+=("$line")
done

echo
echo "== summary ($RUNS runs each, sanitizer $SANITIZER)"
printf '%s\n' "${SUMMARY[@]}"
exit "$failed"
