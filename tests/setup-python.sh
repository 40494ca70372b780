#!/usr/bin/env bash
# Project-local Python environment for hpc-ckpt's tests and benchmarks.
#
# Usage: tests/setup-python.sh [--torch] [--print-libtorch]
#
#   (no flags)        create <repo>/.venv if missing; install the pinned
#                     safetensors + numpy into it.
#   --torch           also install the pinned torch (the PyPI wheel, ~4.7 GB
#                     with its nvidia-* dependencies). Its torch/ directory is
#                     a complete libtorch (lib/libtorch_cpu.so, include/) and is
#                     what LIBTORCH should point at for the tch crate.
#   --print-libtorch  implies --torch; always print the LIBTORCH directory on
#                     stdout (even when nothing had to be installed), e.g.
#                       export LIBTORCH="$(tests/setup-python.sh --print-libtorch)"
#
# Idempotent: when everything is already at the pinned versions pip is not
# run at all and nothing is printed (a no-op run takes well under 2 s).
# Progress lines go to stderr; stdout carries only the LIBTORCH path.
set -euo pipefail

# Exact pins. tch 0.26 needs exactly libtorch 2.13.0.
SAFETENSORS_VERSION=0.8.0
NUMPY_VERSION=2.4.6
TORCH_VERSION=2.13.0
# Below this much free space (GiB) on the venv's filesystem, pip runs with
# --no-cache-dir (the torch download alone is ~4.7 GB; a cache doubles that).
MIN_FREE_GIB_FOR_CACHE=20

want_torch=0
print_libtorch=0
for arg in "$@"; do
    case "$arg" in
        --torch) want_torch=1 ;;
        --print-libtorch) want_torch=1; print_libtorch=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup-python: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
LOG="$VENV/setup-python.log"

say() { echo "setup-python: $*" >&2; }
die() { echo "setup-python: ERROR: $*" >&2; exit 1; }

# --- venv -------------------------------------------------------------------
if [[ ! -x "$PY" ]] || ! "$PY" -c '' 2>/dev/null; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "python3 >= 3.11 required, found $(python3 --version 2>&1)"
    if [[ -e "$VENV" ]]; then
        say "removing broken venv at $VENV"
        rm -rf "$VENV"
    fi
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (on Debian: apt-get install python3-venv)"
    say "created venv $VENV ($("$PY" --version 2>&1))"
fi

# --- what is missing? ---------------------------------------------------------
base_ok() {
    "$PY" - "$SAFETENSORS_VERSION" "$NUMPY_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys, safetensors, numpy
sys.exit(0 if (safetensors.__version__ == sys.argv[1] and numpy.__version__ == sys.argv[2]) else 1)
PYEOF
}
torch_ok() {
    "$PY" - "$TORCH_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys, importlib.metadata as md
# Cheap check without importing torch (importing it takes seconds).
v = md.version("torch")
sys.exit(0 if v.split("+")[0] == sys.argv[1] else 1)
PYEOF
}

pkgs=()
base_ok || pkgs+=("safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION")
if (( want_torch )) && ! torch_ok; then
    # Installed together with the base pins so pip keeps them consistent.
    pkgs+=("torch==$TORCH_VERSION")
    [[ " ${pkgs[*]} " == *" numpy=="* ]] || pkgs+=("safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION")
fi

# --- install ------------------------------------------------------------------
if (( ${#pkgs[@]} )); then
    pip_args=(install --disable-pip-version-check --no-input --progress-bar off)
    free_gib=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
    if (( free_gib < MIN_FREE_GIB_FOR_CACHE )); then
        pip_args+=(--no-cache-dir)
        say "only ${free_gib} GiB free: pip runs with --no-cache-dir"
    fi
    say "installing ${pkgs[*]} (log: $LOG)"
    start=$SECONDS
    if ! "$PY" -m pip "${pip_args[@]}" "${pkgs[@]}" >"$LOG" 2>&1; then
        echo "---- last lines of $LOG ----" >&2
        tail -n 25 "$LOG" >&2
        die "pip install ${pkgs[*]} failed"
    fi
    say "installed ${pkgs[*]} in $((SECONDS - start)) s"
    base_ok || die "after install: safetensors $SAFETENSORS_VERSION / numpy $NUMPY_VERSION still not importable"
    if (( want_torch )); then
        torch_ok || die "after install: torch $TORCH_VERSION still not installed"
    fi
fi

# --- libtorch from the torch wheel ----------------------------------------------
if (( want_torch )); then
    torch_dir="$("$PY" -c 'import importlib.util, os; s = importlib.util.find_spec("torch"); print(os.path.dirname(s.origin))')" \
        || die "cannot locate the torch package in $VENV"
    [[ -f "$torch_dir/lib/libtorch_cpu.so" ]] || die "$torch_dir/lib/libtorch_cpu.so missing: not a usable LIBTORCH"
    [[ -d "$torch_dir/include/torch" ]] || die "$torch_dir/include/torch missing: not a usable LIBTORCH"
    if (( ${#pkgs[@]} )) || (( print_libtorch )); then
        if (( ${#pkgs[@]} )); then
            "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith(sys.argv[1]) else 1)' "$TORCH_VERSION" \
                || die "import torch failed or wrong version after install"
            say "LIBTORCH dir:"
        fi
        echo "$torch_dir"
    fi
fi
