#!/usr/bin/env bash
# The whole test suite, set-up included (the README's test command; .ci/run calls it):
# formatting, clippy (default and --no-default-features), the local Slurm cluster's self-test,
# then every unit and integration test (the storage suites run the real binary).
#
# The machine has 2 cores, and the suite needs ~1200 CPU-seconds: the layout keeps both busy.
# Three runners overlap from the moment the default test binary exists: the Slurm suites
# (tests/it's slurm_e2e:: and sbatch_template::, mostly waiting on the cluster) in the
# background on the cluster's two nodes side by side (tests/it/common.rs, take_lanes); pytest in
# the background; the cargo test binaries in the foreground. The cluster starts and runs its self-test
# while clippy compiles. The suites that need no torch, and pytest, run against the login-node
# binary: each start of the default one loads libtorch first (~0.25 s of CPU). Each test runs
# once, and the closing line counts them all. With CI=true (or HPC_CKPT_CACHE=DIR), target/ and
# .venv of a clone that has none are links into a cache outside it (default ~/.cache/hpc-ckpt;
# tests/setup.sh --cache) that the next clone on this machine reuses: no cold build, no torch
# download, and build.rs's compiled C++ (target/cxx-cache) is reused.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

T0=$SECONDS
# The machine's CPU jiffies (all, idle) at the start: the closing lines say how busy the run kept it.
cpu_jiffies() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6 }' /proc/stat; }
read -r CPU0 IDLE0 < <(cpu_jiffies)
TIMES=()
LAST=""
LAST_T=$SECONDS
step() {
    [[ -n $LAST ]] && TIMES+=("$(printf '%5d s  %s' $((SECONDS - LAST_T)) "$LAST")")
    LAST=$1 LAST_T=$SECONDS
    printf '\n==> %s\n' "$*"
}
TMP=$(mktemp -d)
LOG=$TMP/log
BG_PIDS=()
cleanup() {
    local p
    # The background runners (own process groups: setsid), then the cluster and its jobs.
    for p in "${BG_PIDS[@]}"; do kill -- -"$p" 2>/dev/null || true; done
    sbatch/local-cluster.sh stop >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
# bg NAME CMD...: run CMD in the background in its own process group; its output in
# $TMP/NAME.out, its exit status in $TMP/NAME.rc, its seconds in $TMP/NAME.s.
bg() {
    local name=$1
    shift
    # (8>&-: the daemons the cluster start leaves running must not hold the cache lock)
    setsid bash -c 's=$SECONDS; "$@" </dev/null >"$0.out" 2>&1; rc=$?; echo $((SECONDS - s)) >"$0.s"; times >"$0.cpu"; echo $rc >"$0.rc"' \
        "$TMP/$name" "$@" 8>&- &
    BG_PIDS+=($!)
}
# wait_bg NAME [LOG]: wait for it, print its output (into $LOG too with LOG), fail when it failed.
wait_bg() {
    local name=$1 rc
    while [[ ! -f $TMP/$name.rc ]]; do sleep 1; done
    rc=$(cat "$TMP/$name.rc")
    if [[ ${2:-} == LOG ]]; then tee -a "$LOG" <"$TMP/$name.out"; else cat "$TMP/$name.out"; fi
    printf '(%s: %s s in the background; its processes'"'"' CPU, user and system: %s)\n' "$name" "$(cat "$TMP/$name.s")" "$(tail -1 "$TMP/$name.cpu")"
    TIMES+=("$(printf '%5d s  %s (background)' "$(cat "$TMP/$name.s")" "$name")")
    if [[ $rc != 0 ]]; then
        echo "ci: $name failed (exit $rc)" >&2
        exit "$rc"
    fi
}

cache=()
if [[ -n ${HPC_CKPT_CACHE:-} ]]; then
    cache=(--cache "$HPC_CKPT_CACHE")
elif [[ ${CI:-} == true ]]; then
    cache=(--cache "$HOME/.cache/hpc-ckpt")
fi
if ((${#cache[@]})) && command -v flock >/dev/null 2>&1; then
    # One run at a time per cache: the clones sharing it share the venv's editable hpc_ckpt (and
    # the machine's one local Slurm cluster).
    mkdir -p "${cache[1]}"
    exec 8>"${cache[1]}/.lock"
    flock -w 7200 8 || { echo "ci: ${cache[1]}/.lock is held by another run" >&2; exit 1; }
fi
step "set-up"
tests/setup.sh --slurm --torch "${cache[@]}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (default features, then --no-default-features); the local Slurm cluster starts and self-tests meanwhile"
bg cluster bash -c 'sbatch/local-cluster.sh start && sbatch/selftest-cluster.sh'
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --no-default-features -- -D warnings

# test_binaries JSON: one line per test binary cargo's JSON messages name: target name, path.
test_binaries() {
    .venv/bin/python - "$1" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable"):
        print(m["target"]["name"], m["executable"])
PYEOF
}
# run_tests BINARY ARGS...: run a libtest binary, its output into $LOG too. Each test's seconds
# on its result line ("ok <12.345s>"; libtest's option is unstable, and RUSTC_BOOTSTRAP=1 in the
# test binary's environment, not cargo's, unlocks it on a stable toolchain): the slowest are
# listed at the end.
report_time=(-Z unstable-options --report-time)
run_tests() { RUSTC_BOOTSTRAP=1 "$@" "${report_time[@]}" </dev/null 2>&1 | tee -a "$LOG"; }

step "cargo test --no-default-features --no-run (the login-node build: no libtorch), its unit tests"
# Its binary is kept aside ($TMP/login: the default build below overwrites target/debug's):
# the suites that need no torch, and pytest, run against it. They start hpc-ckpt ~700 times,
# and each start of the default build loads libtorch first (~0.25 s of CPU).
cargo test --no-default-features --lib --test it --no-run --message-format=json >"$TMP/login.json"
test_binaries "$TMP/login.json" >"$TMP/login-tests"
login_lib=$(awk '$1 == "hpc_ckpt" { print $2 }' "$TMP/login-tests")
login_it=$(awk '$1 == "it" { print $2 }' "$TMP/login-tests")
[[ -x $login_lib && -x $login_it ]] || { echo "ci: no login-node test binaries among: $(cat "$TMP/login-tests")" >&2; exit 1; }
mkdir "$TMP/login"
cp target/debug/hpc-ckpt target/debug/hpc-ckpt-core "$TMP/login/"
run_tests "$login_lib"

step "cargo test --all-targets --no-run (default features: the test binaries, target/debug/hpc-ckpt with libtorch)"
# From here on the test binaries run directly, not through `cargo test`, which holds the build
# lock while its tests run and re-links target/debug/hpc-ckpt (a moment without it) each time.
cargo test --all-targets --no-run --message-format=json >"$TMP/build.json"
test_binaries "$TMP/build.json" >"$TMP/tests"
it_bin=$(awk '$1 == "it" { print $2 }' "$TMP/tests")
[[ -x $it_bin ]] || { echo "ci: no test binary it among: $(cat "$TMP/tests")" >&2; exit 1; }

step "Slurm suites in the background (tests/it slurm_e2e:: sbatch_template::, side by side on the two nodes), from the moment the cluster's self-test passes"
# Started as soon as the test binary exists: the Slurm suites are the longest runner and mostly
# wait on the cluster. The runner waits for the self-test itself, so the foreground never idles
# on it. Four threads for two lanes: a chain test runs its straight run (outside Slurm) before
# it waits for a lane, so two can do that while two hold the lanes; with three, the last chain
# (by name) started late and was the suite's tail, the cluster idle beside it.
bg slurm bash -c 'while [[ ! -f $1.rc ]]; do sleep 1; done
    [[ $(cat "$1.rc") == 0 ]] || { echo "ci: the cluster self-test failed: no Slurm suites"; exit 1; }
    shift; RUSTC_BOOTSTRAP=1 exec "$@"' _ "$TMP/cluster" "$it_bin" slurm_e2e:: sbatch_template:: --test-threads=4 "${report_time[@]}"

step "Python package hpc_ckpt in the background (pytest, the real hpc-ckpt: the login-node build): state, protocol, the example and the HF Trainer / Lightning callbacks under wrap"
# The longest runner (~100 Python processes importing torch, Lightning, transformers; ranks
# waiting on each other; fixed step delays), beside the Slurm suites and the cargo test binaries
# (none of them keeps both cores busy alone). It needs only the login-node binary, but starts
# after the default build: on a cold cache that build takes minutes and the Slurm suites wait
# for it (started before it, pytest made a clean clone's run ~2 min longer). Its wrap never
# needs libtorch: the login-node build spares each start ~0.25 s.
HPC_CKPT_BIN=$TMP/login/hpc-ckpt bg pytest .venv/bin/python -m pytest tests/python -q -p no:cacheprovider --durations=20

step "tests/it wrap_lifetime::"
# Against the default build (the launcher's window before libtorch has loaded is what it
# tests); the other it runs below leave it out. Its checks with timing bounds are sized for a
# loaded machine (the Python child's ready wait is 60 s, `signals.ready_seconds`).
run_tests "$it_bin" wrap_lifetime::

step "Python side: the safetensors checker, and the example job's exact resume (child protocol)"
.venv/bin/python tests/python/selftest_check_safetensors.py | tee -a "$LOG"
.venv/bin/python tests/python/child_protocol_harness.py | tee -a "$LOG"

step "The prepared GPU check, its CPU dry run (tests/gpu/check.sh: no GPU here; the script must not rot)"
tests/gpu/check.sh --dry-run --out "$TMP/gpu-check.json" 2>&1 | tee -a "$LOG"

step "tests/it against the login-node binary: every suite that needs no torch (the Slurm suites, wrap_lifetime:: aside)"
# libtest's names ("NAME: test" lines of --list); each test runs once: here, or in the default
# build's it below.
list_tests() { "$1" --list --format terse 2>/dev/null | sed -n 's/: test$//p' | sort; }
list_tests "$login_it" | grep -v -e '^slurm_e2e::' -e '^sbatch_template::' -e '^wrap_lifetime::' >"$TMP/login-names"
mapfile -t login_names <"$TMP/login-names"
((${#login_names[@]})) || { echo "ci: the login-node it binary lists no test" >&2; exit 1; }
HPC_CKPT_TEST_BIN=$TMP/login/hpc-ckpt run_tests "$login_it" --exact "${login_names[@]}"

step "cargo test (default features: every test binary, the trainer included; the Slurm suites and pytest are in the background)"
list_tests "$it_bin" | grep -v -e '^slurm_e2e::' -e '^sbatch_template::' -e '^wrap_lifetime::' |
    comm -23 - "$TMP/login-names" >"$TMP/it-names"
mapfile -t it_names <"$TMP/it-names"
((${#it_names[@]})) || { echo "ci: the it binary lists no test that needs torch" >&2; exit 1; }
while read -r name exe <&3; do
    printf '     Running %s (%s)\n' "$name" "${exe#"$REPO"/}"
    if [[ $name == it ]]; then
        run_tests "$exe" --exact "${it_names[@]}"
    else
        run_tests "$exe"
    fi
done 3<"$TMP/tests"

step "Python package hpc_ckpt (the rest of its time)"
wait_bg pytest LOG

step "local Slurm cluster: its self-test (started during clippy)"
wait_bg cluster

step "Slurm suites (the rest of their time)"
wait_bg slurm LOG

step "stop the local Slurm cluster"
sbatch/local-cluster.sh stop

step "done"
printf '\nci: times\n'
printf '%s\n' "${TIMES[@]}"
printf '%5d s  total\n' $((SECONDS - T0))
read -r CPU1 IDLE1 < <(cpu_jiffies)
times >"$TMP/fg.cpu"
printf 'ci: the foreground'"'"'s processes (builds, test binaries) used, user and system: %s\n' "$(tail -1 "$TMP/fg.cpu")"
printf 'ci: the CPUs were busy %d %% of the time (%d cores)\n' \
    $((100 - 100 * (IDLE1 - IDLE0) / (CPU1 - CPU0 > 0 ? CPU1 - CPU0 : 1))) "$(nproc)"
printf '\nci: the slowest cargo tests (seconds)\n'
# (awk, not head: head would close the pipe early, and pipefail would make sort's SIGPIPE fatal)
sed -n 's/^test \(.*\) \.\.\. ok <\([0-9.]*\)s>$/\2 \1/p' "$LOG" | sort -rn | awk 'NR <= 15 { printf "%8.1f  %s\n", $1, $2 }'

# One closing line over every runner above (cargo's per-binary lines end on empty harnesses;
# pytest's summary is "[N failed, ]N passed[, N errors] in Ts").
awk '/^test result:/ { p += $4; f += $6 } /^[0-9]+ passed, [0-9]+ failed/ { p += $1; f += $3 }
     !/^test result:/ && !/^[0-9]+ passed, [0-9]+ failed/ && /^=* *[0-9]+ (passed|failed|errors?)(,.*)? in [0-9.]+s/ {
         for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed,?$/) p += $i; if ($(i+1) ~ /^(failed|errors?),?$/) f += $i } }
     END { printf "\nci: %d passed, %d failed\n", p, f; exit (f > 0) }' "$LOG"
