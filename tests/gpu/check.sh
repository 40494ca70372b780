#!/usr/bin/env bash
# The prepared GPU check: exact resume of a CUDA job (USR1 and SIGKILL, bf16, CUDA RNG), the save
# stall of a >= 2 GB CUDA state against dcp.async_save, and the built-in trainer on CUDA when it
# can be built there. Writes its figures as one JSON file. Budget: under 8 minutes on one GPU.
#
#   tests/gpu/check.sh [--dry-run] [--out FILE] [--python PY] [--bin HPC_CKPT] [-- check.py options]
#
# On the GPU machine (no package registry, maybe no Rust): first, here, `tests/gpu/bundle.sh`
# puts a torch-free `hpc-ckpt` build and the safetensors wheel into tests/gpu/bundle/ (git-ignored,
# carried along); there, `tests/gpu/check.sh --out $OUT/gpu-check.json` uses that machine's own
# `python3` with its PyTorch, the hpc_ckpt package from this tree and the bundle.
#
# --dry-run: everything on the CPU with small sizes, no CUDA part (the CI runs it, so the script
# cannot rot). It uses the venv's python and target/debug/hpc-ckpt when they exist.
#
# Exit: 0 all checks passed (or were skipped, the JSON says why), 1 a check failed, 2 bad usage
# or no CUDA device without --dry-run.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="$REPO/tests/gpu/bundle"
DRY=0 OUT="" PY="" BIN=""
EXTRA=()
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift ;;
        --bin) BIN=${2:?--bin needs the hpc-ckpt binary}; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z $PY ]]; then
    if ((DRY)) && [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
if [[ -z $BIN ]]; then
    # The GPU machine: the bundle's; a dry run: this tree's build (torch-linked: check 3 runs too).
    cands=("$BUNDLE/hpc-ckpt" "$REPO/target/debug/hpc-ckpt" "$REPO/target/release/hpc-ckpt")
    ((DRY)) && cands=("$REPO/target/debug/hpc-ckpt" "$REPO/target/release/hpc-ckpt" "$BUNDLE/hpc-ckpt")
    for b in "${cands[@]}"; do
        if [[ -x $b && -x $(dirname "$b")/hpc-ckpt-core ]]; then BIN=$b; break; fi
    done
fi
[[ -n $BIN && -x $BIN ]] || { echo "check.sh: no hpc-ckpt binary: run tests/gpu/bundle.sh (or cargo build), or give --bin" >&2; exit 2; }
OUT=${OUT:-$REPO/gpu-check.json}

# The package from this tree; wheels from the bundle (unpacked once per run) when the python
# lacks them. safetensors' wheel is abi3: one file serves every CPython >= 3.10.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$REPO/src/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
for mod in safetensors numpy; do
    if ! "$PY" -c "import $mod" 2>/dev/null; then
        whl=$(ls "$BUNDLE"/"$mod"-*.whl 2>/dev/null | head -1 || true)
        [[ -n $whl ]] || { echo "check.sh: $PY cannot import $mod and tests/gpu/bundle/ has no $mod wheel (tests/gpu/bundle.sh brings it)" >&2; exit 2; }
        "$PY" -m zipfile -e "$whl" "$SITE"
    fi
done

# Deterministic cuBLAS must be asked for before CUDA starts.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONUNBUFFERED=1
args=(--out "$OUT" --bin "$BIN")
((DRY)) && args+=(--dry-run)
echo "check.sh: $PY, $BIN, results in $OUT" >&2
exec "$PY" "$REPO/tests/gpu/check.py" "${args[@]}" "${EXTRA[@]}"
