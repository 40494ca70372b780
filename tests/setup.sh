#!/usr/bin/env bash
# All set-up hpc-ckpt needs on a fresh machine, idempotent (a second run does nothing):
#   - the Rust toolchain's rustfmt and clippy components (cargo itself must be on PATH: rustup);
#   - the project-local Python venv with safetensors + numpy (tests/setup-python.sh);
#   - with --torch, PyPI's torch wheel too (libtorch for the trainer and the benchmarks);
#   - with --slurm, the Debian packages of a local Slurm cluster (sbatch/local-cluster.sh install).
#
# Usage: tests/setup.sh [--torch] [--slurm]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

py_args=()
slurm=0
for a in "$@"; do
    case "$a" in
        --torch) py_args+=(--torch) ;;
        --slurm) slurm=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument $a (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust with rustup (https://rustup.rs), then re-run." >&2
    exit 1
fi
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "setup: adding the $comp component" >&2
        rustup component add "$comp"
    fi
done

"$REPO/tests/setup-python.sh" "${py_args[@]}"

if [[ $slurm == 1 ]]; then
    "$REPO/sbatch/local-cluster.sh" install
fi
