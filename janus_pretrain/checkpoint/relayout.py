"""Resume a training checkpoint at another (TP, DP, ZeRO stage) layout.

DeepSpeed resumes its checkpoints at the layout that wrote them: ZeRO shards are slices of flat
per-rank buffers. Its universal checkpoints (ds_to_universal, an on-disk conversion loaded by an
engine started with `checkpoint.load_universal`) re-partition ZeRO 1-3 state, and re-split TP
only for models that describe their splits in Megatron-DeepSpeed's `universal_checkpoint_info`;
ZeRO-0 (plain torch optimizer state) is outside them. Here every rank
instead rebuilds, per parameter, the full (unsplit, unpartitioned) fp32 master weight and AdamW
moments from the old files (the same slicing ds_to_universal reads: `param_slice_mappings` for
ZeRO 1/2, equal per-parameter partitions for ZeRO 3, the torch state without ZeRO), merges and
re-splits the TP shards (parallel/reshard.py), and writes its share into the new engine through
DeepSpeed's tensor-fragment API, which knows the new ZeRO partitioning. The Adam step count, the
LR schedule and DeepSpeed's step counters are copied; the loader converts the data position
(data/loader.py). Only copies, no arithmetic: the continued run equals the one at the old layout
up to the reduction order of the new layout.

While loading, each rank holds three fp32 copies of the full model (weights and both moments).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import (safe_get_local_fp32_param, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from janus_pretrain.checkpoint import unpickle
from janus_pretrain.checkpoint.files import model_states_file, tp_size
from janus_pretrain.errors import JanusError
from janus_pretrain.optim import decay_groups
from janus_pretrain.parallel import reshard, state

MOMENTS = ("exp_avg", "exp_avg_sq")
_ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d{2})_(optim|model)_states\.pt")


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


# What DeepSpeed's training-state files hold besides tensors and plain values: its loss scalers,
# ZeRO stage enum and parameter-fragment records. Nothing else is unpickled.
_DEEPSPEED_STATE = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path) -> dict:
    return unpickle.load(path, "DeepSpeed training state", _DEEPSPEED_STATE)


def _zero_files(checkpoint: Path, tp_rank: int, kind: str) -> list[Path]:
    """ZeRO files of one TP rank in data-parallel rank order."""
    found = {}
    for p in checkpoint.iterdir():
        m = _ZERO_FILE.fullmatch(p.name)
        if m and int(m.group(2)) == tp_rank and m.group(3) == kind:
            found[int(m.group(1))] = p
    return [found[d] for d in sorted(found)]


def _one_step(steps: set, checkpoint: Path) -> float:
    if len(steps) != 1:
        raise JanusError(f"checkpoint: {checkpoint} holds different Adam step counts {sorted(steps)}")
    return steps.pop()


def _without_zero(checkpoint: Path, tp_rank: int, order: list[str]) -> tuple[dict, float]:
    """ZeRO-0: the module's weights and torch's AdamW state, indexed in group order."""
    saved = _load(checkpoint / model_states_file(tp_rank))
    optim = saved["optimizer"]
    if not isinstance(optim, dict) or "state" not in optim:  # bf16/fp16 wrap the torch state
        raise JanusError(f"checkpoint: {checkpoint} (ZeRO-0, {_precision(saved)}) resumes at its own "
                         f"layout only; ZeRO-0 checkpoints change layout in fp32")
    ids = [i for group in optim["param_groups"] for i in group["params"]]
    name = dict(zip(ids, order))
    full = {"fp32": {n: saved["module"][n].float() for n in order}}
    for key in MOMENTS:
        full[key] = {name[i]: optim["state"][i][key] for i in ids}
    return full, _one_step({float(optim["state"][i]["step"]) for i in ids}, checkpoint)


def _precision(saved: dict) -> str:
    config = saved.get("ds_config", {})
    return next((p for p in ("bf16", "fp16") if config.get(p, {}).get("enabled")), "fp32")


def _flat_states(shards: list[dict], g: int, fp32: str, optim: str, steps: set) -> list[dict]:
    """Group `g`'s flat fp32 master and moments on each DP rank (ZeRO names them per stage);
    adds their Adam step counts to `steps`."""
    flats = []
    for sd in shards:
        opt = sd[optim]["state"][g]
        flats.append({"fp32": sd[fp32][g], **{key: opt[key] for key in MOMENTS}})
        steps.add(float(opt["step"]))
    return flats


def _zero12(checkpoint: Path, tp_rank: int) -> tuple[dict, float]:
    """ZeRO 1/2: each DP rank holds a contiguous slice of every group's flat buffer; a parameter's
    fragments, in DP rank order, make the parameter (DeepSpeed's `param_slice_mappings`)."""
    shapes = _load(checkpoint / model_states_file(tp_rank))["param_shapes"]
    shards = [_load(f)["optimizer_state_dict"] for f in _zero_files(checkpoint, tp_rank, "optim")]
    full = {key: {} for key in ("fp32", *MOMENTS)}
    steps = set()
    for g, group in enumerate(shapes):
        flats = _flat_states(shards, g, "single_partition_of_fp32_groups", "base_optimizer_state",
                             steps)
        for name, shape in group.items():
            where = [(flat, sd["param_slice_mappings"][g][name])
                     for flat, sd in zip(flats, shards) if name in sd["param_slice_mappings"][g]]
            for key in full:
                full[key][name] = torch.cat([flat[key].narrow(0, m.start, m.numel)
                                             for flat, m in where]).view(shape)
    return full, _one_step(steps, checkpoint)


def _zero3(checkpoint: Path, tp_rank: int) -> tuple[dict, float]:
    """ZeRO-3: every parameter is padded to a multiple of the DP size and split in equal parts;
    a rank's flat buffer is its parts of the group's parameters, one after the other."""
    shapes = _load(_zero_files(checkpoint, tp_rank, "model")[0])["param_shapes"]
    shards = [_load(f)["optimizer_state_dict"] for f in _zero_files(checkpoint, tp_rank, "optim")]
    dp = len(shards)
    full = {key: {} for key in ("fp32", *MOMENTS)}
    steps = set()
    for g, group in enumerate(shapes):
        flats = _flat_states(shards, g, "fp32_flat_groups", "optimizer_state_dict", steps)
        offset = 0
        for name, shape in group.items():
            numel = shape.numel()
            part = -(-numel // dp)
            for key in full:
                parts = [flat[key].narrow(0, offset, part) for flat in flats]
                full[key][name] = torch.cat(parts)[:numel].view(shape)
            offset += part
    return full, _one_step(steps, checkpoint)


def read(checkpoint: Path, written: Layout, model: nn.Module) -> FullState:
    """Every TP rank's state of `checkpoint`, gathered over its DP ranks and merged over TP."""
    decay, no_decay = decay_groups(model)
    per_rank, steps = [], set()
    for tp_rank in range(tp_size(checkpoint)):
        if written.zero_stage == 0:
            full, step = _without_zero(checkpoint, tp_rank, decay + no_decay)
        elif written.zero_stage <= 2:
            full, step = _zero12(checkpoint, tp_rank)
        else:
            full, step = _zero3(checkpoint, tp_rank)
        per_rank.append(full)
        steps.add(step)
    dims = reshard.split_dims(model)
    names = {name for name, _ in model.named_parameters()}
    if set(per_rank[0]["fp32"]) != names:
        missing = sorted(names ^ set(per_rank[0]["fp32"]))[0]
        raise JanusError(f"checkpoint: {checkpoint} does not fit this model (parameter {missing}); "
                         f"set model= to its shape")
    merged = {key: reshard.merge([r[key] for r in per_rank], dims) for key in per_rank[0]}
    engine = _load(checkpoint / model_states_file(0)) if written.zero_stage < 3 else \
        _load(_zero_files(checkpoint, 0, "model")[0])
    return FullState(**merged, step=_one_step(steps, checkpoint), engine=engine)


def _init_moments(engine, step: float) -> None:
    """Zero moments and the step count for every tensor the base optimizer updates: the
    parameters without ZeRO, the flat partitions with it (ZeRO-3 keeps them out of the param
    groups between steps, as its own universal loader knows). The step is a tensor as torch's
    AdamW makes it: fp32, on the parameter's device when fused or capturable."""
    base = engine.basic_optimizer
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flats if flats is not None else [p for g in base.param_groups for p in g["params"]]
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for t in tensors:
        base.state[t] = {"step": torch.tensor(step, dtype=torch.float32,
                                              device=t.device if on_device else "cpu"),
                         **{key: torch.zeros_like(t) for key in MOMENTS}}


def _write(engine, full: FullState) -> None:
    """This rank's share of `full` into the engine's module, fp32 master weights and moments."""
    module = engine.module
    mine = {key: reshard.shard_for_this_rank(getattr(full, key), module)
            for key in ("fp32", *MOMENTS)}
    base = engine.basic_optimizer
    _init_moments(engine, full.step)
    for name, p in module.named_parameters():
        weight = mine["fp32"][name]
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        if weight.shape != shape:
            raise JanusError(f"checkpoint: {name} is {tuple(weight.shape)} in the checkpoint, "
                             f"{tuple(shape)} here; set model= to the checkpoint's shape")
        if hasattr(p, "ds_id"):  # ZeRO-3: the module holds this rank's partition only
            safe_set_full_fp32_param(p, weight)
            local = safe_get_local_fp32_param(p)
            p.ds_tensor.data.view(-1)[:local.numel()].copy_(local)
        else:
            p.data.copy_(weight)
            safe_set_full_fp32_param(p, weight)  # ZeRO 1/2 and bf16; nothing at ZeRO-0 fp32
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:  # ZeRO 1/2 and bf16 link moments lazily: link them now
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])
        for key in MOMENTS:
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, mine[key][name], key)
            else:
                base.state[p][key].copy_(mine[key][name])


def load(engine, checkpoint: Path, written: Layout) -> None:
    """Collective: restore `checkpoint`, written at layout `written`, into `engine` (another
    layout). RNG states are not restored: they belong to ranks that no longer exist."""
    full = read(checkpoint, written, engine.module)
    _write(engine, full)
    saved = full.engine
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for group, lr in zip(engine.basic_optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]
