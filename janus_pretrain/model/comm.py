"""Communication of one training step per rank: what DeepSpeed's ZeRO stages and megatron-core's
tensor parallelism move, as payload bytes per collective kind and group.

The planner (janus_pretrain/plan.py) turns these into time; `bench accounting` counts the bytes
the real step's collectives move and checks them against this module. A payload is the tensor a
collective is called on (an all-reduce's tensor, a reduce-scatter's input, an all-gather's
output); on a ring, a rank sends and receives 2 (n - 1) / n of an all-reduce's payload and
(n - 1) / n of the others' (`wire_factor`).

ZeRO (DeepSpeed 0.19, deepspeed/runtime/zero/stage_1_and_2.py, stage3.py), gradients of the
rank's `numel` parameters in the model's precision, once per optimizer step:
    stage 0    all-reduce of every gradient (in fp32 in a bf16 run: train/master_weights.py)
    stage 1/2  all-reduce of every trained gradient bucket (DeepSpeed's
               `use_multi_rank_bucket_allreduce`, its default, reduces a bucket with one
               all-reduce and keeps this rank's partition; ZeRO-2 every micro-batch, ZeRO-1 at
               the step), then an all-gather of the updated parameters
    stage 3    every micro-batch an all-gather of the partitioned parameters before forward
               (kept for backward: zero3.json leaves `stage3_max_reuse_distance` at 1e9) and a
               reduce-scatter of every trained gradient; tensors under
               `stage3_param_persistence_threshold` stay whole, their updated partitions
               all-gathered once after the step
Tensor parallelism (megatron-core without sequence parallelism), per micro-batch, all-reduces of
[rows, h] activations in the model's precision over the TP group: forward, every row-parallel
layer's output (attention out and FFN down in each layer, cross-attention out in decoder
layers) and the vocab-parallel embedding of every encoder and decoder pass; backward, every
column-parallel layer's input gradient (qkv and FFN up; decoder cross-attention q on the target
rows and keys/values on the source rows) and the projected rows' input to the vocabulary. With
activation checkpointing the forward's all-reduces run again in backward.
"""
from __future__ import annotations

from dataclasses import dataclass

from janus_pretrain.config import ModelConfig
from janus_pretrain.model.memory import WIDTH, MicroBatch

WIRE = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}


def wire_factor(kind: str, n: int) -> float:
    """Bytes a rank sends (and receives) per payload byte of a ring collective over n ranks."""
    return WIRE[kind] * (n - 1) / n if n > 1 else 0.0


@dataclass(frozen=True)
class ZeroComm:
    """The DeepSpeed JSON's settings that decide what ZeRO communicates and whether it overlaps."""

    stage: int = 0
    overlap_comm: bool = False
    persistence_threshold: int = 100_000

    @classmethod
    def from_json(cls, ds: dict) -> "ZeroComm":
        z = ds.get("zero_optimization", {})
        stage = int(z.get("stage", 0))
        return cls(stage, bool(z.get("overlap_comm", stage == 3)),
                   int(z.get("stage3_param_persistence_threshold", 100_000)))


def zero_bytes(sizes: list[int], trained: int, zero: ZeroComm, dp: int, precision: str,
               micro_batches: int = 1) -> dict[str, float]:
    """Payload bytes per optimizer step over the DP group: {"kind/dp": bytes}. `trained` is the
    numel of the parameters the objective gives gradients (ZeRO 1-3 reduce only those; ZeRO-0
    reduces every gradient buffer). A DP group of one still calls ZeRO 1-3's all-reduces (no
    traffic), not ZeRO-0's."""
    w = WIDTH[precision]
    numel = sum(sizes)
    if zero.stage == 0:
        # bf16 runs its engine in fp32 (train/master_weights.py): gradients reduce in fp32; a
        # DP group of one reduces nothing
        return {"all_reduce/dp": (4 if precision == "bf16" else w) * numel} if dp > 1 else {}
    if zero.stage in (1, 2):
        # ZeRO-2 reduces every micro-batch's gradients in backward, ZeRO-1 once per step
        out = {"all_reduce/dp": w * trained * (micro_batches if zero.stage == 2 else 1)}
        if dp > 1:
            out["all_gather/dp"] = w * numel
        return out
    partitioned = sum(n for n in sizes if n >= zero.persistence_threshold)
    # gathered once per micro-batch (kept for backward below stage3_max_reuse_distance); the
    # persistent tensors' updated partitions gathered once after the step
    return {"all_gather/dp": w * (partitioned * micro_batches + numel - partitioned),
            "reduce_scatter/dp": w * trained * micro_batches}


def tp_bytes(cfg: ModelConfig, mb: MicroBatch, tp: int, precision: str,
             checkpointing: bool) -> float:
    """All-reduce payload bytes of one micro-batch over the TP group."""
    if tp == 1:
        return 0.0
    w, h, b = WIDTH[precision], cfg.hidden_size, mb.batch
    enc = mb.encoder_passes * b * mb.src_len
    dec = sum(b * t for t, _ in mb.passes)
    projected = sum(b * r for _, r in mb.passes)
    layers = 2 * enc * cfg.encoder_layers + 3 * dec * cfg.decoder_layers
    embeddings = enc + dec
    backward = layers + len(mb.passes) * b * mb.src_len * cfg.decoder_layers + projected
    return w * h * (layers * (2 if checkpointing else 1) + embeddings + backward)


def step_bytes(cfg: ModelConfig, mb: MicroBatch, sizes: list[int], trained: int, zero: ZeroComm,
               dp: int, tp: int, precision: str, checkpointing: bool, micro_batches: int = 1
               ) -> dict[str, float]:
    """Payload bytes of one optimizer step of `micro_batches` micro-batches of shape `mb`:
    {"all_reduce/dp": .., "all_gather/dp": .., "reduce_scatter/dp": .., "all_reduce/tp": ..}."""
    out = zero_bytes(sizes, trained, zero, dp, precision, micro_batches)
    if tp > 1:
        out["all_reduce/tp"] = micro_batches * tp_bytes(cfg, mb, tp, precision, checkpointing)
    return out
