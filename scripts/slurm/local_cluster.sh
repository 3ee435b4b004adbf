#!/usr/bin/env bash
# A throwaway one-node SLURM cluster built from the OS packages (Debian/Ubuntu: slurm-wlm, munge),
# for tests and `make slurm-check`. No systemd, no /etc/slurm, no accounting database.
#
#   scripts/slurm/local_cluster.sh available      # exit 0 if the binaries are there and we are root
#   eval "$(scripts/slurm/local_cluster.sh start DIR)"   # prints `export SLURM_CONF=DIR/slurm.conf`
#   sbatch --wrap 'echo hi'; scontrol show job 1
#   scripts/slurm/local_cluster.sh stop DIR
#
# Everything lives under DIR: slurm.conf, the munge key/socket/pid/log/seed, slurmctld state,
# slurmd spool, logs and pid files. The daemons get every path on their command line or in
# DIR/slurm.conf; the clients (sbatch, srun, scontrol, ...) find the config through SLURM_CONF and
# the munge socket through AuthInfo in it, so the system's /etc/slurm and /run/munge are never used.
# Progress and errors go to stderr; stdout carries only the `export` line, so eval works.
#
# No accounting database, so no sacct: a finished job stays in `scontrol show job ID` (JobState,
# ExitCode, Restarts) for MinJobAge seconds (600 here), which is how tests read final states.
#
# Environment (all optional):
#   SLURM_LOCAL_CTLD_PORT   slurmctld port; default: the first P = 6817, 6819, ... with P and P+1 free
#   SLURM_LOCAL_SLURMD_PORT slurmd port;    default: slurmctld port + 1
#   SLURM_LOCAL_CPUS        CPUs of the node; default: nproc
#   SLURM_LOCAL_MEMORY_MB   RealMemory of the node; default: half the RAM, at most 4096
#   SLURM_LOCAL_TIMEOUT     seconds to wait for the node to be idle; default 30
#   SLURM_LOCAL_REQUEUE_DELAY  AuthInfo cred_expire: seconds a requeued job stays PENDING
#                           (Reason=BeginTime) before it may run again; default 10 (SLURM's is 120)
set -euo pipefail
# errtrace: the ERR trap of start (show logs, clean up) also fires inside the functions it calls.
set -o errtrace

# slurmctld, slurmd and munged are in /usr/sbin, which is not on every root PATH (sudo, cron).
export PATH="$PATH:/usr/sbin:/sbin"

readonly DAEMONS=(slurmctld slurmd munged)
readonly CLIENTS=(sbatch srun scontrol sinfo squeue scancel)

log() { printf 'local_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 start DIR | stop DIR | available
EOF
    exit 2
}

# --- available ------------------------------------------------------------------------------------

cmd_available() {
    local missing=() b
    for b in "${DAEMONS[@]}" "${CLIENTS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if ((${#missing[@]})); then
        echo "local SLURM cluster unavailable: missing ${missing[*]} (apt-get install slurm-wlm munge provides them)"
        return 1
    fi
    # slurmd and munged want to run as root here (SlurmUser=root, slurmd switches to job users).
    if [[ $(id -u) != 0 ]]; then
        echo "local SLURM cluster unavailable: must run as root (slurmd needs it; apt-get install slurm-wlm munge provides the binaries)"
        return 1
    fi
    # A binary that is on PATH but does not run (broken install, missing library) is as bad as none.
    if ! slurmctld -V >/dev/null 2>&1 || ! slurmd -V >/dev/null 2>&1 || ! munged --version >/dev/null 2>&1; then
        echo "local SLURM cluster unavailable: slurmctld/slurmd/munged do not run (reinstall: apt-get install slurm-wlm munge)"
        return 1
    fi
    return 0
}

# --- helpers --------------------------------------------------------------------------------------

# True if something listens on TCP port $1 (v4 or v6). Reads /proc so it needs neither ss nor netstat.
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    # field 2 is local address ADDR:PORT (hex), field 4 the state; 0A is LISTEN
    awk -v p="$hex" 'NR > 1 { split($2, a, ":"); if (a[length(a)] == p && $4 == "0A") found = 1 }
                     END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

pick_ports() {
    if [[ -n ${SLURM_LOCAL_CTLD_PORT:-} ]]; then
        ctld_port=$SLURM_LOCAL_CTLD_PORT
    else
        # Walk up in pairs from the standard ports: a second cluster or a leftover daemon is skipped.
        local p
        for ((p = 6817; p < 6817 + 400; p += 2)); do
            if ! port_in_use "$p" && ! port_in_use $((p + 1)); then
                ctld_port=$p
                break
            fi
        done
        [[ -n $ctld_port ]] || die "no free port pair in 6817-7217; set SLURM_LOCAL_CTLD_PORT"
    fi
    slurmd_port=${SLURM_LOCAL_SLURMD_PORT:-$((ctld_port + 1))}
    if port_in_use "$ctld_port"; then die "slurmctld port $ctld_port is in use"; fi
    if port_in_use "$slurmd_port"; then die "slurmd port $slurmd_port is in use"; fi
}

