#!/usr/bin/env bash
# shellcheck disable=SC2016 # single-quoted $VARs below are expanded by the job shells
# selftest-cluster.sh — check that the local Slurm cluster started by
# sbatch/local-cluster.sh does what hpc-ckpt relies on. Exits non-zero on the
# first failure; every wait is bounded. Job scripts and outputs go under
# $HPC_CKPT_CLUSTER_DIR/selftest/<timestamp>/.
#
#   sbatch/local-cluster.sh start && sbatch/selftest-cluster.sh
#
# Checks:
#   1. sbatch --wrap (with --time, --mem and an srun step) runs and completes;
#      sbatch --test-only works and refuses an impossible --mem
#   2. a job that runs `scontrol requeue $SLURM_JOB_ID` once comes back with
#      SLURM_RESTART_COUNT=1 and completes (prints requeue->restart time)
#   3. preemption: a `low` job with --requeue --signal=B:USR1@30 gets USR1 in
#      its batch shell when a `high` job arrives, then TERM, then is requeued
#      and restarts with SLURM_RESTART_COUNT=1 (prints timings)
#   4. scancel --signal=USR1 --batch reaches the batch shell
# Run a subset with e.g. `selftest-cluster.sh trivial preempt`
# (names: trivial requeue preempt signal).
set -euo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
CLUSTER=$HERE/local-cluster.sh
STATE=${HPC_CKPT_CLUSTER_DIR:-/tmp/hpc-ckpt-cluster}
eval "$("$CLUSTER" env)"
export SLURM_CONF

if ! "$CLUSTER" status >/dev/null 2>&1; then
    echo "selftest: the cluster is not running/healthy; run: $CLUSTER start" >&2
    exit 2
fi

OUT=$STATE/selftest/$(date +%Y%m%dT%H%M%S)-$$
mkdir -p "$OUT"
echo "selftest: outputs in $OUT"

FAILED=0
JOBS=()
now() { date +%s.%N; }
# elapsed FROM TO: TO - FROM in seconds (empty -> nan)
elapsed() { awk -v a="${1:-nan}" -v b="${2:-nan}" 'BEGIN { print b - a }'; }
fail() {
    echo "selftest: FAIL: $*" >&2
    FAILED=1
}
cleanup() {
    local j
    for j in "${JOBS[@]}"; do scancel "$j" 2>/dev/null || true; done
}
trap cleanup EXIT

# submit ARGS... -> prints the job id
submit() {
    local id
    id=$(sbatch --parsable "$@") || return 1
    id=${id%%;*}
    JOBS+=("$id")
    echo "$id"
}

