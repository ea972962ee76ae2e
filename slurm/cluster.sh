#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests (tests/test_slurm.py) and for trying
# slurm/train.sbatch without a real cluster. Debian/Ubuntu, as root.
#
#   bash slurm/cluster.sh install   apt-get install slurm-wlm and munge (if missing)
#   bash slurm/cluster.sh start     install, then start munged, slurmctld and slurmd (running: nothing to do)
#   bash slurm/cluster.sh stop      stop slurmd and slurmctld (munged keeps running)
#   bash slurm/cluster.sh env       print `export SLURM_CONF=...`: eval it to use sbatch/squeue here
#
# The cluster's files live under $CLUSTER_DIR (default /var/tmp/convnext-slurm), its config
# included: SLURM_CONF points the commands and the daemons at it, so a machine's own
# /etc/slurm/slurm.conf is never touched.
set -euo pipefail

dir=${CLUSTER_DIR:-/var/tmp/convnext-slurm}
export SLURM_CONF="$dir/slurm.conf"

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || { echo "cluster.sh: installing slurm-wlm needs root" >&2; exit 1; }
    # The package index of a fresh machine (CI, containers) is empty until updated.
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$dir/ctld" "$dir/d" "$dir/log"
    # Two CPUs whatever the machine has (config_overrides: slurmd trusts this line, not the
    # hardware), so a 2-task job fits on any CI machine. cred_expire also sets how long a requeued
    # job waits before it may start again (default 120 s): 5 s keeps the requeue test short.
    # sched_interval=1: a requeued job becomes eligible when its wait ends, which no event
    # announces; the periodic pass that starts it runs every 60 s by default.
    # ReturnToService=2: the node comes back by itself after a restart of the daemons.
    cat >"$SLURM_CONF.tmp" <<EOF
ClusterName=convnext-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

running() {  # the daemon whose pid file is $1 is alive (a zombie is not: a container's init may never reap it)
    local pid state
    [[ -f $1 ]] && pid=$(cat "$1" 2>/dev/null) && [[ -r /proc/$pid/stat ]] || return 1
    { read -r _ _ state _ <"/proc/$pid/stat"; } 2>/dev/null || return 1  # it may exit meanwhile
    [[ $state != Z ]]
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    # /run is a fresh tmpfs after a reboot or in a container: munged's socket directory may be gone.
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
}

wait_for() {  # seconds command...
    local tenths=$(($1 * 10))
    shift
    for _ in $(seq "$tenths"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "cluster.sh: timed out waiting for: $*" >&2
    return 1
}

node_ready() {  # up and taking jobs, busy or not
    [[ $(sinfo -h -n localhost -o %T) =~ ^(idle|mixed|allocated|completing)$ ]]
}

start() {
    install_packages
    [[ $(id -u) == 0 ]] || { echo "cluster.sh: starting the daemons needs root" >&2; exit 1; }
    start_munge
    if running "$dir/slurmctld.pid" && running "$dir/slurmd.pid" && node_ready; then
        return
    fi
    write_config
    running "$dir/slurmctld.pid" || slurmctld
    wait_for 30 scontrol ping
    running "$dir/slurmd.pid" || slurmd -N localhost
    # A node left DOWN or DRAINED by an earlier run (the daemons were killed) is put back to work.
    if ! wait_for 10 node_ready 2>/dev/null; then
        scontrol update nodename=localhost state=resume
        wait_for 30 node_ready
    fi
}

queue_empty() {
    [[ -z $(squeue -h -o %i) ]]
}

stop() {
    # A job still running or completing would leave its slurmstepd behind, waiting for a slurmd
    # that is gone: cancel what is left and let the node finish with it first.
    if running "$dir/slurmctld.pid" && running "$dir/slurmd.pid" && ! queue_empty; then
        squeue -h -o %i | xargs scancel
        wait_for 60 queue_empty || true
    fi
    local pidfile
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            while running "$pidfile"; do sleep 0.1; done
        fi
    done
}

case ${1:-} in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *)
        echo "usage: bash slurm/cluster.sh install|start|stop|env" >&2
        exit 2
        ;;
esac
