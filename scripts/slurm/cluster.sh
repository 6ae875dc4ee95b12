#!/usr/bin/env bash
# A throw-away Slurm cluster on this one host, for aifab's tests (Debian 12, Slurm 22.05).
#
#   cluster.sh install              apt-get the packages unless they are installed
#   cluster.sh start DIR            configure and start slurmctld and nodes n1, n2 under DIR
#   cluster.sh stop DIR             kill its jobs, stop its daemons (by pid, never by name)
#   cluster.sh start-node DIR NODE  start a node's slurmd (n3 is declared but not started)
#   cluster.sh add-node DIR NODE    the same: brings n3 (or a killed node) into the cluster
#   cluster.sh kill-node DIR NODE   a node crash: SIGKILL its jobs and slurmd, then mark it DOWN
#   cluster.sh stop-ctld DIR        stop only slurmctld: the cluster is unreachable, jobs go on
#   cluster.sh start-ctld DIR       start slurmctld again, with the state it saved
#   cluster.sh env DIR              print the SLURM_CONF line to use this cluster from a shell
#
# Several clusters can run at once (one per pytest-xdist worker): each takes free TCP ports and
# keeps every file under its own DIR; they share only munged, which they start if needed and
# leave running (another cluster may still need it).
# Every daemon is started with AIFAB_SLURM_CLUSTER=DIR in its environment, so `stop` can tell
# this cluster's processes from another's without trusting a pid alone.
set -euo pipefail

PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
NODES_AT_START=(n1 n2)
ALL_NODES=(n1 n2 n3)
NODE_CPUS=${AIFAB_SLURM_NODE_CPUS:-4}
NODE_MEMORY_MB=${AIFAB_SLURM_NODE_MEMORY_MB:-4000}
NODE_GPUS=4
PARTITION=gpu
WAIT_S=${AIFAB_SLURM_WAIT_S:-60}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

cmd_install() {
    installed && return 0
    [[ $(id -u) == 0 ]] || die "installing Slurm needs root (apt-get install ${PACKAGES[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet: update only when the first try fails.
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null; } \
        || die "apt-get install ${PACKAGES[*]} failed"
    installed || die "the Slurm packages are installed but slurmctld/slurmd/sbatch/munged are not on PATH"
}

# -- helpers ---------------------------------------------------------------------------------------

free_ports() {  # N ports nobody listens on now, all distinct (bound together, then released)
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

conf_of() { echo "$1/etc/slurm.conf"; }

slurm() {  # run a Slurm client command against this cluster
    local dir=$1
    shift
    SLURM_CONF=$(conf_of "$dir") timeout 20 "$@"
}

ensure_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (is the munge package installed?)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # Two clusters starting at once may both get here: the loser fails on munged's lock, harmlessly.
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer"
}

is_ours() {  # is pid $2 a live process of the cluster in $1 (and not a recycled pid)?
    local pid=$2
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    grep -qxzF "AIFAB_SLURM_CLUSTER=$1" "/proc/$pid/environ" 2>/dev/null
}

pids_with_env() {  # the pids whose environment holds every one of the VAR=VALUE arguments
    local pid entry file
    for file in /proc/[0-9]*/environ; do
        pid=${file#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        for entry in "$@"; do
            grep -qxzF -- "$entry" "$file" 2>/dev/null || continue 2
        done
        echo "$pid"
    done
}

job_pids() {  # the processes of this cluster's jobs (on one node, if given), slurmstepd included
    local dir=$1 node=${2:-} pid
    local conf_entry="SLURM_CONF=$(conf_of "$dir")"
    if [[ -n $node ]]; then
        pids_with_env "$conf_entry" "SLURMD_NODENAME=$node"
        return
    fi
    # Every process started for a job carries SLURM_JOB_ID; slurmstepd (which has no job
    # variables) is told apart by its name, so a shell that merely exported SLURM_CONF is spared.
    for pid in $(pids_with_env "$conf_entry"); do
        if grep -qzE '^SLURM_JOB_ID=' "/proc/$pid/environ" 2>/dev/null \
            || [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == slurmstepd* ]]; then
            echo "$pid"
        fi
    done
}

# Start a daemon in its own session, so a Ctrl-C meant for the caller does not reach it. `setsid`
# run from a non-interactive shell does not fork, so $! is the daemon's own pid.
launch_daemon() {
    local dir=$1 name=$2
    shift 2
    AIFAB_SLURM_CLUSTER=$dir SLURM_CONF=$(conf_of "$dir") setsid "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/run/$name.pid"
}

