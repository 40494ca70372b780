#!/usr/bin/env bash
# The whole test suite, set-up included (the README's test command; .ci/run calls it):
# formatting, clippy (default and --no-default-features), the local Slurm cluster's self-test,
# then every unit and integration test (the storage suites run the real binary).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { printf '\n==> %s\n' "$*"; }
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

step "set-up"
tests/setup.sh --slurm --torch

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (default features, then --no-default-features)"
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --no-default-features -- -D warnings

step "local Slurm cluster: start, self-test, stop"
cleanup() { sbatch/local-cluster.sh stop >/dev/null 2>&1 || true; rm -f "$LOG"; }
trap cleanup EXIT
sbatch/local-cluster.sh start
sbatch/selftest-cluster.sh
sbatch/local-cluster.sh stop

step "Python side: the safetensors checker, and the example job's exact resume (child protocol)"
.venv/bin/python tests/python/selftest_check_safetensors.py | tee -a "$LOG"
.venv/bin/python tests/python/child_protocol_harness.py | tee -a "$LOG"

step "cargo test --no-default-features (the login-node build: no libtorch): unit tests and the store's fast suites"
cargo test --no-default-features --lib 2>&1 | tee -a "$LOG"
cargo test --no-default-features --test it -- fault_injection:: python_interop:: wrap_in_process:: 2>&1 | tee -a "$LOG"

step "cargo test (default features: everything, the trainer included)"
cargo test --all-targets 2>&1 | tee -a "$LOG"

step "Python package hpc_ckpt (pytest, the real target/debug/hpc-ckpt): state, protocol, the example and the HF Trainer / Lightning callbacks under wrap"
.venv/bin/python -m pytest tests/python -q -p no:cacheprovider 2>&1 | tee -a "$LOG"

step "The prepared GPU check, its CPU dry run (tests/gpu/check.sh: no GPU here; the script must not rot)"
tests/gpu/check.sh --dry-run --out "$(mktemp --suffix=.json)" 2>&1 | tee -a "$LOG"

# One closing line over every runner above (cargo's per-binary lines end on empty harnesses;
# pytest's summary is "[N failed, ]N passed[, N errors] in Ts").
awk '/^test result:/ { p += $4; f += $6 } /^[0-9]+ passed, [0-9]+ failed/ { p += $1; f += $3 }
     !/^test result:/ && !/^[0-9]+ passed, [0-9]+ failed/ && /^=* *[0-9]+ (passed|failed|errors?)(,.*)? in [0-9.]+s/ {
         for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed,?$/) p += $i; if ($(i+1) ~ /^(failed|errors?),?$/) f += $i } }
     END { printf "\nci: %d passed, %d failed\n", p, f; exit (f > 0) }' "$LOG"
