#!/usr/bin/env bash
# local-cluster.sh — install, start and stop a real single-node Slurm cluster
# on this machine, for hpc-ckpt's tests and the README tour.
#
# Usage: sbatch/local-cluster.sh {install|start|stop|restart|status|env|purge|help}
#
#   install  install slurmctld/slurmd/slurm-client/munge via apt when missing
#   start    install if needed, write config under the state dir, start
#            munged (unless one already answers), slurmctld and slurmd, wait
#            until the node is usable, then print the `export SLURM_CONF=...`
#            line. A no-op (apart from printing that line) when the cluster is
#            already up and healthy.
#   stop     cancel all jobs (unless HPC_CKPT_CLUSTER_KEEP_JOBS=1), stop the
#            daemons this script started (by PID), wait for them to exit.
#   restart  stop, then start.
#   status   say whether the cluster runs; brief sinfo / node / queue view.
#            Exit status: 0 healthy, 3 not running, 1 running but unhealthy.
#   env      print only the export line:  eval "$(sbatch/local-cluster.sh env)"
#   purge    stop, then delete the state dir (config, saved job state, logs).
#
# Environment:
#   HPC_CKPT_CLUSTER_DIR            state dir (default /tmp/hpc-ckpt-cluster);
#                                   must be absolute and outside any git work tree
#   HPC_CKPT_CLUSTER_AUTH           munge (default) or none (auth/none: no munged
#                                   needed, but anyone who can reach the ports can
#                                   run jobs as any user — use only in sandboxes)
#   HPC_CKPT_CLUSTER_CTLD_PORT      slurmctld port (default 6817)
#   HPC_CKPT_CLUSTER_SLURMD_PORT    slurmd port (default 6818); the second
#                                   node's slurmd listens on the next port
#   HPC_CKPT_CLUSTER_NODES          1 or 2 (default 2): slurmd nodes on this host
#   HPC_CKPT_CLUSTER_GRACE_TIME     GraceTime of the `low` partition, s (default 10)
#   HPC_CKPT_CLUSTER_MIN_JOB_AGE    seconds finished jobs stay visible to
#                                   `scontrol show job` (default 60)
#   HPC_CKPT_CLUSTER_START_TIMEOUT  seconds `start` waits for the node (default 60)
#   HPC_CKPT_CLUSTER_KEEP_JOBS=1    `stop` leaves jobs alone (they are recovered
#                                   from the saved state on the next `start`)
#
# Cluster layout: a node named after `hostname -s` (NodeAddr=127.0.0.1) with
# the machine's real CPU count and ~95% of its memory; partitions `low`
# (default, PriorityTier=1, PreemptMode=REQUEUE, GraceTime) and `high`
# (PriorityTier=10, PreemptMode=OFF) on it; preempt/partition_prio with
# preempt_send_user_signal, so `--signal=B:USR1@N` reaches a preempted job's
# batch shell at the start of its grace time. No accounting: use
# `scontrol show job`, not sacct.
#
# Two nodes (the default): a second node `<host>-2` on the same host (its own
# slurmd on the next port, the same CPUs and memory, counted twice), and the
# partitions `wide` (like `low`) and `widehigh` (like `high`) over both nodes,
# for multi-node jobs (`sbatch -N2`): the batch step runs on the first node,
# `srun` tasks on both, and `srun` forwards signals to every task. `low` and
# `high` keep only the first node, so a `high` job still preempts a `low` one;
# `low2` and `high2` are the same on the second node alone (two one-node
# tests, each with its preemptor, run side by side on the two nodes).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
STATE=${HPC_CKPT_CLUSTER_DIR:-/tmp/hpc-ckpt-cluster}
AUTH=${HPC_CKPT_CLUSTER_AUTH:-munge}
CTLD_PORT=${HPC_CKPT_CLUSTER_CTLD_PORT:-6817}
SLURMD_PORT=${HPC_CKPT_CLUSTER_SLURMD_PORT:-6818}
NODES=${HPC_CKPT_CLUSTER_NODES:-2}
GRACE_TIME=${HPC_CKPT_CLUSTER_GRACE_TIME:-10}
MIN_JOB_AGE=${HPC_CKPT_CLUSTER_MIN_JOB_AGE:-60}
START_TIMEOUT=${HPC_CKPT_CLUSTER_START_TIMEOUT:-60}
KEEP_JOBS=${HPC_CKPT_CLUSTER_KEEP_JOBS:-0}