stop_pidfile() {  # TERM, then KILL after $3 tenths of a second, the daemon of one pid file
    local dir=$1 name=$2 patience=${3:-50} pid
    local file=$dir/run/$name.pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if is_ours "$dir" "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq "$patience"); do
            is_ours "$dir" "$pid" || break
            sleep 0.1
        done
        if is_ours "$dir" "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

node_state() {  # the compact state sinfo gives one node ("idle", "down*", ...), or nothing
    slurm "$1" sinfo -h -N -n "$2" -o '%t' 2>/dev/null | head -n1 || true
}

wait_idle() {
    local dir=$1 node
    shift
    local deadline=$((SECONDS + WAIT_S))
    for node in "$@"; do
        until [[ $(node_state "$dir" "$node") =~ ^(idle|mix|alloc)$ ]]; do
            ((SECONDS < deadline)) || die "node $node is not idle after ${WAIT_S}s (see $dir/log)"
            sleep 0.2
        done
    done
}

# -- configuration ---------------------------------------------------------------------------------

write_config() {
    local dir=$1 host ports
    host=$(hostname -s)
    read -r -a ports <<<"$(free_ports $((1 + ${#ALL_NODES[@]})))"
    mkdir -p "$dir/etc" "$dir/state" "$dir/spool" "$dir/run" "$dir/log" "$dir/dev"
    local gpu
    for gpu in $(seq 0 $((NODE_GPUS - 1))); do
        # Character devices, as real GPUs are: with plain files Slurm counts the GPUs but leaves
        # CUDA_VISIBLE_DEVICES unset. Major 195 is NVIDIA's; nothing here opens them.
        [[ -c $dir/dev/nvidia$gpu ]] || mknod "$dir/dev/nvidia$gpu" c 195 "$gpu"
    done
    {
        echo "ClusterName=aifab${ports[0]}"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=${ports[0]}"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=cred_expire=10"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/run/slurmctld.slurm.pid"
        echo "SlurmdPidFile=$dir/run/slurmd-%n.slurm.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "MpiDefault=none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SchedulerType=sched/backfill"
        # By default Slurm may hold a submitted batch job up to 3 s before scheduling it: the
        # tests submit one job after another and would wait that long each time.
        echo "SchedulerParameters=batch_sched_delay=0"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core_Memory"
        echo "GresTypes=gpu"
        # A node that was marked DOWN comes back by itself once its slurmd registers again.
        echo "ReturnToService=2"
        # CPUs/memory below are declared, not what this small host has.
        echo "SlurmdParameters=config_overrides"
        # aifab decides retries itself: Slurm must never run a task again behind its back.
        echo "JobRequeue=0"
        echo "KillWait=5"
        # Clients retry an unreachable controller for about MessageTimeout seconds: keep it short
        # so "controller down" is noticed quickly.
        echo "MessageTimeout=3"
        echo "SlurmdTimeout=30"
        echo "MinJobAge=300"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        local i=1 node
        for node in "${ALL_NODES[@]}"; do
            echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]}" \
                "CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY_MB Gres=gpu:$NODE_GPUS Feature=aifab-test"
            i=$((i + 1))
        done
        echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${ALL_NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$dir/etc/slurm.conf"
    {
        echo "AutoDetect=off"
        echo "NodeName=$(IFS=,; echo "${ALL_NODES[*]}") Name=gpu File=$dir/dev/nvidia[0-$((NODE_GPUS - 1))]"
    } >"$dir/etc/gres.conf"
}

# -- commands --------------------------------------------------------------------------------------

cmd_start_ctld() {
    local dir=$1
    launch_daemon "$dir" slurmctld slurmctld -D -f "$(conf_of "$dir")"
    local deadline=$((SECONDS + WAIT_S))
    until slurm "$dir" scontrol ping 2>/dev/null | grep -q 'is UP'; do
        is_ours "$dir" "$(<"$dir/run/slurmctld.pid")" || die "slurmctld exited (see $dir/log/slurmctld.log)"
        ((SECONDS < deadline)) || die "slurmctld does not answer after ${WAIT_S}s"
        sleep 0.2
    done
    # Nodes re-register a moment after the controller is back; until then sinfo calls them
    # "unknown". Wait for those whose slurmd runs, so callers see the cluster as it was.
    local file node running=()
    for file in "$dir"/run/slurmd-*.pid; do
        [[ -e $file && $file != *.slurm.pid ]] || continue
        node=$(basename "$file" .pid)
        node=${node#slurmd-}
        is_ours "$dir" "$(<"$file")" && running+=("$node")
    done
    ((${#running[@]} == 0)) || wait_idle "$dir" "${running[@]}"
}

cmd_stop_ctld() { stop_pidfile "$1" slurmctld; }

cmd_start_node() {
    local dir=$1 node=$2
    [[ " ${ALL_NODES[*]} " == *" $node "* ]] || die "unknown node $node (declared: ${ALL_NODES[*]})"
    local file=$dir/run/slurmd-$node.pid
    if ! [[ -f $file ]] || ! is_ours "$dir" "$(<"$file")"; then
        mkdir -p "$dir/spool/$node"
        launch_daemon "$dir" "slurmd-$node" slurmd -D -N "$node" -f "$(conf_of "$dir")"
    fi
    wait_idle "$dir" "$node"
}

parent_of() {  # the parent pid of pid $1 (the name in /proc/PID/stat may hold spaces)
    local stat ppid
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    read -r _ ppid _ <<<"$stat"
    echo "$ppid"
}

cmd_kill_node() {  # as a crash would: the node's jobs and slurmd die at once, then Slurm is told
    local dir=$1 node=$2 pid parent victims=()
    # slurmstepd first: left alive, it would report the batch script's death as an ordinary job
    # end (FAILED by SIGKILL) where a crashed node leaves Slurm nothing but NODE_FAIL.
    for pid in $(job_pids "$dir" "$node"); do
        parent=$(parent_of "$pid")
        if [[ -n $parent && $(tr '\0' ' ' <"/proc/$parent/cmdline" 2>/dev/null) == slurmstepd* ]]; then
            victims=("$parent" "${victims[@]}")
        fi
        victims+=("$pid")
    done
    ((${#victims[@]} == 0)) || kill -KILL "${victims[@]}" 2>/dev/null || true
    local file=$dir/run/slurmd-$node.pid
    if [[ -f $file ]] && is_ours "$dir" "$(<"$file")"; then kill -KILL "$(<"$file")" || true; fi
    rm -f "$file"
    # Without this, slurmctld would notice only after SlurmdTimeout.
    slurm "$dir" scontrol update NodeName="$node" State=DOWN Reason=aifab-test-removed
}

cmd_start() {
    local dir=$1
    installed || die "Slurm is not installed: run '$0 install' first"
    [[ $(id -u) == 0 ]] || die "the test cluster runs its daemons as root (SlurmdUser=root, mknod)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ ! -f $dir/run/slurmctld.pid ]] || ! is_ours "$dir" "$(<"$dir/run/slurmctld.pid")" \
        || die "a cluster already runs in $dir"
    rm -rf "$dir/state" "$dir/spool" "$dir/run"  # a clean start: no jobs or nodes from a previous run
    write_config "$dir"
    ensure_munge
    cmd_start_ctld "$dir"
    local node
    for node in "${NODES_AT_START[@]}"; do
        mkdir -p "$dir/spool/$node"
        launch_daemon "$dir" "slurmd-$node" slurmd -D -N "$node" -f "$(conf_of "$dir")"
    done
    wait_idle "$dir" "${NODES_AT_START[@]}"
    echo "SLURM_CONF=$(conf_of "$dir")"
}

cmd_stop() {
    local dir=$1
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    # Jobs first: their processes run under slurmstepd, which outlives slurmd, and nothing of
    # the cluster's state needs to survive (start wipes it).
    local pid
    for pid in $(job_pids "$dir"); do kill -KILL "$pid" 2>/dev/null || true; done
    local file name
    for file in "$dir"/run/*.pid; do
        [[ -e $file ]] || continue
        name=$(basename "$file" .pid)
        [[ $name == *.slurm ]] && continue  # Slurm's own copies of the pids, not ours
        # Little patience: nothing needs saving. (slurmctld takes seconds to exit while jobs
        # were running; stop-ctld, whose state must survive, waits for it.)
        stop_pidfile "$dir" "$name" 10
    done
    # Whatever is left: a job process forked meanwhile, daemons whose pid file was lost.
    for pid in $(job_pids "$dir") $(pids_with_env "AIFAB_SLURM_CLUSTER=$dir"); do
        kill -KILL "$pid" 2>/dev/null || true
    done
}

main() {
    local command=${1:-}
    shift || true
    case $command in
    install) cmd_install ;;
    start) [[ $# == 1 ]] || die "usage: $0 start DIR"; cmd_start "$1" ;;
    stop) [[ $# == 1 ]] || die "usage: $0 stop DIR"; cmd_stop "$1" ;;
    start-node | add-node)
        [[ $# == 2 ]] || die "usage: $0 $command DIR NODE"
        cmd_start_node "$(cd "$1" && pwd)" "$2"
        ;;
    kill-node) [[ $# == 2 ]] || die "usage: $0 kill-node DIR NODE"; cmd_kill_node "$(cd "$1" && pwd)" "$2" ;;
    stop-ctld) [[ $# == 1 ]] || die "usage: $0 stop-ctld DIR"; cmd_stop_ctld "$(cd "$1" && pwd)" ;;
    start-ctld) [[ $# == 1 ]] || die "usage: $0 start-ctld DIR"; cmd_start_ctld "$(cd "$1" && pwd)" ;;
    env) [[ $# == 1 ]] || die "usage: $0 env DIR"; echo "SLURM_CONF=$(conf_of "$(cd "$1" && pwd)")" ;;
    *) die "usage: $0 install | start DIR | stop DIR | add-node DIR NODE | start-node DIR NODE | kill-node DIR NODE | stop-ctld DIR | start-ctld DIR | env DIR" ;;
    esac
}

main "$@"
