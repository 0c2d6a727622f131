"""The DeepSpeed JSON under configs/deepspeed/ that a run config names (parallel.deepspeed_config),
read and checked without importing DeepSpeed: `train --check` (train/preflight.py) runs it on a
Slurm batch node before any rank starts, where DeepSpeed's and megatron-core's imports alone
took seconds per job."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from janus_pretrain.config import CONFIG_ROOT, RunConfig
from janus_pretrain.errors import JanusError

# Keys the run config owns; a DeepSpeed JSON that sets them too would be a second source of truth.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


def resolve_path(path: str) -> Path:
    """A config-relative path: as given if it exists, else under the repository's configs/."""
    p = Path(path)
    if p.exists():
        return p
    candidate = CONFIG_ROOT.parent / path
    return candidate if candidate.exists() else p


ZERO_STAGES = (0, 1, 2, 3)


def read_deepspeed_json(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON named by parallel.deepspeed_config, checked against the run config.

    Needs no process group: the CLI calls it before any is started, so a config that cannot work
    fails in one line instead of after every rank has come up."""
    path = resolve_path(cfg.parallel.deepspeed_config)
    if not path.is_file():
        raise JanusError(f"config: parallel.deepspeed_config: file not found: {path}")
    try:
        base = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JanusError(f"config: parallel.deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(base, dict):
        raise JanusError(f"config: parallel.deepspeed_config: {path} must hold a JSON object")
    for key in OWNED_KEYS:
        if key in base:
            raise JanusError(f"config: parallel.deepspeed_config: {path} sets '{key}', which the run "
                             f"config owns (data.micro_batch_size, train.grad_accum, optim.*)")
    zero = base.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        raise JanusError(f"config: parallel.deepspeed_config: zero_optimization.stage in {path} is "
                         f"{stage!r}, not one of {', '.join(map(str, ZERO_STAGES))}")
    if cfg.parallel.precision == "fp16" and not torch.cuda.is_available():
        raise JanusError("config: parallel.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    return base