job_field() { # job_field ID FIELD
    scontrol -o show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

# wait_state ID REGEX TIMEOUT_S: wait until JobState matches REGEX
wait_state() {
    local id=$1 re=$2 timeout=$3 deadline st
    deadline=$(($(date +%s) + timeout))
    while (($(date +%s) < deadline)); do
        st=$(job_field "$id" JobState)
        [[ $st =~ ^($re)$ ]] && return 0
        sleep 0.2
    done
    echo "selftest: job $id: state '$(job_field "$id" JobState)' did not reach '$re' within ${timeout}s" >&2
    scontrol show job "$id" >&2 || true
    return 1
}

# wait_file_line FILE REGEX TIMEOUT_S
wait_file_line() {
    local f=$1 re=$2 timeout=$3 deadline
    deadline=$(($(date +%s) + timeout))
    while (($(date +%s) < deadline)); do
        [[ -f $f ]] && grep -Eq -- "$re" "$f" && return 0
        sleep 0.1
    done
    echo "selftest: '$re' did not appear in $f within ${timeout}s" >&2
    [[ -f $f ]] && cat "$f" >&2
    return 1
}

show_out() { sed 's/^/    | /' "$1"; }

# ------------------------------------------------------------------ checks

check_trivial() {
    echo "== trivial: sbatch --wrap, sbatch --test-only"
    local id t0 t1
    t0=$(now)
    id=$(submit -J st-trivial --time=00:01:00 --mem=100M -o "$OUT/trivial-%j.out" \
        --wrap 'hostname; echo "jobid=$SLURM_JOB_ID"; srun --ntasks=1 echo srun-step-ok') ||
        { fail "sbatch --wrap failed"; return; }
    wait_state "$id" COMPLETED 30 || { fail "trivial job $id did not complete"; return; }
    t1=$(now)
    grep -q "^jobid=$id\$" "$OUT/trivial-$id.out" || { fail "trivial job output lacks jobid=$id"; show_out "$OUT/trivial-$id.out"; return; }
    grep -q '^srun-step-ok$' "$OUT/trivial-$id.out" || { fail "srun step inside job $id failed"; show_out "$OUT/trivial-$id.out"; return; }
    show_out "$OUT/trivial-$id.out"
    printf '   job %s: submit -> COMPLETED seen after %.2f s\n' "$id" "$(elapsed "$t0" "$t1")"

    cat >"$OUT/testonly.sh" <<'EOF'
#!/bin/bash
#SBATCH -J st-testonly
#SBATCH --time=00:05:00
#SBATCH --mem=100M
#SBATCH --cpus-per-task=1
echo hello
EOF
    local msg
    if ! msg=$(sbatch --test-only -o "$OUT/testonly-%j.out" "$OUT/testonly.sh" 2>&1); then
        fail "sbatch --test-only failed: $msg"
        return
    fi
    [[ $msg == *"to start at"* ]] || { fail "unexpected sbatch --test-only output: $msg"; return; }
    echo "   --test-only: $msg"
    # and a request the node cannot satisfy must be refused
    if msg=$(sbatch --test-only --mem=100000000M "$OUT/testonly.sh" 2>&1); then
        fail "sbatch --test-only accepted an impossible --mem: $msg"
        return
    fi
    echo "   --test-only, impossible --mem: $msg"
    echo "   ok"
}

check_requeue() {
    echo "== requeue: scontrol requeue from inside the job"
    cat >"$OUT/requeue.sh" <<'EOF'
#!/bin/bash
#SBATCH -J st-requeue
#SBATCH --requeue
#SBATCH --open-mode=append
echo "start restart=${SLURM_RESTART_COUNT:-0} t=$(date +%s.%N)"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    echo "requeue t=$(date +%s.%N)"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60
    echo "not requeued?!"
    exit 1
fi
echo "done restart=$SLURM_RESTART_COUNT"
EOF
    local id f t_req t_restart
    id=$(submit -o "$OUT/requeue-%j.out" "$OUT/requeue.sh") || { fail "sbatch requeue.sh failed"; return; }
    f=$OUT/requeue-$id.out
    wait_file_line "$f" '^done restart=1$' 60 || { fail "requeued job $id did not restart and finish"; return; }
    wait_state "$id" COMPLETED 20 || { fail "requeued job $id did not complete"; return; }
    show_out "$f"
    [[ $(job_field "$id" Restarts) == 1 ]] || fail "job $id: Restarts=$(job_field "$id" Restarts), want 1"
    t_req=$(sed -n 's/^requeue t=//p' "$f" | head -n1)
    t_restart=$(sed -n 's/^start restart=1 t=//p' "$f" | head -n1)
    printf '   requeue -> restart: %.2f s\n' "$(elapsed "$t_req" "$t_restart")"
    echo "   ok"
}

check_preempt() {
    echo "== preempt: high job preempts low job (USR1, TERM, requeue, restart)"
    cat >"$OUT/low.sh" <<'EOF'
#!/bin/bash
#SBATCH -J st-low
#SBATCH -p low
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@30
#SBATCH --open-mode=append
log() { echo "$(date +%s.%N) restart=${SLURM_RESTART_COUNT:-0} $*"; }
trap 'log got USR1' USR1
trap 'log got TERM' TERM
log start
if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
    log finished
    exit 0
fi
# `wait` returns as soon as a trapped signal arrives, so traps run at once.
for i in $(seq 600); do sleep 1 & wait $!; done
log "not preempted?!"
exit 1
EOF
    local low high f t_high t_sub t_usr1 t_term t_restart
    low=$(submit -o "$OUT/low-%j.out" "$OUT/low.sh") || { fail "sbatch low.sh failed"; return; }
    f=$OUT/low-$low.out
    wait_state "$low" RUNNING 30 || { fail "low job $low did not start"; return; }
    wait_file_line "$f" 'restart=0 start' 15 || { fail "low job $low wrote nothing"; return; }
    t_high=$(now)
    high=$(submit -J st-high -p high -o "$OUT/high-%j.out" --wrap 'echo "high start $(date +%s.%N)"; sleep 2') ||
        { fail "sbatch -p high failed"; return; }
    t_sub=$(now)
    wait_file_line "$f" 'restart=0 got USR1' 15 || { fail "low job $low: batch shell got no USR1"; return; }
    wait_file_line "$f" 'restart=1 finished' 90 || { fail "low job $low was not requeued/restarted"; return; }
    wait_state "$low" COMPLETED 20 || { fail "low job $low did not complete after restart"; return; }
    wait_state "$high" COMPLETED 20 || { fail "high job $high did not complete"; return; }
    show_out "$f"
    show_out "$OUT/high-$high.out"
    [[ $(job_field "$low" Restarts) == 1 ]] || fail "job $low: Restarts=$(job_field "$low" Restarts), want 1"
    t_usr1=$(awk '/restart=0 got USR1/ {print $1; exit}' "$f")
    t_term=$(awk '/restart=0 got TERM/ {print $1; exit}' "$f")
    t_restart=$(awk '/restart=1 start/ {print $1; exit}' "$f")
    printf '   (times from just before `sbatch -p high`; sbatch itself returned after %.2f s)\n' "$(elapsed "$t_high" "$t_sub")"
    printf '   high submitted -> low USR1: %.2f s\n' "$(elapsed "$t_high" "$t_usr1")"
    if [[ -n $t_term ]]; then
        printf '   high submitted -> low TERM: %.2f s\n' "$(elapsed "$t_high" "$t_term")"
    else
        fail "low job's batch shell logged no TERM"
    fi
    printf '   high start: %.2f s after submit\n' "$(elapsed "$t_high" "$(awk '{print $3; exit}' "$OUT/high-$high.out")")"
    printf '   high submitted -> low restarted (restart=1): %.2f s\n' "$(elapsed "$t_high" "$t_restart")"
    echo "   ok"
}

check_signal() {
    echo "== signal: scancel --signal=USR1 --batch"
    cat >"$OUT/sig.sh" <<'EOF'
#!/bin/bash
#SBATCH -J st-signal
got=0
trap 'echo "got USR1 $(date +%s.%N)"; got=1' USR1
echo ready
for i in $(seq 300); do
    sleep 0.2 & wait $!
    [ $got = 1 ] && exit 0
done
echo "no signal?!"
exit 1
EOF
    local id f t0 t1
    id=$(submit -o "$OUT/sig-%j.out" "$OUT/sig.sh") || { fail "sbatch sig.sh failed"; return; }
    f=$OUT/sig-$id.out
    wait_file_line "$f" '^ready$' 30 || { fail "signal job $id did not start"; return; }
    t0=$(now)
    scancel --signal=USR1 --batch "$id" || { fail "scancel --signal=USR1 --batch $id failed"; return; }
    wait_file_line "$f" '^got USR1' 15 || { fail "batch shell of $id got no USR1"; return; }
    wait_state "$id" COMPLETED 20 || { fail "signal job $id did not complete"; return; }
    t1=$(awk '/^got USR1/ {print $3; exit}' "$f")
    show_out "$f"
    printf '   scancel -> trap: %.2f s\n' "$(elapsed "$t0" "$t1")"
    echo "   ok"
}

CHECKS=("$@")
((${#CHECKS[@]})) || CHECKS=(trivial requeue preempt signal)
for c in "${CHECKS[@]}"; do
    case $c in
    trivial | requeue | preempt | signal) "check_$c" ;;
    *) echo "selftest: unknown check '$c'" >&2; exit 2 ;;
    esac
    ((FAILED == 0)) || break
done

if ((FAILED)); then
    echo "selftest: FAILED (outputs in $OUT; logs in $STATE/log)" >&2
    exit 1
fi
echo "selftest: all checks passed"
