"""Resume a training checkpoint at another (TP, DP, ZeRO stage) layout.

DeepSpeed resumes its checkpoints at the layout that wrote them: ZeRO shards are slices of flat
per-rank buffers. Its universal checkpoints (ds_to_universal, an on-disk conversion loaded by an
engine started with `checkpoint.load_universal`) re-partition ZeRO 1-3 state, and re-split TP
only for models that describe their splits in Megatron-DeepSpeed's `universal_checkpoint_info`;
ZeRO-0 (plain torch optimizer state) is outside them. Here every rank instead reads, of each
parameter, the slice its new TP shard and ZeRO partition hold, straight from the old files
(slices.py: mapped, so only those pages are read), and writes it into the new engine through
DeepSpeed's tensor-fragment API, which knows the new ZeRO partitioning; at ZeRO 1/2 the module's
weights are then gathered from the fp32 partitions, as after an optimizer step. The Adam step
count, the LR schedule and DeepSpeed's step counters are copied; the loader converts the data
position (data/loader.py). Only copies, no arithmetic: the continued run equals the one at the
old layout up to the reduction order of the new layout.

A rank's host memory grows by what it reads of one of the three tensors (weights, two moments)
at a time: its own share of them (`python -m janus_pretrain.bench memory --relayout`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
from torch import nn

from janus_pretrain.checkpoint.slices import KEYS, SavedState, full_shape
from janus_pretrain.errors import JanusError
from janus_pretrain.parallel import state, tp

MOMENTS = KEYS[1:]


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    data_parallel: int
    zero_stage: int

    def __str__(self) -> str:
        return f"TP={self.tensor_parallel} x DP={self.data_parallel}, ZeRO-{self.zero_stage}"

    def as_dict(self) -> dict:
        return asdict(self)


def of_engine(engine) -> Layout:
    return Layout(state.tensor_parallel_size(), state.data_parallel_size(),
                  int(engine.zero_optimization_stage()))


def recorded(meta: dict) -> Optional[Layout]:
    """The layout janus.json records (None for checkpoints written before it was recorded)."""
    return Layout(**meta["layout"]) if "layout" in meta else None


@dataclass
class FullState:
    """Full (TP = 1, unpartitioned) fp32 weights and AdamW moments, by parameter name."""

    fp32: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: float        # Adam's step count (updates applied; skipped steps excluded)
    engine: dict       # DeepSpeed's model states of TP rank 0: LR schedule, step counters


def read(checkpoint: Path, written: Layout, model: nn.Module) -> FullState:
    """The whole state of `checkpoint` at TP = 1 (every saved TP rank's, merged): for tools and
    tests; a resume reads slices (`load`)."""
    saved = SavedState(checkpoint, written.zero_stage, model)
    full = {key: {name: saved.region(name, key, 0, 1, 0, shape.numel()).view(shape)
                  for name, shape in saved.shapes.items()} for key in KEYS}
    saved.release()
    return FullState(**full, step=saved.step, engine=saved.engine)


def init_moments(engine, step: float) -> None:
    """Zero moments and the step count for every tensor the base optimizer updates: the
    parameters without ZeRO, the flat partitions with it (ZeRO-3 keeps them out of the param
    groups between steps, as its own universal loader knows). Moments the optimizer already
    holds are zeroed in place (a second set would be a transient copy of the rank's state). The
    step is a tensor as torch's AdamW makes it: fp32, on the parameter's device when fused or
    capturable."""
    base = engine.basic_optimizer
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flats if flats is not None else [p for g in base.param_groups for p in g["params"]]
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for t in tensors:
        held = base.state.get(t, {})
        base.state[t] = {"step": torch.tensor(step, dtype=torch.float32,
                                              device=t.device if on_device else "cpu"),
                         **{key: held[key].zero_() if key in held else torch.zeros_like(t)
                            for key in MOMENTS}}


@torch.no_grad()
def _write(engine, saved: SavedState) -> None:
    """This rank's share of `saved` into the engine: fp32 master weights and moments, one of the
    three over all parameters at a time (the pages read are dropped in between)."""
    params = list(engine.module.named_parameters())
    init_moments(engine, saved.step)
    base = engine.basic_optimizer
    for name, p in params:
        dim = saved.dims.get(name)
        here = full_shape(p.ds_shape if hasattr(p, "ds_id") else p.shape, dim, tp.world_size())
        if here != saved.shapes[name]:
            raise JanusError(f"checkpoint: {name} is {tuple(saved.shapes[name])} in the checkpoint, "
                             f"{tuple(here)} here (at TP = 1); set model= to the checkpoint's shape")
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:  # ZeRO 1/2 and bf16 link moments lazily: link them now
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])
    for key in KEYS:
        for name, p in params:
            _write_slice(engine, saved, name, p, key)
        saved.release()
    if engine.zero_optimization_stage() in (1, 2):  # the module from the fp32 partitions
        engine.optimizer.update_lp_params()


def _write_slice(engine, saved: SavedState, name: str, p: nn.Parameter, key: str) -> None:
    """What this rank holds of `key` (fp32 weight or a moment) of parameter `p`, copied from
    the mapped files into the engine's own tensor."""
    def read_into(out: torch.Tensor, lo: int) -> None:
        saved.read_into(out, name, key, tp.rank(), tp.world_size(), lo)

    if hasattr(p, "ds_id"):  # ZeRO-3: an equal part of the flat TP-local tensor, zero-padded
        part = p.ds_tensor.ds_numel
        lo = part * engine.optimizer._get_param_partition_rank(p)
        local = torch.zeros(part)
        read_into(local[:max(min(part, p.ds_numel - lo), 0)], lo)
        if key == "fp32":
            safe_set_local_fp32_param(p, local)
            p.ds_tensor.data.view(-1)[:part].copy_(local)
        else:
            safe_set_local_optimizer_state(p, local, key)
    elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2: the fragment in this rank's partition, if any
        if p._hp_mapping is not None:
            read_into(p._hp_mapping.get_hp_fragment(None if key == "fp32" else key),
                      p._hp_mapping.lp_fragment_address.start)
    else:  # without ZeRO: the whole TP-local tensor
        read_into((p.data if key == "fp32" else engine.basic_optimizer.state[p][key]).view(-1), 0)


def load(engine, checkpoint: Path, written: Layout) -> None:
    """Collective: restore `checkpoint`, written at layout `written`, into `engine` (another
    layout). RNG states are not restored: they belong to ranks that no longer exist."""
    saved = SavedState(checkpoint, written.zero_stage, engine.module)
    _write(engine, saved)
    states = saved.engine
    engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    for group, lr in zip(engine.basic_optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = states["global_steps"]
    engine.global_samples = states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]