# True if pid $1 runs. A zombie does not count: the daemons fork away, so their parent is PID 1,
# which in a container may be slow to reap them (or never do so), and kill -0 succeeds on zombies.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }    # after "PID (comm) ": the state letter first
    [[ -n $stat && ${stat:0:1} != Z ]]
}

# Pid from pid file $1 if that process is alive and is program $2 (guards against recycled pids).
live_pid() {
    local file=$1 prog=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && alive "$pid" || return 1
    # /proc/PID/comm is at most 15 characters: "slurmctld", "slurmd", "munged" all fit.
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$prog" ]] || return 1
    echo "$pid"
}

pid_file() {
    case $1 in
        munged) echo "$dir/munge/munged.pid" ;;
        *) echo "$dir/run/$1.pid" ;;
    esac
}

show_logs() {
    local f
    for f in "$dir/munge/munged.log" "$dir/log/slurmctld.log" "$dir/log/slurmctld.stderr" \
        "$dir/log/slurmd.log" "$dir/log/slurmd.stderr"; do
        [[ -s $f ]] || continue
        log "---- tail of $f"
        tail -n 25 "$f" >&2 || true
    done
}

# --- start ----------------------------------------------------------------------------------------

write_conf() {
    local cpus=$1 mem=$2 cred_expire=$3
    # An empty plugstack.conf: the default would be /etc/slurm/plugstack.conf (SPANK plugins of
    # the host), which tests must not depend on.
    : >"$dir/plugstack.conf"
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node throwaway cluster, see that script.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root

# munge with a private key and socket (not /etc/munge, not /run/munge).
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sockdir/munge.socket,cred_expire=$cred_expire

StateSaveLocation=$dir/state
SlurmdSpoolDir=$sockdir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf

# No cgroups (containers, no systemd): processes are tracked through /proc, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU

# Requeue is allowed (sbatch --requeue, scontrol requeue); a node that was down comes back by itself.
JobRequeue=1
ReturnToService=2
# SIGTERM -> SIGKILL grace on cancel/requeue/time limit.
KillWait=5
# No accounting DB: finished jobs stay in "scontrol show job" for MinJobAge seconds.
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

# Schedule quickly: a small cluster for tests, nothing to batch up.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
InactiveLimit=0
# No mail on this cluster; the default /bin/mail is usually absent and logs an error.
MailProg=/bin/true
Waittime=0
SlurmdTimeout=60
SlurmctldTimeout=60

NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    local msg
    msg=$(cmd_available) || die "$msg"

    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    local d
    for d in slurmctld slurmd munged; do
        if live_pid "$(pid_file "$d")" "$d" >/dev/null; then
            die "$d from $dir is still running; run: $0 stop $dir"
        fi
    done

    node=$(hostname -s 2>/dev/null || true)
    node=${node:-localhost}
    local cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
    local mem=${SLURM_LOCAL_MEMORY_MB:-}
    if [[ -z $mem ]]; then
        mem=$(awk '/^MemTotal:/ { m = int($2 / 1024 / 2); print (m > 4096 ? 4096 : m) }' /proc/meminfo)
    fi
    pick_ports

    mkdir -p "$dir/state" "$dir/run" "$dir/log" "$dir/munge"
    # Unix socket paths are limited to 108 bytes, and slurmstepd puts sockets named
    # NODE_JOBID.STEPID in the spool: with a long DIR (pytest's tmp_path), put the munge socket and
    # the spool in a short directory under /tmp instead, linked as DIR/sock and removed by stop.
    if ((${#dir} <= 60)); then
        sockdir=$dir/sock
        mkdir -p "$sockdir"
    else
        sockdir=$(mktemp -d "${TMPDIR:-/tmp}/slurm-local.XXXXXX")
        ln -sfn "$sockdir" "$dir/sock"
    fi
    mkdir -p "$sockdir/spool"
    # munged refuses a socket directory that others cannot enter (clients of other users), and
    # a log/key directory that others can write.
    chmod 755 "$sockdir" "$dir/munge"

    write_conf "$cpus" "$mem" "${SLURM_LOCAL_REQUEUE_DELAY:-10}"

    # Any failure from here on: show what the daemons said, stop what was started, exit non-zero.
    trap 'trap - ERR; log "start failed"; show_logs; cmd_stop >/dev/null 2>&1 || true; exit 1' ERR

    log "starting munged"
    [[ -s $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key" 2>/dev/null ||
        { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none && chmod 600 "$dir/munge/munge.key"; }
    # --force: munged also insists that every ancestor of the socket be world-executable, which
    # pytest's 0700 /tmp/pytest-of-root is not; with --force that is only a warning (we are root).
    munged --force \
        --socket="$sockdir/munge.socket" \
        --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" 2>>"$dir/munge/munged.log"

    export SLURM_CONF=$dir/slurm.conf
    log "starting slurmctld (port $ctld_port)"
    # -c: cold start (no state to recover); -i: ignore errors reading a state file.
    # The daemons fork into the background and write their pid files themselves.
    slurmctld -f "$SLURM_CONF" -c -i 2>>"$dir/log/slurmctld.stderr"
    log "starting slurmd (port $slurmd_port, node $node, $cpus CPUs)"
    slurmd -f "$SLURM_CONF" -N "$node" 2>>"$dir/log/slurmd.stderr"

    local timeout=${SLURM_LOCAL_TIMEOUT:-30} t0=$SECONDS state=""
    while ((SECONDS - t0 < timeout)); do
        state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
        [[ $state == idle ]] && break
        # A daemon that exited (bad config, port taken) will not come back: fail now, not at timeout.
        # slurmctld and slurmd write their pid files a moment after forking, hence the grace.
        if ((SECONDS - t0 >= 3)); then
            for d in slurmctld slurmd munged; do
                live_pid "$(pid_file "$d")" "$d" >/dev/null || { log "$d is not running"; false; }
            done
        fi
        sleep 0.5
    done
    [[ $state == idle ]] || { log "node $node not idle after ${timeout}s (state: ${state:-no answer})"; false; }
    trap - ERR

    log "cluster up in $((SECONDS - t0)) s after the daemons started: node $node idle, logs in $dir/log"
    echo "export SLURM_CONF=$dir/slurm.conf" | tee "$dir/env"
}

# --- stop -----------------------------------------------------------------------------------------

# Pids of all descendants of pid $1 (one per line).
descendants() {
    ps -e -o pid= -o ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            for (p in parent) {
                q = parent[p]
                while (q > 1) { if (q == root) { print p; break } q = parent[q] }
            }
        }'
}

# Send TERM to pid $1, wait up to $2 seconds until it is gone, then KILL and wait again.
terminate() {
    local pid=$1 wait=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${wait}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid survived SIGKILL"
    return 1
}

cmd_stop() {
    [[ -d $dir ]] || die "no such directory: $dir"
    dir=$(cd "$dir" && pwd -P)
    local pid i status=0

    # Jobs first, while slurmctld still runs: slurmstepd and the job processes outlive slurmd
    # (by design, so slurmd can restart), and would be left behind.
    if live_pid "$dir/run/slurmctld.pid" slurmctld >/dev/null && [[ -f $dir/slurm.conf ]]; then
        export SLURM_CONF=$dir/slurm.conf
        local jobs=()
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
        if ((${#jobs[@]})); then
            log "cancelling jobs ${jobs[*]}"
            scancel --quiet "${jobs[@]}" 2>/dev/null || true
            # KillWait (5 s) then SIGKILL; leave a margin.
            for ((i = 0; i < 150; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi

    # slurmd first (it would otherwise complain that slurmctld is gone), munged last (both use it).
    local d
    for d in slurmd slurmctld munged; do
        if pid=$(live_pid "$(pid_file "$d")" "$d"); then
            log "stopping $d (pid $pid)"
            terminate "$pid" 15 || status=1
        fi
    done

    # slurmstepd of this cluster that survived (slurmctld was already gone, or a job ignored the
    # cancel): they keep DIR's slurmd.log open. Kill each with its job processes (its descendants).
    local p fd stepd
    for p in /proc/[0-9]*; do
        [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
        for fd in "$p"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$dir/log/"* ]]; then
                stepd=${p#/proc/}
                log "killing leftover slurmstepd $stepd and its processes"
                # shellcheck disable=SC2046  # one pid per word
                kill -KILL "$stepd" $(descendants "$stepd") 2>/dev/null || true
                break
            fi
        done
    done

    # The short socket directory outside DIR, if start made one.
    if [[ -L $dir/sock ]]; then
        rm -rf -- "$(readlink "$dir/sock")"
        rm -f -- "$dir/sock"
    fi
    log "stopped"
    return "$status"
}

# --- main -----------------------------------------------------------------------------------------

case ${1:-} in
    available)
        (($# == 1)) || usage
        cmd_available
        ;;
    start | stop)
        (($# == 2)) || usage
        dir=$2
        node="" sockdir="" ctld_port="" slurmd_port=""
        "cmd_$1"
        ;;
    *) usage ;;
esac
