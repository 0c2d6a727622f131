"""Whether a checkpoint's weights are finite: checked once, when it is saved, and recorded in its
janus.json, so that a diverged model (NaN or inf weights) is never published as `best` and the
run's final error never names it as the weights to go back to. Loading (weights.load_into) checks
the tensors it reads as well: a consolidated file has no record, and an old checkpoint none.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from janus_pretrain.checkpoint.files import META

RECORD = "weights_finite"  # the janus.json key


def weights_finite(model: torch.nn.Module) -> bool:
    """Collective over the ranks: whether every weight of the model is finite. Under ZeRO-3 a
    parameter is a placeholder and its shard (`ds_tensor`) holds this rank's values."""
    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        bad = torch.maximum(bad, (~torch.isfinite(getattr(p, "ds_tensor", p))).any().float())
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def first_nonfinite(weights: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, t in weights.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def recorded(checkpoint: Path) -> Optional[bool]:
    """What the checkpoint's janus.json records (None: written before the record existed)."""
    try:
        return json.loads((checkpoint / META).read_text()).get(RECORD)
    except (OSError, ValueError, AttributeError):
        return None


def newest(checkpoints: list[Path]) -> Optional[Path]:
    """The first of `checkpoints` (newest first) not recorded as non-finite."""
    return next((p for p in checkpoints if recorded(p) is not False), None)
