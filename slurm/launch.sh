#!/usr/bin/env bash
# `janus-pretrain train` on every node of a Slurm allocation, one launcher per node; the body of
# slurm/*.sbatch. Run from the repository root:
#
#   slurm/launch.sh CONFIG [key=value ...]          in the batch script: one srun task per node
#   slurm/launch.sh --node CONFIG [key=value ...]   what each task runs: this node's launcher
#
# Environment:
#   LAUNCHER=torchrun|deepspeed   torchrun (default) or the deepspeed launcher with a hostfile
#                                 (slurm/logs/hostfile-<job id>) written from SLURM_JOB_NODELIST
#   NPROC_PER_NODE                processes per node when the allocation has no GPUs (default 1)
#   MASTER_PORT                   rendezvous port on the first node (default: from the job id)
#   DRY_RUN=1                     print every node's launch command, start nothing
#
# Preemption: USR1 or TERM to the batch script is forwarded (through srun) to the training
# processes, which finish their step, checkpoint and exit 75; the job then requeues itself, and as
# training always runs with --resume, the rerun continues from that checkpoint.
set -euo pipefail

REQUEUE_EXIT_CODE=75  # janus_pretrain/train/signals.py
launcher=${LAUNCHER:-torchrun}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#hosts[@]})) || { echo "error: no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 2; }
master_addr=${hosts[0]}
# Distinct per job, so two jobs sharing a first node do not collide.
master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
hostfile=slurm/logs/hostfile-$SLURM_JOB_ID

procs_per_node() {
    if ((${SLURM_GPUS_ON_NODE:-0} > 0)); then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        echo "${NPROC_PER_NODE:-1}"
    fi
}

# Sets `cmd` to node $1's launch command for `train --config CONFIG --resume OVERRIDES...`.
node_command() {
    local rank=$1; shift
    local train=(janus_pretrain.cli train --config "$1" --resume "${@:2}")
    case $launcher in
        torchrun)
            cmd=(torchrun --nnodes="${#hosts[@]}" --nproc_per_node="$(procs_per_node)"
                 --node_rank="$rank" --master_addr="$master_addr" --master_port="$master_port"
                 -m "${train[@]}") ;;
        deepspeed)
            # --no_ssh: every node starts its own ranks (this srun task), no pdsh between nodes.
            cmd=(deepspeed --hostfile="$hostfile" --no_ssh --node_rank="$rank"
                 --master_addr="$master_addr" --master_port="$master_port"
                 --no_local_rank --module "${train[@]}") ;;
        *) echo "error: LAUNCHER=$launcher: expected torchrun or deepspeed" >&2; exit 2 ;;
    esac
}

write_hostfile() {
    local host slots
    slots=$(procs_per_node)
    for host in "${hosts[@]}"; do echo "$host slots=$slots"; done
}

# Waits for PID $1 and sets `rc` to its status; a trapped signal interrupts `wait`, so wait again.
wait_for() {
    while :; do
        caught=0 rc=0
        wait "$1" || rc=$?
        ((caught)) || return 0
    done
}

run_batch() {
    echo "$(date -Is) job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        if [[ $launcher == deepspeed ]]; then
            echo "hostfile $hostfile:"
            write_hostfile
        fi
        local rank line
        for rank in "${!hosts[@]}"; do
            node_command "$rank" "$@"
            line=$(printf '%q ' "${cmd[@]}")
            echo "node $rank (${hosts[$rank]}): ${line% }"
        done
        return 0
    fi
    [[ $launcher != deepspeed ]] || write_hostfile >"$hostfile"
    stop_sent=0
    trap forward_stop USR1 TERM
    srun --nodes="${#hosts[@]}" --ntasks-per-node=1 "$0" --node "$@" &
    srun_pid=$!
    wait_for "$srun_pid"
    if ((rc == REQUEUE_EXIT_CODE)); then
        echo "$(date -Is) training stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$rc"
}

forward_stop() {
    caught=1
    ((stop_sent)) && return
    stop_sent=1
    # srun hands USR1 to every process of the step on every node; the trainers act on it.
    echo "$(date -Is) stop requested: forwarding SIGUSR1 to the training processes"
    kill -USR1 "$srun_pid" 2>/dev/null || true
}

run_node() {
    node_command "$SLURM_NODEID" "$@"
    # The launchers would die of USR1 (its default action) and take their ranks along: they
    # inherit it ignored, while the trainers install their own handler.
    trap '' USR1
    "${cmd[@]}" &
    local pid=$!
    stopped=0
    trap 'caught=1 stopped=1' USR1 TERM
    wait_for "$pid"
    # torchrun reports every failed worker as 1, so it loses the trainers' 75: a node that was asked
    # to stop and whose torchrun then failed has stopped (resume falls back to the last complete
    # checkpoint should one rank have crashed instead).
    if ((stopped && rc != 0)) && [[ $launcher == torchrun ]]; then
        rc=$REQUEUE_EXIT_CODE
    fi
    return "$rc"
}

if [[ ${1:-} == --node ]]; then
    shift
    run_node "$@"
else
    (($# >= 1)) || { echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; }
    run_batch "$@"
fi
