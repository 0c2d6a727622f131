"""Move model weights between tensor-parallel layouts.

megatron-core marks every split parameter with `tensor_model_parallel` and the dimension it is
split along (`partition_dim`); everything else is replicated. A full (TP = 1) state dict is the
concatenation of the shards along that dimension, and the shard of TP rank r of M is the r-th of
M equal chunks. Vocabulary padding does not depend on the TP size (model/transformer.py), so no
other reshaping is needed.
"""
from __future__ import annotations

import torch
from torch import nn

from janus_pretrain.errors import JanusError
from janus_pretrain.parallel import tp


def split_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension it is split along, for the split parameters only."""
    return {name: p.partition_dim for name, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}


def merge(shards: list[dict[str, torch.Tensor]], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per-TP-rank state dicts (rank order) -> the full state dict. Replicated entries must agree
    across ranks: a difference means the ranks drifted apart during training."""
    full = {}
    for name, first in shards[0].items():
        if name in dims:
            full[name] = torch.cat([s[name] for s in shards], dim=dims[name])
            continue
        for rank, s in enumerate(shards[1:], start=1):
            if not torch.equal(s[name], first):
                raise JanusError(f"checkpoint: replicated parameter {name} differs between TP "
                                 f"rank 0 and TP rank {rank}")
        full[name] = first
    return full


def shard_for_this_rank(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict -> this TP rank's part of it, ready for `model.load_state_dict`."""
    size, rank = tp.world_size(), tp.rank()
    dims = split_dims(model)
    return {name: value.chunk(size, dim=dims[name])[rank].clone() if name in dims else value
            for name, value in full.items()}
