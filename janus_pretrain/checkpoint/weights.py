"""Model weights out of checkpoints: resolve a path, read the weights for any TP size, write
model-only checkpoints (averaged, best), and consolidate to one safetensors file
(checkpoint/consolidated.py).

DeepSpeed's zero_to_fp32 rebuilds fp32 weights from ZeRO shards, but for one model-parallel rank
at a time; we hand it each TP rank's files in turn (a symlinked view) and merge or split the TP
shards ourselves (parallel/reshard.py). Without ZeRO optimizer shards (ZeRO-0, model-only
checkpoints) the weights saved with the module are used. So any checkpoint loads at any TP size.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

from janus_pretrain.checkpoint import atomic, consolidated, finite, unpickle
from janus_pretrain.checkpoint.files import (CHECKPOINTS, MARKER, META, STEP, TMP_PREFIX,
                                              has_zero_shards, model_states_file, tp_rank_files,
                                              tp_size)
from janus_pretrain.checkpoint.store import complete, newer_than, read_meta, warn_incomplete
from janus_pretrain.config import from_dict
from janus_pretrain.errors import JanusError
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import reshard, tp
from janus_pretrain.tokenizer import PAD, load_tokenizer

Weights = dict[str, torch.Tensor]


def resolve(path: str | Path) -> Path:
    """A step (or model-only) directory, a checkpoints/ directory or a run directory -> the
    newest complete checkpoint directory; newer step directories without a marker are named in
    a warning."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        found = complete(root)
        if found:
            warn_incomplete(newer_than(root, found[0]))
            return found[0]
    if path.is_dir() and STEP.fullmatch(path.name.removeprefix(TMP_PREFIX)):
        raise JanusError(f"checkpoint: {path} has no {MARKER} marker: its save was interrupted "
                         f"(use an earlier checkpoint)")
    raise JanusError(f"checkpoint: no complete checkpoint at {path}")


def tp_rank_weights(checkpoint: Path, tp_rank: int) -> Weights:
    """The fp32 weights held by one TP rank, gathered over its data-parallel ZeRO shards."""
    files = tp_rank_files(checkpoint, tp_rank)
    if not files:
        raise JanusError(f"checkpoint: no DeepSpeed model states for TP rank {tp_rank} in {checkpoint}")
    atomic.check_files(checkpoint, files)
    if not has_zero_shards(files):
        saved = unpickle.load(checkpoint / model_states_file(tp_rank), "tensors and plain values")
        return {k: v.float() if v.is_floating_point() else v
                for k, v in saved["module"].items() if isinstance(v, torch.Tensor)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "tag"
        view.mkdir()
        for f in files:
            os.symlink(f.resolve(), view / f.name)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it narrates every tensor
                return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag")
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise JanusError(f"checkpoint: the ZeRO files of TP rank {tp_rank} in {checkpoint} "
                             f"cannot be read ({str(e).splitlines()[0][:120]})") from None


def full_weights(checkpoint: Path, model: nn.Module) -> Weights:
    """Every TP rank's weights merged into the TP = 1 state dict of `model`'s shape."""
    shards = [tp_rank_weights(checkpoint, r) for r in range(tp_size(checkpoint))]
    return reshard.merge(shards, reshard.split_dims(model))


def weights_for_this_rank(checkpoint: Path, model: nn.Module) -> Weights:
    """The weights this TP rank's `model` holds, whatever TP size wrote the checkpoint."""
    if tp_size(checkpoint) == tp.world_size():
        return tp_rank_weights(checkpoint, tp.rank())
    return reshard.shard_for_this_rank(full_weights(checkpoint, model), model)


def load_into(model: nn.Module, weights: Weights, origin: Path | str) -> None:
    """Load weights into `model`; every parameter must be there and fit. zero_to_fp32 returns
    parameters only: the rest of the state dict (megatron's empty `_extra_state`) is stateless.
    Weights holding NaN or inf are refused (finite.py)."""
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(weights))
    if missing:
        raise JanusError(f"checkpoint: {origin} lacks weights for {missing[0]}")
    bad = finite.first_nonfinite(weights)
    if bad is not None:  # a diverged run's weights decode to NaN: empty lines or a crash
        raise JanusError(f"checkpoint: {origin} holds non-finite weights (NaN or inf in {bad}): "
                         f"the run that wrote it diverged; use an earlier checkpoint")
    try:
        model.load_state_dict({**model.state_dict(), **weights})
    except RuntimeError as e:
        raise JanusError(f"checkpoint: {origin} does not fit this model "
                         f"({str(e).splitlines()[-1].strip()}); set model= to its shape") from None


def write_model_checkpoint(source: Path, shards: list[Weights], target: Path, **meta) -> Path:
    """A model-only checkpoint at `target`: one weights file per TP rank (`shards`, rank order),
    `source`'s janus.json (with `meta` added, also to the manifest) and tokenizer, published
    atomically."""
    tmp = atomic.staging(target)
    for rank, shard in enumerate(shards):
        torch.save({"module": shard}, tmp / model_states_file(rank))
    healthy = all(finite.first_nonfinite(shard) is None for shard in shards)
    (tmp / META).write_text(json.dumps({**read_meta(source), finite.RECORD: healthy, **meta},
                                       indent=2))
    tokenizer = load_tokenizer(source)
    (tmp / tokenizer.filename).write_bytes(tokenizer.model_bytes())
    return atomic.publish_local(tmp, target, source=str(source), **meta)


def copy_model(source: Path, target: Path, **meta) -> Path:
    """`source`'s weights (no optimizer state) as a model-only checkpoint at `target`; `meta`
    is added to its janus.json."""
    shards = [tp_rank_weights(source, r) for r in range(tp_size(source))]
    return write_model_checkpoint(source, shards, target, **meta)


def average(checkpoints: list[Path], target: Path) -> Path:
    """Element-wise mean of the checkpoints' fp32 weights (per TP rank) -> a model-only
    checkpoint at `target` with the first checkpoint's config and tokenizer."""
    sizes = {tp_size(p) for p in checkpoints}
    if len(sizes) != 1:
        raise JanusError(f"checkpoint: cannot average checkpoints of different TP sizes {sorted(sizes)}")
    shards = []
    for rank in range(sizes.pop()):
        states = [tp_rank_weights(p, rank) for p in checkpoints]
        shards.append({k: sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
                       if v.is_floating_point() else v for k, v in states[0].items()})
    return write_model_checkpoint(checkpoints[0], shards, target)


def model_tensors(model: nn.Module) -> Weights:
    """The tensors of `model`'s state dict (megatron-core adds empty `_extra_state` entries)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def full_model(checkpoint: str | Path) -> consolidated.Consolidated:
    """Any checkpoint (see `resolve`) -> its full (TP = 1) weights, run config and tokenizer."""
    from janus_pretrain.parallel import state

    checkpoint = resolve(checkpoint)
    config = read_meta(checkpoint)["config"]
    tokenizer = load_tokenizer(checkpoint)
    state.initialize(1)
    cfg = from_dict(config)
    skeleton = JanusModel(cfg.model, tokenizer.vocab_size, PAD, mask_vector=cfg.objective.is_bang)
    load_into(skeleton, full_weights(checkpoint, skeleton), checkpoint)
    return consolidated.Consolidated(model_tensors(skeleton), config, tokenizer, str(checkpoint))


def consolidate(checkpoint: str | Path, output: str | Path) -> Path:
    """Write `output` (one safetensors file: weights, run config, tokenizer) from any checkpoint
    (see `resolve`); returns its path."""
    full = full_model(checkpoint)
    return consolidated.write(output, full.weights, full.config, full.tokenizer, full.source)
