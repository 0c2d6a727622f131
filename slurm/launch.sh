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
#   RETRIES=3 RETRY_WINDOW=86400  requeues after a failure allowed per window (seconds)
#   RETRY_LOG                     where the failures' times go (slurm/logs/failures-<job id>)
#
# Preemption: USR1 or TERM to the batch script is forwarded (through srun) to the training
# processes, which finish their step, checkpoint and exit 75; after USR1 (the time limit's
# warning, --signal=B:USR1@120) the job then requeues itself, and as training always runs with
# --resume, the rerun continues from that checkpoint. After TERM (scancel) it ends.
# Failure: a rank that dies (a GPU fault, an NCCL error, a lost node, kill -9) ends the step on
# every node (srun --kill-on-bad-exit; a rank left waiting in a collective fails after
# parallel.timeout_minutes), and the job requeues from the newest complete checkpoint, up to
# RETRIES times per RETRY_WINDOW (RETRY_LOG keeps the times). A config error
# is found before any rank starts (`train --check`, exit 2) and never requeued.
set -euo pipefail

REQUEUE_EXIT_CODE=75  # janus_pretrain/train/signals.py
CONFIG_ERROR_EXIT_CODE=2  # janus_pretrain/errors.py: a user error; a rerun would fail alike
retries=${RETRIES:-3}
retry_window=${RETRY_WINDOW:-86400}
# A failed collective aborts its communicators and ends the process (instead of hanging) ...
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# ... and the watchdog's own heartbeat ends a rank whose NCCL calls stop returning at all.
export TORCH_NCCL_ENABLE_MONITORING=${TORCH_NCCL_ENABLE_MONITORING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-900}
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
    rc=0
    WORLD_SIZE=$((${#hosts[@]} * $(procs_per_node))) LOCAL_WORLD_SIZE=$(procs_per_node) \
        python -m janus_pretrain.cli train --check --config "$@" || rc=$?
    ((rc == 0)) || return "$rc"
    stop_by=
    trap 'forward_stop USR1' USR1
    trap 'forward_stop TERM' TERM
    # One task per node holds the node's launcher and every rank: all of the node's CPUs.
    srun --nodes="${#hosts[@]}" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        --kill-on-bad-exit=1 "$0" --node "$@" &
    srun_pid=$!
    wait_for "$srun_pid"
    if [[ $stop_by == TERM ]]; then
        # scancel (or a preemption, which Slurm requeues by itself under PreemptMode=REQUEUE):
        # the ranks checkpointed; requeueing here would undo the cancel.
        echo "$(date -Is) training stopped by TERM (status $rc): not requeueing"
        return "$rc"
    fi
    if ((rc == REQUEUE_EXIT_CODE)) && [[ $stop_by == USR1 ]]; then
        echo "$(date -Is) training stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    ((rc != 0 && rc != CONFIG_ERROR_EXIT_CODE)) && retry_after_failure && return 0
    return "$rc"
}

# Requeues the job after a failure (status $rc) if the retry budget allows; else returns 1.
retry_after_failure() {
    local log=${RETRY_LOG:-slurm/logs/failures-$SLURM_JOB_ID} now recent=0 t
    now=$(date +%s)
    if [[ -f $log ]]; then
        while read -r t; do ((now - t < retry_window)) && recent=$((recent + 1)); done <"$log"
    fi
    if ((recent >= retries)); then
        echo "$(date -Is) training failed (status $rc); $recent retries in the last" \
             "${retry_window}s spent (RETRIES=$retries): not requeueing"
        return 1
    fi
    echo "$now" >>"$log"
    echo "$(date -Is) training failed (status $rc): requeueing job $SLURM_JOB_ID" \
         "(retry $((recent + 1)) of $retries per ${retry_window}s)"
    scontrol requeue "$SLURM_JOB_ID"
}

forward_stop() {
    caught=1
    [[ -z $stop_by ]] || return 0
    stop_by=$1
    # srun hands USR1 to every process of the step on every node; the trainers act on it.
    echo "$(date -Is) stop requested ($1): forwarding SIGUSR1 to the training processes"
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
