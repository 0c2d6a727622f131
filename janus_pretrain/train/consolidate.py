"""`janus-pretrain checkpoint consolidate`: a training checkpoint of any TP x DP x ZeRO layout ->
one self-contained fp32 file (model weights, run config, tokenizer).

DeepSpeed's zero_to_fp32 rebuilds fp32 weights from ZeRO shards but only for one model-parallel
rank at a time; we hand it each TP rank's files in turn and merge the TP shards ourselves
(parallel/reshard.py). Without ZeRO optimizer shards (ZeRO-0) the weights saved with the model
are used. Any TP size can then load the file (`load_consolidated`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from janus_pretrain.config import from_dict
from janus_pretrain.errors import JanusError
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import reshard, state
from janus_pretrain.tokenizer import PAD, load_tokenizer
from janus_pretrain.train import checkpoint as training_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, a checkpoints/ directory or a run directory -> the newest complete
    step directory."""
    path = Path(path)
    if (path / training_checkpoint.MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = training_checkpoint.complete(root)
        if found:
            return found[0]
    raise JanusError(f"checkpoint: no complete checkpoint at {path}")


def _tp_size(checkpoint: Path) -> int:
    ranks = {int(p.name.split("mp_rank_")[1][:2]) for p in checkpoint.glob("*mp_rank_*_model_states.pt")}
    if not ranks:
        raise JanusError(f"checkpoint: no DeepSpeed model states in {checkpoint}")
    return max(ranks) + 1


def tp_rank_fp32_state(checkpoint: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """The fp32 weights held by one TP rank, gathered over its data-parallel ZeRO shards."""
    files = sorted(checkpoint.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"))
    if not any(f.name.endswith("_optim_states.pt") for f in files):
        saved = torch.load(checkpoint / f"mp_rank_{tp_rank:02d}_model_states.pt",
                           map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in saved["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "tag"
        view.mkdir()
        for f in files:
            os.symlink(f.resolve(), view / f.name)
        with contextlib.redirect_stdout(io.StringIO()):  # it narrates every tensor
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag")


def consolidate(checkpoint: str | Path, output: str | Path) -> Path:
    """Write `output` (one torch file) from a checkpoint (see `resolve_checkpoint`); returns its path."""
    checkpoint = resolve_checkpoint(checkpoint)
    if not (checkpoint / "janus.json").is_file():
        raise JanusError(f"checkpoint: {checkpoint} is not a janus-pretrain step directory "
                         f"(no janus.json)")
    cfg = from_dict(json.loads((checkpoint / "janus.json").read_text())["config"])
    tokenizer = load_tokenizer(checkpoint / "tokenizer.model")
    state.initialize(1)
    skeleton = JanusModel(cfg.model, tokenizer.vocab_size, PAD)
    shards = [tp_rank_fp32_state(checkpoint, r) for r in range(_tp_size(checkpoint))]
    full = reshard.merge(shards, reshard.split_dims(skeleton))
    missing = {name for name, _ in skeleton.named_parameters()} - set(full)
    if missing:
        raise JanusError(f"checkpoint: {checkpoint} lacks weights for {sorted(missing)[0]}")
    # zero_to_fp32 returns parameters only; the rest (megatron's empty `_extra_state`) is stateless.
    full = {**skeleton.state_dict(), **full}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": full, "config": json.loads((checkpoint / "janus.json").read_text())["config"],
                "tokenizer": tokenizer.path.read_bytes(), "source": str(checkpoint)}, output)
    return output


def load_consolidated(path: str | Path) -> dict:
    """A consolidated file -> {"model", "config", "tokenizer", "source"} (weights on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise JanusError(f"checkpoint: consolidated file not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
