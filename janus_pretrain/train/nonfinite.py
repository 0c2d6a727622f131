"""Skip optimizer updates whose loss or gradient is not finite (NaN or inf).

A probe, one device scalar, sums every micro-batch loss and, through tensor hooks, every
gradient the backward pass produces: it stays finite exactly when all of them are, without a
host sync. The loop all-reduces the probe once per optimizer step (with the stop flag), so every
rank takes the same decision. On a bad step the torch optimizer's `step` does nothing and raises
DeepSpeed's `overflow` flag, the protocol DeepSpeed uses for fp16 overflow: `engine.step()` then
counts the step in `engine.skipped_steps` and holds the LR schedule, while the weights and the
optimizer state stay as they were. DeepSpeed's ZeRO and bf16 optimizers already skip a step
whose gradient norm is not finite; the probe extends that to ZeRO-0 in fp32 and to a
non-finite loss whose gradients happen to be finite.
"""
from __future__ import annotations

import torch


class NonFiniteGuard:
    def __init__(self, engine):
        self.skip = False
        params = [p for p in engine.module.parameters() if p.requires_grad]
        self.probe = torch.zeros((), device=params[0].device, dtype=torch.float32)
        for p in params:
            p.register_hook(self._add_grad)
        inner = engine.basic_optimizer
        step = inner.step

        def gated_step(*args, **kwargs):
            # Runs inside DeepSpeed's optimizer step, after it has reset its own flag.
            engine.optimizer.overflow = self.skip
            return None if self.skip else step(*args, **kwargs)

        inner.step = gated_step

    def _add_grad(self, grad: torch.Tensor) -> None:
        self.probe += grad.sum(dtype=torch.float32)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.probe += loss.detach().float()

    def local_flag(self) -> torch.Tensor:
        """1.0 if anything this rank saw since the last `reset` was not finite, else 0.0."""
        return (~torch.isfinite(self.probe)).float()

    def reset(self) -> None:
        self.probe.zero_()
