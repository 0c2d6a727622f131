"""Wrap the model in a DeepSpeed engine: ZeRO stage and communication knobs from the JSON under
configs/deepspeed/, batch sizes, precision and clipping from the run config (one source of truth
each), the optimizer and LR schedule of janus_pretrain/optim.py, and megatron-core's groups through the `mpu` adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.utils import clip_grad_norm_

from janus_pretrain.config import CONFIG_ROOT, RunConfig
from janus_pretrain.errors import JanusError
from janus_pretrain.optim import WarmupDecay, build_optimizer
from janus_pretrain.parallel.state import DeepSpeedMPU, data_parallel_size

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


def deepspeed_config(cfg: RunConfig) -> dict:
    base = read_deepspeed_json(cfg)
    precision = cfg.parallel.precision
    dp = data_parallel_size()
    return {
        **base,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum * dp,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {**base.get("bf16", {}), "enabled": precision == "bf16"},
        "fp16": {**base.get("fp16", {}), "enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig):
    """-> DeepSpeed engine (owns the optimizer and LR scheduler; steps both on engine.step())."""
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(cfg.optim, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), mpu=DeepSpeedMPU())
    _keep_fp32_grad_norm(engine)
    return engine


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed's fp32 path without ZeRO clips but drops the norm it computed, so
    `get_global_grad_norm()` would stay None; keep it (ZeRO and bf16 optimizers report theirs)."""

    def clip_and_keep():
        engine._global_grad_norm = float(clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
            mpu=engine.mpu))

    engine.clip_fp32_gradients = clip_and_keep
