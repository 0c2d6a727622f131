#!/usr/bin/env bash
# A real Slurm on this one host, for the tests: munged, slurmctld and two slurmd emulating the nodes
# node1 and node2 (multiple-slurmd), all under a fresh directory and on loopback only.
#
#   state=$(slurm/local/start.sh)    # prints the state file: SLURM_CONF=..., PIDS=..., ...
#   export SLURM_CONF=...; sbatch --nodes=2 ...
#   slurm/local/stop.sh "$state"     # stops exactly what this started
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing (exit 69 when apt-get
# cannot). Needs root: the daemons run as root (munged as munge) and node1/node2 go into /etc/hosts,
# since MASTER_ADDR comes from `scontrol show hostnames` and must resolve.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
here=$(cd "$(dirname "$0")" && pwd)

install_missing() {
    local need=() cmd pkg
    for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null || need+=("$pkg")
    done
    ((${#need[@]})) || return 0
    local install=(apt-get install -y --no-install-recommends "${need[@]}")
    # An index fetched before the image was built may be gone: update only when the install fails.
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2; } ||
        { echo "error: apt-get cannot install ${need[*]}" >&2; exit 69; }
}

# A port nobody listens on, from a random start (bash's /dev/tcp connects only if one does).
free_port() {
    local port=$((20000 + RANDOM % 20000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    echo "$port"
}

# Blocks until `$@` succeeds, for at most $1 seconds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# A daemon writes its PID file after it has forked away from us: wait for it.
record_pid() {
    wait_for 10 grep -sqx '[0-9][0-9]*' "$2"
    echo "$1=$(cat "$2")" >>"$state"
}

install_missing
# 755 all the way: munged runs as munge and refuses a socket it cannot reach.
dir=$(mktemp -d /tmp/janus-slurm.XXXXXX)
chmod 755 "$dir"
state=$dir/cluster.env
echo "DIR=$dir" >"$state"
# Whatever fails from here on, undo what was started so far.
trap '"$here/stop.sh" "$state" >&2' ERR

mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
head -c 1024 /dev/urandom >"$dir/munge/munge.key"
chown -R munge: "$dir/munge"
chmod 400 "$dir/munge/munge.key"
socket=$dir/munge/munge.socket
runuser -u munge -- munged --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
record_pid MUNGED_PID "$dir/munge/munged.pid"

cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)
conf=$dir/slurm.conf
cat >"$conf" <<CONF
ClusterName=janus-local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmUser=root
SlurmdUser=root
# cred_expire=5: a requeued job may start again after 5 s instead of 120 s.
AuthType=auth/munge
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
# No systemd and no cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus
PartitionName=debug Default=YES Nodes=ALL State=UP
CONF
echo "SLURM_CONF=$conf" >>"$state"
export SLURM_CONF=$conf

hosts_line="127.0.0.1 node1 node2 # janus-local-slurm $dir"
echo "$hosts_line" >>/etc/hosts
echo "HOSTS_LINE='$hosts_line'" >>"$state"

slurmctld -i
record_pid SLURMCTLD_PID "$dir/slurmctld.pid"
for node in node1 node2; do
    slurmd -N "$node"
    record_pid "SLURMD_${node^^}_PID" "$dir/slurmd-$node.pid"
done

both_idle() { [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | sort | tr '\n' ' ') == "node1 idle node2 idle " ]]; }
wait_for 30 both_idle || { echo "error: nodes not idle: $(sinfo -N 2>&1)" >&2; false; }
echo "$state"
