#!/usr/bin/env bash
# Project-local Python environment for hpc-ckpt's tests and benchmarks.
#
# Usage: tests/setup-python.sh [--torch] [--print-libtorch]
#
#   (no flags)        create <repo>/.venv if missing; install the pinned
#                     safetensors + numpy + pytest into it, and the Python
#                     package hpc_ckpt (src/python, editable).
#   --torch           also install the pinned torch (the PyPI wheel, ~4.7 GB
#                     with its nvidia-* dependencies). Its torch/ directory is
#                     a complete libtorch (lib/libtorch_cpu.so, include/) and is
#                     what LIBTORCH should point at for the tch crate. Also the
#                     pinned transformers + accelerate and lightning that the
#                     hpc_ckpt integration tests (tests/python/test_*.py) use.
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
PYTEST_VERSION=9.2.0
# The framework integrations' tests (--torch only); these versions work with torch 2.13.0.
TRANSFORMERS_VERSION=5.24.0
ACCELERATE_VERSION=1.15.0
LIGHTNING_VERSION=2.6.6
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
# .venv may be a link (tests/setup.sh --cache): the venv is made where it points (python -m venv
# refuses a link).
VENV_DIR=$VENV
[[ -L $VENV ]] && VENV_DIR="$(readlink -f "$VENV")"
PY="$VENV/bin/python"
LOG="$VENV/setup-python.log"

say() { echo "setup-python: $*" >&2; }
die() { echo "setup-python: ERROR: $*" >&2; exit 1; }

# --- venv -------------------------------------------------------------------
if [[ ! -x "$PY" ]] || ! "$PY" -c '' 2>/dev/null; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "python3 >= 3.11 required, found $(python3 --version 2>&1)"
    if [[ -e "$VENV_DIR" ]]; then
        say "removing broken venv at $VENV_DIR"
        rm -rf "$VENV_DIR"
    fi
    python3 -m venv "$VENV_DIR" || die "python3 -m venv $VENV_DIR failed (on Debian: apt-get install python3-venv)"
    say "created venv $VENV_DIR ($("$PY" --version 2>&1))"
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

# Cheap checks by package metadata (no imports). The package must be the editable install of
# this checkout's src/python at the version its pyproject.toml names.
PKG_DIR="$REPO/src/python"
PKG_VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$PKG_DIR/pyproject.toml" | head -n 1)"
pins_ok() {  # pins_ok NAME==VERSION ...
    "$PY" - "$@" >/dev/null 2>&1 <<'PYEOF'
import sys, importlib.metadata as md
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if md.version(name).split("+")[0] != want:
        sys.exit(1)
PYEOF
}
pkg_ok() {
    "$PY" - "$PKG_VERSION" "$PKG_DIR" >/dev/null 2>&1 <<'PYEOF'
import sys, json, os, importlib.metadata as md
from urllib.parse import unquote, urlparse
d = md.distribution("hpc-ckpt")
url = json.loads(d.read_text("direct_url.json") or "{}")
where = os.path.realpath(unquote(urlparse(url.get("url", "")).path))
ok = (d.version == sys.argv[1] and url.get("dir_info", {}).get("editable")
      and where == os.path.realpath(sys.argv[2]))
import hpc_ckpt  # cheap (torch is imported lazily); a stale editable finder shows here
ok = ok and os.path.realpath(hpc_ckpt.__file__ or "") == os.path.join(where, "hpc_ckpt", "__init__.py")
sys.exit(0 if ok else 1)
PYEOF
}

pkgs=()
base_ok || pkgs+=("safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION")
pins_ok "pytest==$PYTEST_VERSION" || pkgs+=("pytest==$PYTEST_VERSION")
if (( want_torch )) && ! torch_ok; then
    # Installed together with the base pins so pip keeps them consistent.
    pkgs+=("torch==$TORCH_VERSION")
    [[ " ${pkgs[*]} " == *" numpy=="* ]] || pkgs+=("safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION")
fi
frameworks=("transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" "lightning==$LIGHTNING_VERSION")
if (( want_torch )) && ! pins_ok "${frameworks[@]}"; then
    # With torch pinned in the same run (when it is missing) so pip never swaps it.
    pkgs+=("${frameworks[@]}")
    [[ " ${pkgs[*]} " == *" torch=="* ]] || pkgs+=("torch==$TORCH_VERSION")
fi
# The package last, editable, in the same pip run as the pins (its deps are satisfied by them).
pkg_ok || pkgs+=(-e "$PKG_DIR")

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
    pins_ok "pytest==$PYTEST_VERSION" || die "after install: pytest $PYTEST_VERSION not installed"
    pkg_ok || die "after install: hpc_ckpt $PKG_VERSION is not the editable install of $PKG_DIR"
    if (( want_torch )); then
        pins_ok "${frameworks[@]}" || die "after install: ${frameworks[*]} not all installed"
    fi
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
