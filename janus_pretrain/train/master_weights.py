"""AdamW on fp32 master weights for bf16 training without ZeRO, in a few multi-tensor kernels.

DeepSpeed's bf16 path without ZeRO wraps the optimizer in its unfused fp16 optimizer, whose
overflow check and gradient norm read one value per parameter on the host: ~200 host syncs and
~4,000 kernels per step for the base model. Here the engine runs as fp32 (DeepSpeed then leaves
the optimizer alone and averages the bf16 gradients in fp32 buckets) and this optimizer does what
mixed precision needs: the bf16 gradients cast into fp32 master gradients (one kernel), clipped by
their global norm (tensor-parallel aware, as Megatron counts it), torch's fused AdamW over the
masters, and the masters cast back into the bf16 weights (one kernel each). No host sync: a
non-finite norm skips the update on the device through the fused kernel's `found_inf`, which
this optimizer ORs into the flag the caller hands it (train/nonfinite.py reads it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import is_model_parallel_parameter


def squared_norm(tensors: list[torch.Tensor], device: torch.device, dtype=None) -> torch.Tensor:
    """The sum of the squared 2-norms of `tensors` (accumulated in `dtype`) as an fp32 scalar on
    `device`: one multi-tensor norm, no kernel per tensor (zero for no tensors)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    return norms.to(dtype or torch.float32).square().sum().float()


def clip_by_global_norm(counted: list[torch.Tensor], scaled: list[torch.Tensor], max_norm: float,
                        mpu) -> torch.Tensor:
    """Scale `scaled` in place so that the global 2-norm of `counted` (the gradients this rank
    counts: TP shards everywhere, replicated ones on TP rank 0, as Megatron counts them) is at
    most `max_norm` (0: no clipping), with no host sync -> the norm before clipping (device)."""
    squares = squared_norm(counted, scaled[0].device)
    if mpu.get_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=mpu.get_model_parallel_group())
    norm = squares.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(scaled, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(scaled[0].dtype))
    return norm


class MasterWeights(torch.optim.Optimizer):
    """Over bf16 parameters (its param_groups, whose `lr` the LR scheduler sets); `inner` is a
    fused AdamW over their fp32 copies. `found_inf`, when set (a device scalar), is raised to 1
    where the gradients are not finite, and the update then skipped."""

    checks_finite = True  # train/nonfinite.py: no need to check the gradients before `step`

    def __init__(self, param_groups: list[dict], inner_factory, lr: float, max_norm: float, mpu):
        super().__init__(param_groups, {"lr": lr})
        self.inner_factory, self.max_norm, self.mpu = inner_factory, max_norm, mpu
        self._masters: Optional[list[list[torch.Tensor]]] = None
        first_tp_rank = mpu.get_model_parallel_rank() == 0
        # replicated over the TP group: counted once in the norm (on TP rank 0)
        self.counted = [first_tp_rank or is_model_parallel_parameter(p)
                        for g in self.param_groups for p in g["params"]]
        self.found_inf: Optional[torch.Tensor] = None
        self._global_grad_norm: Optional[torch.Tensor] = None

    @property
    def masters(self) -> list[list[torch.Tensor]]:
        """The fp32 copies, per group, made on first use: by then the engine has moved the
        weights to their device."""
        if self._masters is None:
            self._masters = [[p.detach().float() for p in g["params"]] for g in self.param_groups]
            self.inner = self.inner_factory([{**{k: v for k, v in g.items() if k != "params"},
                                              "params": m}
                                             for g, m in zip(self.param_groups, self._masters)])
        return self._masters

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        masters = [m for ms in self.masters for m in ms]
        live = [i for i, p in enumerate(params) if p.grad is not None]  # heads a run trains
        for m in masters:
            m.grad = None
        if not live:
            return None
        # Casts through flat buffers: one kernel each way, where a multi-tensor copy across
        # dtypes would fall back to a kernel per tensor.
        flat = torch.cat([params[i].grad.reshape(-1) for i in live]).float()
        grads = [g.view(masters[i].shape) for i, g in
                 zip(live, flat.split([masters[i].numel() for i in live]))]
        for i, g in zip(live, grads):
            masters[i].grad = g
        norm = clip_by_global_norm([g for i, g in zip(live, grads) if self.counted[i]], [flat],
                                   self.max_norm, self.mpu)
        self._global_grad_norm = norm
        bad = (~torch.isfinite(norm)).float()
        if self.found_inf is not None:
            self.found_inf.copy_(torch.maximum(self.found_inf, bad))
            bad = self.found_inf
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner["lr"] = group["lr"]
        self.inner.found_inf = bad
        self.inner.step()
        low = torch.cat([masters[i].reshape(-1) for i in live]).to(params[live[0]].dtype)
        torch._foreach_copy_([params[i] for i in live],
                             [v.view(params[i].shape) for i, v in
                              zip(live, low.split([params[i].numel() for i in live]))])
        return None

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": self.masters,
                "lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.masters, state["masters"]):  # (made first, if need be)
            for m, s in zip(mine, saved):
                m.copy_(s)
        self.inner.load_state_dict(state["inner"])
        for group, lr in zip(self.param_groups, state["lr"]):
            group["lr"] = lr