CONF=$STATE/etc/slurm.conf
RUN=$STATE/run
LOG=$STATE/log
CTLD_PID=$RUN/slurmctld.pid
MUNGED_PID=$RUN/munged.pid          # written only when this script started munged
MUNGE_DIR=$STATE/munge              # munged's own log/pid (owned by the munge user)
NODE=$(hostname -s)
NODE2=$NODE-2
SLURMD_PORT2=$((SLURMD_PORT + 1))
SLURMD_PID=$RUN/slurmd-$NODE.pid
SLURMD2_PID=$RUN/slurmd-$NODE2.pid
case $NODES in 1 | 2) ;; *) printf 'local-cluster: error: HPC_CKPT_CLUSTER_NODES must be 1 or 2 (got %s)\n' "$NODES" >&2; exit 1 ;; esac

REQUIRED_CMDS=(slurmctld slurmd sbatch scontrol scancel squeue sinfo srun munged munge unmunge runuser)
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { printf 'local-cluster: error: %s\n' "$*" >&2; exit 1; }

# Root is needed to install packages, start munged as the munge user and run
# slurmd. Re-exec through sudo when it is available non-interactively.
need_root() {
    [[ $EUID -eq 0 ]] && return 0
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=HPC_CKPT_CLUSTER_DIR,HPC_CKPT_CLUSTER_AUTH,HPC_CKPT_CLUSTER_CTLD_PORT,HPC_CKPT_CLUSTER_SLURMD_PORT,HPC_CKPT_CLUSTER_NODES,HPC_CKPT_CLUSTER_GRACE_TIME,HPC_CKPT_CLUSTER_MIN_JOB_AGE,HPC_CKPT_CLUSTER_START_TIMEOUT,HPC_CKPT_CLUSTER_KEEP_JOBS \
            "$SELF" "$@"
    fi
    die "must run as root (or with passwordless sudo)"
}

