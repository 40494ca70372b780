#!/usr/bin/env bash
# Prepares tests/gpu/bundle/ (git-ignored) for the GPU machine, which has its own python3 and
# PyTorch but no package registry and maybe no Rust toolchain:
#   - hpc-ckpt + hpc-ckpt-core built here without libtorch (`--no-default-features`: wrap, commit,
#     status need no torch; the built-in trainer does, see check.py's builtin_trainer);
#   - the safetensors wheel (abi3, any CPython >= 3.10) from the venv's pip cache or PyPI;
#   - with --numpy-for X.Y, numpy's wheel for that python too (if that python lacks numpy).
# Then carry tests/gpu/bundle to the GPU machine and run tests/gpu/check.sh there.
#
#   tests/gpu/bundle.sh [--numpy-for 3.12]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
NUMPY_FOR=""
while (($#)); do
    case "$1" in
        --numpy-for) NUMPY_FOR=${2:?--numpy-for needs a python version such as 3.12}; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bundle.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PY=$REPO/.venv/bin/python
[[ -x $PY ]] || { echo "bundle.sh: no .venv: run tests/setup.sh --torch first" >&2; exit 2; }
OUT=$REPO/tests/gpu/bundle
mkdir -p "$OUT"
# Its own target dir: the torch-free build must not replace target/release's binaries.
cargo build --release --no-default-features --bins --target-dir target/gpu-bundle
cp target/gpu-bundle/release/hpc-ckpt target/gpu-bundle/release/hpc-ckpt-core "$OUT/"
strip "$OUT/hpc-ckpt" "$OUT/hpc-ckpt-core"  # the debug info would be most of the 64 MiB the machine takes
rm -f "$OUT"/safetensors-*.whl "$OUT"/numpy-*.whl
ver=$("$PY" -c 'import safetensors; print(safetensors.__version__)')
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.10 --implementation cp -d "$OUT" "safetensors==$ver"
if [[ -n $NUMPY_FOR ]]; then
    nv=$("$PY" -c 'import numpy; print(numpy.__version__)')
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version "$NUMPY_FOR" -d "$OUT" "numpy>=1.22" || \
        echo "bundle.sh: no numpy wheel for python $NUMPY_FOR (the venv has $nv)" >&2
fi
du -sh "$OUT"; ls -l "$OUT"
