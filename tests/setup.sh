#!/usr/bin/env bash
# All set-up hpc-ckpt needs on a fresh machine, idempotent (a second run does nothing):
#   - the Rust toolchain's rustfmt and clippy components (cargo itself must be on PATH: rustup);
#   - the project-local Python venv with safetensors + numpy (tests/setup-python.sh);
#   - with --torch, PyPI's torch wheel too (libtorch for the trainer and the benchmarks), and
#     .cargo/config.toml (generated, git-ignored) whose [env] sets LIBTORCH to the venv's torch
#     dir, so a plain `cargo build` finds libtorch; the file is rewritten only when its content
#     changes (a changed LIBTORCH makes torch-sys rebuild, ~2 min); and Debian's libgloo-dev
#     (Gloo's headers, which the torch wheel lacks: build.rs compiles src/train/collective.cpp,
#     libtorch's c10d ProcessGroupGloo, against them), via apt when /usr/include/gloo is missing;
#   - with --slurm, the Debian packages of a local Slurm cluster (sbatch/local-cluster.sh install);
#   - with --cache DIR, a build cache outside the clone that the next clone on this machine
#     reuses (tests/ci.sh passes ~/.cache/hpc-ckpt under CI=true): a clone without target/ or
#     .venv gets them as links to DIR/target and DIR/venv (cargo then rebuilds only this crate,
#     and the venv with torch is installed once; target/debug/hpc-ckpt stays where it was). An
#     existing target/ or .venv is left alone. The venv's editable hpc_ckpt follows the clone
#     that ran set-up last, so clones sharing a cache run their tests one at a time (tests/ci.sh
#     holds DIR/.lock; the local Slurm cluster is one per machine anyway).
#
# Usage: tests/setup.sh [--torch] [--slurm] [--cache DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

torch=0
slurm=0
cache=""
while (($#)); do
    a=$1
    shift
    case "$a" in
        --torch) torch=1 ;;
        --slurm) slurm=1 ;;
        --cache)
            (($#)) || { echo "setup: --cache needs a directory" >&2; exit 2; }
            cache=$1
            shift
            ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument $a (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust with rustup (https://rustup.rs), then re-run." >&2
    exit 1
fi
if [[ -n $cache ]]; then
    mkdir -p "$cache"
    cache="$(cd "$cache" && pwd -P)"
    case "$cache/" in "$REPO"/*) echo "setup: the cache $cache must be outside the clone" >&2; exit 2 ;; esac
    for pair in target:target .venv:venv; do
        here=$REPO/${pair%%:*} there=$cache/${pair#*:}
        if [[ ! -e $here && ! -L $here ]]; then
            # (cargo needs the directory; tests/setup-python.sh creates the venv itself)
            [[ $pair == target:* ]] && mkdir -p "$there"
            ln -s "$there" "$here"
            echo "setup: ${pair%%:*} -> $there (the build cache)" >&2
        fi
    done
fi

for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "setup: adding the $comp component" >&2
        rustup component add "$comp"
    fi
done

# Debian's libgloo-dev (headers only matter: Gloo's code is inside libtorch_cpu.so). Idempotent:
# nothing runs when the header is there. apt as sbatch/local-cluster.sh does it: update only when
# there are no package lists, or once when the install fails on stale lists.
GLOO_HEADER=/usr/include/gloo/allreduce.h
install_gloo_headers() {
    [[ -f $GLOO_HEADER ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        { echo "setup: $GLOO_HEADER missing and no apt-get: install Gloo's headers (Debian: libgloo-dev)" >&2; exit 1; }
    local -a sudo=()
    if [[ $EUID -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "setup: libgloo-dev is needed; run as root (or: apt-get install libgloo-dev)" >&2
            exit 1
        fi
    fi
    local aptlog
    aptlog="$(mktemp -t hpc-ckpt-apt.XXXXXX)"
    echo "setup: installing libgloo-dev (Gloo's headers for src/train/collective.cpp); log: $aptlog" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        "${sudo[@]}" apt-get update -q >>"$aptlog" 2>&1 ||
            { tail -n 20 "$aptlog" >&2; echo "setup: apt-get update failed" >&2; exit 1; }
    fi
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends libgloo-dev >>"$aptlog" 2>&1; then
        echo "setup: apt-get install failed; running apt-get update and retrying" >&2
        "${sudo[@]}" apt-get update -q >>"$aptlog" 2>&1 ||
            { tail -n 20 "$aptlog" >&2; echo "setup: apt-get update failed" >&2; exit 1; }
        "${sudo[@]}" apt-get install -y -q --no-install-recommends libgloo-dev >>"$aptlog" 2>&1 ||
            { tail -n 20 "$aptlog" >&2; echo "setup: apt-get install libgloo-dev failed" >&2; exit 1; }
    fi
    [[ -f $GLOO_HEADER ]] || { echo "setup: still no $GLOO_HEADER after installing libgloo-dev" >&2; exit 1; }
    rm -f "$aptlog"
}

if [[ $torch == 1 ]]; then
    # stdout carries only the LIBTORCH dir (progress goes to stderr).
    libtorch="$("$REPO/tests/setup-python.sh" --print-libtorch)"
    libtorch="$(cd "$libtorch" && pwd -P)"
    esc=${libtorch//\\/\\\\}
    esc=${esc//\"/\\\"}
    want="# Generated by tests/setup.sh --torch; rewritten when the venv's torch moves. Do not edit.
# A LIBTORCH already in the environment wins over this one (cargo's [env] does not force).
[env]
LIBTORCH = \"$esc\"
"
    cfg="$REPO/.cargo/config.toml"
    if [[ ! -f $cfg ]] || [[ "$(cat "$cfg"; printf x)" != "${want}x" ]]; then
        mkdir -p "$REPO/.cargo"
        printf '%s' "$want" >"$cfg.tmp"
        mv -f "$cfg.tmp" "$cfg"
        echo "setup: wrote $cfg (LIBTORCH=$libtorch)" >&2
    fi
    install_gloo_headers
else
    "$REPO/tests/setup-python.sh"
fi

if [[ $slurm == 1 ]]; then
    "$REPO/sbatch/local-cluster.sh" install
fi
