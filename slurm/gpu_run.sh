#!/usr/bin/env bash
# The one-GPU run (docs/gpu.md): installs the carried wheels offline, then three phases, each
# under its own time limit, each writing its results into OUT as it finishes, so a run cut short
# still returns the phases it finished:
#   a  a_cuda.json       CUDA correctness (python -m janus_pretrain.bench cuda)
#   b  b_speed.json      bf16 training-step speed and MFU (python -m janus_pretrain.bench gpu)
#   c  c_{ar,janus}.json Multi30k en->de at the authors' IWSLT shape (configs/model/iwslt.yaml):
#                        ar, then janus, each alone on the GPU for as many updates as fit in
#                        C_TRAIN_S (the limit's SIGTERM ends a run with a checkpoint), validation
#                        every C_EVAL updates, then test_2016_flickr (AR beam 5; janus also NAR
#                        T=1/4/10), and AR greedy vs spec decoding at batch 1 (into log.txt);
#      c_metrics_{ar,janus}.jsonl  their training and validation curves, updates/s included
#   log.txt              everything printed
# At most 8 files come back from the machine: this is 7.
#
#   bash slurm/gpu_run.sh OUT               on the GPU machine (needs .whl/ and .gpu_data/:
#                                           `make gpu-wheels`)
#   bash slurm/gpu_run.sh OUT --dry-run-cpu every phase at tiny shapes on CPU, with this Python
#                                           ($PYTHON, default python3) and DATA_ROOT's Multi30k
# Phase limits and phase c's size come from the environment (defaults below); so does a rerun of
# a part: PHASES="a c" (default "a b c"), CHECKS="loss_scale_skip" (phase a's checks, default all),
# C_RUNS=janus (phase c's runs, default "ar janus").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: slurm/gpu_run.sh OUT [--dry-run-cpu]}
DRY=${2:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY" = --dry-run-cpu ]; then
    PY=${PYTHON:-python3}
    : "${A_S:=300}" "${B_S:=300}" "${C_STEPS:=4}" "${C_TRAIN_S:=300}" "${C_EVAL_S:=300}"
    C_MODEL=tiny C_TOKENS=256 C_EVAL=4 C_WARMUP=1 C_VALID=4 C_VOCAB=300 C_WORKERS=1 C_LATENCY=2
    C_LIMIT=(--limit 4)
    DATA_ROOT=${DATA_ROOT:?the dry run reads Multi30k from DATA_ROOT}
else
    [ -f .whl/MANIFEST ] || { echo "gpu_run: .whl/MANIFEST missing: run make gpu-wheels"; exit 2; }
    while read -r wheel; do
        [ -f ".whl/$wheel" ] || { echo "gpu_run: wheel missing: .whl/$wheel"; exit 2; }
    done < .whl/MANIFEST
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_run: the wheels did not install"; exit 2; }
    export PYTHONPATH=/tmp/site
    PY=python3
    $PY -c "import deepspeed, megatron.core, omegaconf, datasets" || {
        echo "gpu_run: a carried package does not import"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    : "${A_S:=80}" "${B_S:=120}" "${C_STEPS:=100000}" "${C_TRAIN_S:=120}" "${C_EVAL_S:=70}"
    C_MODEL=iwslt C_TOKENS=4096 C_EVAL=500 C_WARMUP=300 C_VALID=200 C_VOCAB=8000 C_WORKERS=8
    C_LATENCY=20
    C_LIMIT=()
    DATA_ROOT=${DATA_ROOT:-.gpu_data}
fi
FLAG=${DRY:+--dry-run-cpu}
PHASES=${PHASES:-a b c} C_RUNS=(${C_RUNS:-ar janus})
phase() { echo "== phase $1 ($(date -u +%T)): ${*:2}"; }
failed=()  # the steps that failed or ran out of time: the exit status is 1 if any

if [[ " $PHASES " == *" a "* ]]; then
    phase a "CUDA correctness, limit ${A_S}s"
    timeout "$A_S" $PY -m janus_pretrain.bench cuda $FLAG --json "$OUT/a_cuda.json"
    rc=$?; echo "phase a exit $rc"; [ $rc = 0 ] || failed+=(a)
fi

if [[ " $PHASES " == *" b "* ]]; then
    phase b "speed, limit ${B_S}s"
    timeout "$B_S" $PY -m janus_pretrain.bench gpu $FLAG --json "$OUT/b_speed.json"
    rc=$?; echo "phase b exit $rc"; [ $rc = 0 ] || failed+=(b)
fi
if [[ " $PHASES " == *" c "* ]]; then
    phase c "Multi30k at model=$C_MODEL, each run alone for up to $C_STEPS updates or ${C_TRAIN_S}s"
    WORK=$(mktemp -d)
    evals=()
    FT=($PY -m finetune.cli --data-root "$DATA_ROOT")
    "${FT[@]}" prepare --task multi30k_ende --output "$WORK/data" --vocab-size "$C_VOCAB" \
        --workers "$C_WORKERS" || exit 1
    for run in "${C_RUNS[@]}"; do  # one after the other: each has the GPU to itself
        # the limit's SIGTERM ends the run with a checkpoint (exit 75, timeout's 124)
        timeout "$C_TRAIN_S" "${FT[@]}" train --task multi30k_ende --data "$WORK/data" \
            --config "configs/finetune/$run.yaml" --valid-size "$C_VALID" "model=$C_MODEL" \
            parallel.precision=bf16 "data.max_tokens=$C_TOKENS" "train.steps=$C_STEPS" \
            "train.eval_interval=$C_EVAL" "train.save_interval=$C_EVAL" train.keep_checkpoints=1 \
            train.log_interval=50 "optim.warmup_steps=$C_WARMUP" "train.output_dir=$WORK/$run" \
            > "$WORK/train_$run.log" 2>&1
        echo "phase c train $run exit $?"
        tail -n 5 "$WORK/train_$run.log"
        [ -e "$WORK/$run/checkpoints/best" ] || failed+=("c-train-$run")
        cp "$WORK/$run/metrics.jsonl" "$OUT/c_metrics_$run.jsonl"
    done
    if [ -e "$WORK/janus/checkpoints/best" ]; then  # a decode step at batch 1 is launch-bound
        timeout "$C_EVAL_S" $PY -m janus_pretrain.bench decode \
            --checkpoint "$WORK/janus/checkpoints/best" --sources "$DATA_ROOT/nmt/multi30k/val.en" \
            --sentences "$C_LATENCY" --batch-size 1 --batches 1 || failed+=(c-decode)
    fi
    for run in "${C_RUNS[@]}"; do  # side by side too
        (timeout "$C_EVAL_S" "${FT[@]}" evaluate --task multi30k_ende \
            --checkpoint "$WORK/$run/checkpoints/best" --output "$OUT/c_$run.json" --batch-size 100 \
            --latency-sentences "$C_LATENCY" "${C_LIMIT[@]}"; echo "phase c evaluate $run exit $?") &
        evals+=($!)
    done
    wait "${evals[@]}"
    for run in "${C_RUNS[@]}"; do [ -f "$OUT/c_$run.json" ] || failed+=("c-evaluate-$run"); done
    rm -rf "$WORK"
fi
echo "== done ($(date -u +%T)); failed or cut short: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
