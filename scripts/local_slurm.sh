#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the launcher's tests and for trying `dlm launch`.
#
#   scripts/local_slurm.sh install      apt-get install slurm-wlm + munge (Debian/Ubuntu, as root)
#   scripts/local_slurm.sh start DIR    munged + slurmctld + slurmd with a generated slurm.conf in DIR
#   scripts/local_slurm.sh stop DIR     stop the daemons started in DIR
#
# After `start`, `export SLURM_CONF=DIR/slurm.conf` points sbatch/squeue/scontrol at the cluster.
# Everything (state, logs, sockets, spool) lives under DIR; nothing in /etc is changed except what
# the packages install. Runs as root: the daemons run as root (SlurmUser=root), which is why
# munged needs --force. No cgroups: processes are tracked by /proc (proctrack/linuxproc).
set -euo pipefail

cmd=${1:?usage: $0 install|start DIR|stop DIR}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "local_slurm: $what did not come up; logs in $dir" >&2
            tail -n 20 "$dir"/*.log >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}

start() {
    dir=$(realpath -m "${1:?start needs a directory}")
    mkdir -p "$dir"/{state,spool,munge}
    chmod 700 "$dir/munge"
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
    # A private munge key and socket: this cluster trusts nothing else on the machine.
    [[ -f $dir/munge/munge.key ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=128 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$dir/slurm.conf" <<CONF
ClusterName=dlmlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
PreemptType=preempt/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    : >"$dir/cgroup.conf"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$dir/slurm.conf"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$dir/slurm.conf"
    wait_for 60 "slurmd (node idle)" bash -c "sinfo -h -o %T | grep -qx idle"
    echo "local_slurm: up; export SLURM_CONF=$dir/slurm.conf"
}

stop() {
    dir=$(realpath -m "${1:?stop needs a directory}")
    local pidfile jobs
    # Cancel what still runs first: with the daemons gone, job processes would be orphaned.
    export SLURM_CONF=$dir/slurm.conf
    if [[ -f $SLURM_CONF ]] && jobs=$(squeue -h -o %i 2>/dev/null) && [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs || true
        wait_for 60 "the cancelled jobs to end" bash -c '[[ -z $(squeue -h -o %i) ]]'
    fi
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}

case $cmd in
install) install ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
*) echo "usage: $0 install|start DIR|stop DIR" >&2; exit 2 ;;
esac