check_state_dir() {
    [[ $STATE == /* ]] || die "HPC_CKPT_CLUSTER_DIR must be an absolute path (got '$STATE')"
    [[ $STATE =~ [[:space:]] ]] && die "HPC_CKPT_CLUSTER_DIR must not contain whitespace"
    [[ $STATE == / ]] && die "HPC_CKPT_CLUSTER_DIR must not be /"
    # The state dir holds logs, job state and spool files: keep it out of any
    # git work tree (read-only git query on the nearest existing ancestor).
    local d=$STATE
    while [[ ! -d $d ]]; do d=$(dirname "$d"); done
    if command -v git >/dev/null 2>&1 &&
        [[ $(git -C "$d" rev-parse --is-inside-work-tree 2>/dev/null || true) == true ]]; then
        die "state dir $STATE is inside the git work tree $(git -C "$d" rev-parse --show-toplevel); set HPC_CKPT_CLUSTER_DIR elsewhere"
    fi
}

# Serialise start/stop/purge of one state dir (parallel test processes may
# all call `start`). Holds the lock until the script exits.
lock_state() {
    command -v flock >/dev/null 2>&1 || return 0
    mkdir -p "$STATE"
    # (daemons are started with 9>&- so that they do not inherit the lock)
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "could not lock $STATE/.lock within 120 s"
}

export_line() { printf 'export SLURM_CONF=%s\n' "$CONF"; }

# ---------------------------------------------------------------- install

missing_cmds() {
    local c out=()
    for c in "${REQUIRED_CMDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || out+=("$c")
    done
    if ((${#out[@]})); then printf '%s\n' "${out[@]}"; fi
}

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

cmd_install() {
    local missing
    missing=$(missing_cmds)
    [[ -z $missing ]] && return 0
    need_root install
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${missing//$'\n'/ } and no apt-get to install ${PACKAGES[*]}"
    mkdir -p "$STATE"
    local aptlog=$STATE/apt.log
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${PACKAGES[*]} (missing: ${missing//$'\n'/ }); log: $aptlog"
    : >"$aptlog"
    if ! apt_lists_present; then
        apt-get update -q >>"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
    fi
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1; then
        # Stale package lists: refresh once and retry.
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1 ||
            { tail -n 20 "$aptlog" >&2; die "apt-get install ${PACKAGES[*]} failed"; }
    fi
    missing=$(missing_cmds)
    [[ -z $missing ]] || die "still missing after install: ${missing//$'\n'/ }"
    log "installed: $(slurmctld -V 2>/dev/null || echo slurm)"
}

# ---------------------------------------------------------------- helpers

# pid_alive PIDFILE NAME: the PID in PIDFILE is alive and its comm is NAME
# (guards against a stale pid file whose PID was reused).
pid_alive() {
    local pf=$1 name=$2 pid comm
    [[ -s $pf ]] || return 1
    pid=$(tr -dc '0-9' <"$pf")
    [[ -n $pid ]] || return 1
    running "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name" ]]
}

# running PID: the process exists and is not a zombie. (An exited daemon
# stays a zombie until PID 1 reaps it; container inits may never do that.)
running() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
    [[ $st != Z && $st != X ]]
}

pid_of() { tr -dc '0-9' <"$1"; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# the node names of this cluster
nodes() {
    echo "$NODE"
    if ((NODES == 2)); then echo "$NODE2"; fi
}

node_state() {
    # prints e.g. IDLE, MIXED, DOWN+NOT_RESPONDING, IDLE+DRAIN; empty if unknown
    SLURM_CONF=$CONF scontrol -o show node "${1:-$NODE}" 2>/dev/null |
        sed -n 's/.*\bState=\([^ ]*\).*/\1/p'
}

ctld_up() { SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_usable() {
    local s n
    for n in $(nodes); do
        s=$(node_state "$n")
        [[ $s =~ ^(IDLE|MIXED|ALLOCATED|COMPLETING)(\+COMPLETING)?$ ]] || return 1
    done
}

healthy() {
    [[ -f $CONF ]] || return 1
    pid_alive "$CTLD_PID" slurmctld || return 1
    pid_alive "$SLURMD_PID" slurmd || return 1
    if ((NODES == 2)); then pid_alive "$SLURMD2_PID" slurmd || return 1; fi
    # a config written for another node count is not this cluster
    [[ $(grep -c '^NodeName=' "$CONF") == "$NODES" ]] || return 1
    # nor one written before the second node had partitions of its own
    if ((NODES == 2)); then grep -q '^PartitionName=high2 ' "$CONF" || return 1; fi
    if [[ $(conf_auth) == munge ]]; then munge_ok || return 1; fi
    ctld_up || return 1
    node_usable
}

# the auth type of the config that is currently written
conf_auth() {
    if [[ -f $CONF ]] && grep -q '^AuthType=auth/none' "$CONF"; then echo none; else echo munge; fi
}

show_logs() {
    local f
    for f in "$LOG/slurmctld.log" "$LOG/slurmd-$NODE.log" "$LOG/slurmd-$NODE2.log" "$MUNGE_DIR/munged.log"; do
        [[ -s $f ]] || continue
        printf '\n----- tail of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
    if [[ -f $CONF ]]; then
        printf '\n----- scontrol show node -----\n' >&2
        SLURM_CONF=$CONF timeout 10 scontrol show node >&2 2>&1 || true
    fi
}

# ---------------------------------------------------------------- munge

ensure_munge_key() {
    local key=/etc/munge/munge.key
    [[ -s $key ]] && return 0
    log "creating $key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$key"
    else
        dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
}

start_munged() {
    munge_ok && return 0 # a munged (ours or the system's) already answers
    ensure_munge_key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
    rm -f "$MUNGE_DIR/munged.pid"
    log "starting munged"
    # munged forks and returns once it is listening on /run/munge/munge.socket.2
    if ! runuser -u munge -- munged --log-file="$MUNGE_DIR/munged.log" \
        --pid-file="$MUNGE_DIR/munged.pid" 2>"$LOG/munged.stderr" 9>&-; then
        cat "$LOG/munged.stderr" >&2
        show_logs
        die "munged failed to start (or set HPC_CKPT_CLUSTER_AUTH=none)"
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && break
        sleep 0.2
    done
    munge_ok || { show_logs; die "munged does not answer (munge -n | unmunge fails)"; }
    cp "$MUNGE_DIR/munged.pid" "$MUNGED_PID"
}

# ---------------------------------------------------------------- config

write_conf() {
    local cpus topo mem_mb memtotal defmem auth_type cred_type tmp
    cpus=$(nproc)
    # Real topology from slurmd -C ("CPUs=2 Boards=1 SocketsPerBoard=1
    # CoresPerSocket=2 ThreadsPerCore=1"), so slurmd does not complain.
    topo=$(slurmd -C 2>/dev/null | sed -n '1s/^NodeName=[^ ]* \(CPUs=.*ThreadsPerCore=[0-9]*\).*/\1/p')
    [[ -n $topo ]] || topo="CPUs=$cpus"
    memtotal=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
    mem_mb=$((memtotal - memtotal / 20)) # a bit below what `free -m` says
    defmem=$((mem_mb / cpus))
    ((defmem > 512)) && defmem=512 # jobs without --mem get 512 MB per CPU
    if [[ $AUTH == none ]]; then
        auth_type=auth/none cred_type=cred/none
    elif [[ $AUTH == munge ]]; then
        auth_type=auth/munge cred_type=cred/munge
    else
        die "HPC_CKPT_CLUSTER_AUTH must be munge or none (got '$AUTH')"
    fi
    tmp=$CONF.tmp
    cat >"$tmp" <<EOF
# Written by sbatch/local-cluster.sh — regenerated on every (re)start.
ClusterName=hpcckpt
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

AuthType=$auth_type
CredType=$cred_type
# A requeued job may restart only after the job credential expired
# (cred_expire + 1 s; default 120 s). Keep it short for tests.
AuthInfo=cred_expire=5

StateSaveLocation=$STATE/spool/ctld
# %n: the node's name (two slurmd nodes may share this host)
SlurmdSpoolDir=$STATE/spool/d-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups, no accounting, no mail.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true

SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$defmem
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1

# Preemption: jobs in 'high' requeue jobs in 'low' after GraceTime; with
# preempt_send_user_signal the job's --signal is sent when preemption starts.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
# From TERM to KILL (Slurm's default is 30 s). A PyTorch program needs ~2 s to tear its
# interpreter down after its final checkpoint, more on a loaded 2-core machine: 5 s was too
# tight for the e2e tests' TERM endings.
KillWait=15
MinJobAge=$MIN_JOB_AGE
ReturnToService=2
InactiveLimit=0
Waittime=0

NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 $topo RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=$NODE Default=YES MaxTime=UNLIMITED State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=high Nodes=$NODE Default=NO MaxTime=UNLIMITED State=UP PriorityTier=10 PreemptMode=OFF
EOF
    if ((NODES == 2)); then
        cat >>"$tmp" <<EOF
# The second node: the same host, its own slurmd (-N $NODE2) on its own port.
NodeName=$NODE2 NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$SLURMD_PORT2 $topo RealMemory=$mem_mb State=UNKNOWN
PartitionName=wide Nodes=$NODE,$NODE2 Default=NO MaxTime=UNLIMITED State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=widehigh Nodes=$NODE,$NODE2 Default=NO MaxTime=UNLIMITED State=UP PriorityTier=10 PreemptMode=OFF
# The second node alone, like low/high on the first: two one-node jobs (and their preemptors)
# side by side without meeting.
PartitionName=low2 Nodes=$NODE2 Default=NO MaxTime=UNLIMITED State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=high2 Nodes=$NODE2 Default=NO MaxTime=UNLIMITED State=UP PriorityTier=10 PreemptMode=OFF
EOF
    fi
    mv -f "$tmp" "$CONF"
}

# ---------------------------------------------------------------- stop

# stop_pids TIMEOUT_S PIDFILE:NAME...: SIGTERM all of them at once, wait for
# them to exit, SIGKILL whatever is left after TIMEOUT_S.
stop_pids() {
    local timeout=$1 spec pf name pid i left
    shift
    local -a pids=() names=() pfs=()
    for spec in "$@"; do
        pf=${spec%%:*} name=${spec#*:}
        if pid_alive "$pf" "$name"; then
            pid=$(pid_of "$pf")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$name") pfs+=("$pf")
        else
            rm -f "$pf"
        fi
    done
    ((${#pids[@]})) || return 0
    for ((i = 0; i < timeout * 10; i++)); do
        left=0
        for pid in "${pids[@]}"; do running "$pid" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]} name=${names[$i]}
        if running "$pid"; then
            log "$name (pid $pid) did not exit ${timeout}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            if running "$pid"; then die "could not stop $name (pid $pid)"; fi
        fi
        rm -f "${pfs[$i]}"
        log "stopped $name (pid $pid)"
    done
}

cancel_all_jobs() {
    pid_alive "$CTLD_PID" slurmctld || return 0
    local ids i
    ids=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null || true)
    [[ -n $ids ]] || return 0
    log "cancelling jobs: ${ids//$'\n'/ }"
    # shellcheck disable=SC2086
    SLURM_CONF=$CONF timeout 10 scancel $ids 2>/dev/null || true
    # TERM, then KILL after KillWait=15 s; allow some slack.
    for ((i = 0; i < 150; i++)); do
        ids=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null || true)
        [[ -z $ids ]] && return 0
        sleep 0.2
    done
    log "warning: jobs still listed after 30 s: ${ids//$'\n'/ }"
}

stop_daemons() {
    # slurmctld saves its state on SIGTERM; none of them needs the others
    # to shut down, so stop them together (each takes ~2 s to exit).
    stop_pids 20 "$SLURMD_PID:slurmd" "$SLURMD2_PID:slurmd" "$CTLD_PID:slurmctld" "$MUNGED_PID:munged"
}

cmd_stop() {
    [[ -d $STATE ]] || return 0
    if ! pid_alive "$CTLD_PID" slurmctld && ! pid_alive "$SLURMD_PID" slurmd &&
        ! pid_alive "$SLURMD2_PID" slurmd && ! pid_alive "$MUNGED_PID" munged; then
        rm -f "$CTLD_PID" "$SLURMD_PID" "$SLURMD2_PID" "$MUNGED_PID"
        return 0
    fi
    need_root stop
    lock_state
    [[ $KEEP_JOBS == 1 ]] || cancel_all_jobs
    stop_daemons
}

# ---------------------------------------------------------------- start

# start_daemon NAME PIDFILE [ARGS...]: start a Slurm daemon (it forks into the
# background) and wait, bounded, for its pid file to name a live process.
start_daemon() {
    local name=$1 pf=$2 i
    shift 2
    log "starting $name $*"
    rm -f "$pf"
    "$name" -f "$CONF" "$@" 2>>"$LOG/$name.stderr" 9>&- || { show_logs; die "$name failed to start"; }
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pf" "$name" && return 0
        sleep 0.2
    done
    [[ -s $LOG/$name.stderr ]] && tail -n 10 "$LOG/$name.stderr" >&2
    show_logs
    die "$name did not come up (no live pid in $pf after 10 s)"
}

cmd_start() {
    check_state_dir
    if healthy; then
        export_line
        return 0
    fi
    need_root start
    lock_state
    if healthy; then # someone else started it while we waited for the lock
        export_line
        return 0
    fi
    cmd_install
    mkdir -p "$STATE/etc" "$RUN" "$LOG" "$STATE/spool/ctld" "$STATE/spool/d"
    chmod 0755 "$STATE" "$STATE/etc"

    # Half-up (crashed daemon, stale node state, config from another run):
    # restart whatever of ours still runs, keeping the saved job state.
    if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd ||
        pid_alive "$SLURMD2_PID" slurmd || pid_alive "$RUN/slurmd.pid" slurmd; then
        log "cluster is not healthy; restarting its daemons"
        # (slurmd.pid: the single-slurmd layout of earlier versions)
        stop_pids 20 "$SLURMD_PID:slurmd" "$SLURMD2_PID:slurmd" "$RUN/slurmd.pid:slurmd" "$CTLD_PID:slurmctld"
    fi
    local p ports=("$CTLD_PORT" "$SLURMD_PORT")
    ((NODES == 2)) && ports+=("$SLURMD_PORT2")
    for p in "${ports[@]}"; do
        port_in_use "$p" && die "port $p is already in use (another slurmctld/slurmd?); set HPC_CKPT_CLUSTER_CTLD_PORT/HPC_CKPT_CLUSTER_SLURMD_PORT"
    done

    write_conf
    [[ $AUTH == munge ]] && start_munged
    export SLURM_CONF=$CONF

    start_daemon slurmctld "$CTLD_PID"
    start_daemon slurmd "$SLURMD_PID" -N "$NODE"
    if ((NODES == 2)); then start_daemon slurmd "$SLURMD2_PID" -N "$NODE2"; fi

    local deadline=$((SECONDS + START_TIMEOUT)) last_resume=0 s n
    while ((SECONDS < deadline)); do
        pid_alive "$CTLD_PID" slurmctld || { show_logs; die "slurmctld exited during startup"; }
        pid_alive "$SLURMD_PID" slurmd || { show_logs; die "slurmd exited during startup"; }
        if ((NODES == 2)); then
            pid_alive "$SLURMD2_PID" slurmd || { show_logs; die "slurmd of $NODE2 exited during startup"; }
        fi
        if ctld_up && node_usable; then
            log "nodes $(nodes | tr '\n' ' ')are up ($(nproc) CPUs each); cluster up"
            export_line
            return 0
        fi
        # A node left DOWN/DRAINED by an earlier run (e.g. slurmd stopped
        # first) is returned to service once slurmd is registered.
        if ((SECONDS - last_resume >= 3)); then
            for n in $(nodes); do
                s=$(node_state "$n")
                if [[ $s =~ DOWN|DRAIN|FAIL ]] && [[ $s != *NOT_RESPONDING* ]]; then
                    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
                    last_resume=$SECONDS
                fi
            done
        fi
        sleep 0.3
    done
    show_logs
    die "nodes not usable after ${START_TIMEOUT}s (states: $(for n in $(nodes); do printf '%s=%s ' "$n" "$(node_state "$n")"; done))"
}

# ---------------------------------------------------------------- status

cmd_status() {
    local rc=0 ctld=no slurmd=no munge=no
    pid_alive "$CTLD_PID" slurmctld && ctld="yes (pid $(pid_of "$CTLD_PID"))"
    pid_alive "$SLURMD_PID" slurmd && slurmd="yes (pid $(pid_of "$SLURMD_PID"))"
    if ((NODES == 2)); then
        if pid_alive "$SLURMD2_PID" slurmd; then slurmd+="; $NODE2: yes (pid $(pid_of "$SLURMD2_PID"))"; else slurmd+="; $NODE2: no"; fi
    fi
    if [[ $(conf_auth) == none ]]; then munge="not used (auth/none)"; elif munge_ok; then munge=yes; fi
    if healthy; then
        echo "cluster: running (state dir $STATE)"
    elif [[ $ctld == no && $slurmd != *yes* ]]; then
        echo "cluster: not running (state dir $STATE)"
        rc=3
    else
        echo "cluster: running but NOT healthy (state dir $STATE)"
        rc=1
    fi
    echo "slurmctld: $ctld; slurmd: $slurmd; munge: $munge"
    if [[ $ctld != no ]]; then
        export SLURM_CONF=$CONF
        echo "--- sinfo"
        timeout 10 sinfo || true
        echo "--- node"
        timeout 10 scontrol show node | grep -E 'NodeName|CPUAlloc|RealMemory|State=|Partitions|Reason' || true
        echo "--- squeue"
        timeout 10 squeue || true
        export_line
    fi
    return $rc
}

# ---------------------------------------------------------------- main

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//'; }

cmd=${1:-help}
case $cmd in
install) cmd_install ;;
start) cmd_start ;;
stop) check_state_dir; cmd_stop ;;
restart) check_state_dir; cmd_stop; cmd_start ;;
status) cmd_status ;;
env) export_line ;;
purge)
    check_state_dir
    cmd_stop
    if [[ -d $STATE ]]; then
        need_root purge
        rm -rf -- "$STATE"
        log "removed $STATE"
    fi
    ;;
help | -h | --help) usage ;;
*) usage >&2; exit 2 ;;
esac
