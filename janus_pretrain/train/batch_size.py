"""The global batch, fixed by the config; gradient accumulation derived from it per layout.

`train.global_batch` counts sequences, or padded tokens when data.max_tokens is set (each
micro-batch then holds up to data.max_tokens cells); accumulation = global / (micro x DP), as
Megatron's --global-batch-size and torchtitan's global_batch_size // (local_batch_size x dp), so
the LR schedule and the data order of a config do not change with the number of GPUs. A
layout that cannot divide it is refused in one line naming the nearest sizes that can.
`train.grad_accum` alone (global_batch unset) keeps the batch growing with the GPU count; beside
a global batch it must be left at 1 or agree with the derived value (the config a run saves
holds both).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from janus_pretrain.config import RunConfig
from janus_pretrain.errors import JanusError


def micro_size(cfg: RunConfig) -> tuple[int, str]:
    """What one micro-batch holds in the global batch's unit: (size, unit name)."""
    if cfg.data.max_tokens is not None:
        return cfg.data.max_tokens, "tokens (data.max_tokens)"
    return cfg.data.micro_batch_size, "sequences (data.micro_batch_size)"


def _nearest(valid: list[int], here: int) -> list[int]:
    below = [n for n in valid if n < here][-1:]
    above = [n for n in valid if n > here][:1]
    return below + above


def _valid_sizes(per_step: int, tp: int, gpus_per_node: Optional[int], dp: int) -> str:
    """The DP sizes (and node counts, when the ranks per node are known) nearest `dp` that
    divide `per_step` micro-batches."""
    dps = [d for d in range(1, per_step + 1) if per_step % d == 0]
    text = f"data-parallel sizes {' or '.join(map(str, _nearest(dps, dp)))}"
    if gpus_per_node:
        nodes = [n for n in range(1, 2 * dp * tp // gpus_per_node + 2)
                 if n * gpus_per_node % tp == 0 and n * gpus_per_node // tp in dps]
        here = dp * tp / gpus_per_node
        near = [n for n in nodes if n < here][-1:] + [n for n in nodes if n > here][:1]
        if near:
            text += (f" ({' or '.join(map(str, near))} nodes of {gpus_per_node} GPUs at "
                     f"parallel.tensor_parallel={tp})")
    return text


def accumulation(cfg: RunConfig, dp: int, gpus_per_node: Optional[int] = None) -> int:
    """Micro-batches per rank per optimizer step at `dp` data-parallel ranks."""
    if cfg.train.global_batch is None:
        return cfg.train.grad_accum
    size, unit = micro_size(cfg)
    tp = cfg.parallel.tensor_parallel
    if cfg.train.global_batch % size:
        raise JanusError(f"config: train.global_batch: {cfg.train.global_batch} is not a multiple "
                         f"of one micro-batch of {size} {unit}")
    per_step = cfg.train.global_batch // size
    if per_step % dp:
        raise JanusError(f"config: train.global_batch: {cfg.train.global_batch} {unit.split()[0]} "
                         f"= {per_step} micro-batches of {size}, which {dp} data-parallel ranks "
                         f"cannot share; use {_valid_sizes(per_step, tp, gpus_per_node, dp)}")
    accum = per_step // dp
    if cfg.train.grad_accum not in (1, accum):
        raise JanusError(f"config: train.grad_accum: {cfg.train.grad_accum} disagrees with "
                         f"train.global_batch={cfg.train.global_batch} at {dp} data-parallel ranks "
                         f"(accumulation {accum}); leave it at 1 or unset train.global_batch")
    return accum


def resolved(cfg: RunConfig, dp: int) -> RunConfig:
    """`cfg` with train.grad_accum set to this layout's accumulation (what the loop, DeepSpeed
    and the saved config read)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    accum = accumulation(cfg, dp, int(local) if local else None)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
