"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr (or constant)."""
from __future__ import annotations

import math

from janus_pretrain.config import OptimConfig


class WarmupDecay:
    """LR multiplier for torch's LambdaLR; a class (not a closure) so it pickles with the state."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.warmup = cfg.warmup_steps
        self.total = total_steps
        self.decay = cfg.decay
        self.floor = cfg.min_lr / cfg.lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * shape
