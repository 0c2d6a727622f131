#!/usr/bin/env bash
# Stops what slurm/local/start.sh started, by the PIDs in its state file, cancels the cluster's jobs
# first (their processes belong to slurmstepd, not to the daemons), and takes node1/node2 out of
# /etc/hosts again.   usage: slurm/local/stop.sh STATE_FILE
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
state=${1:?usage: stop.sh STATE_FILE}
# shellcheck source=/dev/null
source "$state"

# The PID still names the daemon we started (not a process that reused the number).
ours() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]; }

stop_pid() {
    local pid=$1 comm=$2
    [[ -n $pid ]] && ours "$pid" "$comm" || return 0
    kill -TERM "$pid"
    for _ in $(seq 50); do ours "$pid" "$comm" || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
}

if [[ -n ${SLURM_CONF:-} && -n ${SLURMCTLD_PID:-} ]] && ours "$SLURMCTLD_PID" slurmctld; then
    export SLURM_CONF
    scancel --full --signal=KILL $(squeue -h -o %i) 2>/dev/null
    for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
fi
stop_pid "${SLURMD_NODE1_PID:-}" slurmd
stop_pid "${SLURMD_NODE2_PID:-}" slurmd
stop_pid "${SLURMCTLD_PID:-}" slurmctld
stop_pid "${MUNGED_PID:-}" munged
if [[ -n ${HOSTS_LINE:-} ]]; then
    # Rewritten in place: /etc/hosts is often a bind mount that cannot be replaced by a rename.
    kept=$(grep -vxF "$HOSTS_LINE" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
fi
rm -rf "${DIR:?}"
