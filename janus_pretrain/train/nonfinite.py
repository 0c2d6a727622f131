"""Skip optimizer updates whose loss or gradient is not finite (NaN or inf), decided on the
device, so that no training step waits for the host.

At the step's last micro-batch, before `engine.step()`, one all-reduce (MAX, all ranks) of two
device flags is started: whether this rank's summed micro-batch losses are non-finite, and
whether this rank was asked to stop (signals.py). When DeepSpeed then calls the torch optimizer's
`step` (its gradients reduced, partitioned and clipped by then), the gate adds whether those
gradients are finite (one multi-tensor norm, max-reduced over all ranks) and hands the flag to
fused AdamW as `found_inf`: on a bad step the kernel leaves weights, moments and step counts as
they were. No Python branch depends on the flag.

The host reads the flags one step late, from a non-blocking copy long finished by then
(`previous`), or at once where it has to wait anyway (a log, a save, the end: `settle`). Holding
the LR schedule on a skipped update is then done late but exactly: the next update's learning
rate is set back to the one the skipped update would have used, before that update runs. A
skipped update counts in `engine.skipped_steps`, DeepSpeed's own counter (which also counts the
fp16 loss-scale skips DeepSpeed decides itself).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, engine):
        self.engine = engine
        params = [p for p in engine.module.parameters() if p.requires_grad]
        device = params[0].device
        self.probe = torch.zeros((), device=device, dtype=torch.float32)
        self.flags = torch.zeros(2, device=device)  # [skip this update, stop after it]
        self._pinned = device.type == "cuda"
        self._host = torch.zeros(2, pin_memory=self._pinned)
        self._copied: Optional[torch.cuda.Event] = None
        self._pending = False  # a step's flags copied but not yet read
        self._gated = False
        self._skipped_by_deepspeed = False
        self.bad_in_a_row = 0
        self.stop = False
        inner = engine.basic_optimizer
        step = inner.step

        def gated_step(*args, **kwargs):
            # Inside DeepSpeed's optimizer step, once per update (ZeRO steps each parameter
            # group in turn): the gradients the update will apply are final.
            if not self._gated and not getattr(inner, "checks_finite", False):
                self.flags[0] = torch.maximum(self.flags[0], self._gradient_bad(inner))
            self._gated = True
            inner.found_inf = self.flags[0]
            return step(*args, **kwargs)

        inner.step = gated_step

    @property
    def host_flags(self) -> torch.Tensor:
        """The host buffer the flags are copied to (bench/overhead.py marks it as host memory)."""
        return self._host

    def _gradient_bad(self, inner) -> torch.Tensor:
        """1.0 if the update's gradients are not finite (on every rank alike), else 0.0: from the
        global norm DeepSpeed or our clip computed (already reduced over all ranks), else from
        the optimizer's own gradients, max-reduced."""
        optimizer = self.engine.optimizer
        norm = getattr(optimizer if optimizer is not inner else self.engine, "_global_grad_norm",
                       None)
        if norm is not None:
            norm = torch.as_tensor(norm, device=self.flags.device, dtype=torch.float32)
            return (~torch.isfinite(norm)).float()
        grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float() \
            if grads else torch.zeros((), device=self.flags.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad

    def add_loss(self, loss: torch.Tensor) -> None:
        self.probe += loss.detach().float()

    def before_update(self, stop_requested: bool) -> None:
        """At the last micro-batch, before `engine.step()`: read the previous update's flags
        (`previous`), then start agreeing on this one's (non-finite loss, stop)."""
        self.previous()
        self.flags[0] = (~torch.isfinite(self.probe)).float()
        self.flags[1] = float(stop_requested)
        dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        self._gated = False

    def after_update(self) -> None:
        """After `engine.step()`: start copying the step's flags to the host; reset the probe.
        Where DeepSpeed skipped the update itself (fp16 overflow, or its own non-finite norm
        check in fp32: decided on the host, so known here), it has held the schedule and
        counted the skip already."""
        self._skipped_by_deepspeed = not self.engine.was_step_applied()
        if self._skipped_by_deepspeed:
            self.flags[0] = 1.0
        self._host.copy_(self.flags, non_blocking=self._pinned)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._pending = True
        self.probe.zero_()

    def settle(self) -> None:
        """Read the last update's flags now (waits for the device where they are not copied
        yet) into `bad_in_a_row` and `stop`; a skipped update holds the LR schedule and counts
        in `engine.skipped_steps`. Nothing to do when they were read already."""
        if not self._pending:
            return
        if self._copied is not None:
            self._copied.synchronize()
        self._pending = False
        skipped, stop = (v > 0 for v in self._host.tolist())
        self.stop = self.stop or stop
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0
        if skipped and not self._skipped_by_deepspeed:
            self.engine.skipped_steps += 1
            hold_schedule(self.engine.lr_scheduler)

    # Called at the next update's last micro-batch, the copy is long done: reading does not wait.
    previous = settle


def hold_schedule(scheduler) -> None:
    """Take back the LR scheduler's last step (an update that was skipped): the next update runs
    at the learning rate the skipped one had."""
    if scheduler is None:
        return
    scheduler.last_epoch -= 1
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs,
                                                               scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
