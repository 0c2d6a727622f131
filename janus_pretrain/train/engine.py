"""Wrap the model in a DeepSpeed engine: ZeRO stage and communication knobs from the JSON under
configs/deepspeed/, batch sizes, precision and clipping from the run config (one source of truth
each), the optimizer and LR schedule of janus_pretrain/optim.py, and megatron-core's groups through the `mpu` adapter.
"""
from __future__ import annotations

import threading

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.utils import get_norm_dtype

from janus_pretrain.config import RunConfig
from janus_pretrain.optim import WarmupDecay, adamw, build_optimizer, param_groups
from janus_pretrain.parallel.state import DeepSpeedMPU, data_parallel_size
from janus_pretrain.train.deepspeed_json import read_deepspeed_json
from janus_pretrain.train.master_weights import (MasterWeights, clip_by_global_norm,
                                                 squared_norm)


def uses_master_weights(cfg: RunConfig, base: dict) -> bool:
    """bf16 without ZeRO: our MasterWeights optimizer (train/master_weights.py), the engine in
    fp32, instead of DeepSpeed's unfused fp16 optimizer."""
    return cfg.parallel.precision == "bf16" and base.get("zero_optimization", {}).get("stage", 0) == 0


def deepspeed_config(cfg: RunConfig) -> dict:
    base = read_deepspeed_json(cfg)
    precision = "fp32" if uses_master_weights(cfg, base) else cfg.parallel.precision
    dp = data_parallel_size()
    return {
        **base,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum * dp,
        "gradient_clipping": cfg.optim.clip_grad,
        # Non-finite updates are found and skipped on the device (train/nonfinite.py); DeepSpeed's
        # own bf16 check reads a flag on the host every step.
        "bf16": {"check_grad_overflow": False, **base.get("bf16", {}), "enabled": precision == "bf16"},
        "fp16": {**base.get("fp16", {}), "enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        # DeepSpeed's throughput timer synchronizes the device in every forward and step;
        # the loop measures throughput itself (train/metrics.py).
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig):
    """-> DeepSpeed engine (owns the optimizer and LR scheduler; steps both on engine.step())."""
    masters = uses_master_weights(cfg, read_deepspeed_json(cfg))
    if masters:  # what DeepSpeed's bf16 mode would cast: the parameters, not the buffers
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        optimizer = MasterWeights(param_groups(model, cfg), lambda groups: adamw(groups, cfg),
                                  cfg.optim.lr, cfg.optim.clip_grad, DeepSpeedMPU())
    else:
        optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(cfg.optim, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), mpu=DeepSpeedMPU())
    if masters:
        engine.clip_fp32_gradients = lambda: None  # MasterWeights clips the fp32 gradients
    else:
        _keep_fp32_grad_norm(engine)
    if engine.zero_optimization_stage() == 0:
        _copy_back_in_one_kernel(engine)
    if engine.zero_optimization_stage() in (1, 2):
        _clip_without_sync(engine.optimizer)
        _norm_in_one_kernel(engine.optimizer)
        _order_streams_without_sync(engine.optimizer)
    return engine


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed's fp32 path without ZeRO clips through a norm it reads on the host (and then
    drops, so `get_global_grad_norm()` would stay None): clip on the device instead and keep the
    norm, a device tensor (ZeRO and bf16 optimizers report theirs)."""

    def clip_and_keep():
        engine._global_grad_norm = clip_gradients(list(engine.module.parameters()),
                                                  engine.gradient_clipping(), engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep


def _copy_back_in_one_kernel(engine) -> None:
    """ZeRO-0's data-parallel gradient average is DeepSpeed's (its buckets, communication dtype
    and scaling), but the averaged bucket goes back into the gradients in one multi-tensor copy
    instead of one copy kernel per parameter, and not at all on one data-parallel rank."""
    reduce = engine.allreduce_bucket

    def allreduce_and_copy(small_bucket, dp_group, dp_world_size=None):
        if dist.get_world_size(group=dp_group) == 1:
            return
        reduced = reduce(small_bucket, dp_group, dp_world_size)
        torch._foreach_copy_(small_bucket, list(engine.unflatten(reduced, small_bucket)))

    engine.allreduce_and_copy = allreduce_and_copy


def _clip_without_sync(zero_optimizer) -> None:
    """ZeRO-1/2 clip their flat gradient partitions by a scale that DeepSpeed checks on the host
    (`is_invalid_grad_norm`, once per parameter group per step); the same scale as a device
    tensor, a non-finite norm mapped to inf as there (the update is then skipped anyway)."""

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        o = zero_optimizer
        if o.clip_grad == 0.0 and o.loss_scale == 1.0:
            return
        scale = torch.as_tensor(float(o.loss_scale), device=o.device)
        if o.clip_grad > 0.0:
            norm = torch.as_tensor(total_norm, dtype=torch.float, device=o.device)
            norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, float("inf"))
            scale = ((norm / o.loss_scale + 1e-6) / o.clip_grad).clamp(min=1.0) * o.loss_scale
        flat = [g for grad in grad_groups_flat for g in (grad if isinstance(grad, list) else [grad])]
        torch._foreach_mul_(flat, (1.0 / scale).to(flat[0].dtype))

    zero_optimizer.unscale_and_clip_grads = unscale_and_clip_grads


def _norm_in_one_kernel(zero_optimizer) -> None:
    """ZeRO-1/2's gradient norm is DeepSpeed's (the same gradients counted, in fp64, summed over
    the DP and TP groups, a non-finite norm marked as there), but one multi-tensor norm over the
    partition instead of a cast and a norm kernel per parameter (400 kernels a step at `base`)."""
    o = zero_optimizer
    direct = o.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if norm_type != 2:  # a Python number (DeepSpeed passes its default), never a tensor
            return direct(gradients, params, norm_type)
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [g.data for g, p in zip(grads, params)
                   if not getattr(p, "ds_pipe_replicated", False)
                   and (is_model_parallel_parameter(p) or o.model_parallel_rank == 0)]
        total = squared_norm(counted, o.device, get_norm_dtype())
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=o.dp_process_group)
        o._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=o.device)
        return total

    o.get_grad_norm_direct = get_grad_norm_direct


def _order_streams_without_sync(zero_optimizer) -> None:
    """With `overlap_comm` on a GPU, ZeRO-1/2 reduce on a stream of their own and synchronize
    the whole device before freeing gradients that stream has read: at the end of every backward
    (`independent_gradient_partition_epilogue`) and, without contiguous gradients, before each
    bucket. The host then waits for the GPU once a step or more (`bench overhead` counts it).
    Here each such synchronize orders the two streams both ways instead: the reduction after
    the compute queued so far, and everything queued after it (the optimizer step, any reuse of
    the freed memory) after the reduction. That is the ordering the synchronize gave these two
    streams, and the host never waits. DeepSpeed orders each bucket's reduction by the same
    two-way wait (`average_tensor`, deepspeedai/DeepSpeed#5606)."""
    o = zero_optimizer
    acc = get_accelerator()
    if not o.overlap_comm:
        return

    def without_sync(method):
        def run(*args, **kwargs):
            if acc.resolves_data_dependency():  # a CPU: no stream, no synchronize
                return method(*args, **kwargs)
            synchronize, caller = acc.__dict__.get("synchronize"), threading.get_ident()
            real = acc.synchronize

            def order_streams(*a, **k):
                if threading.get_ident() != caller:  # another thread's synchronize stays one
                    return real(*a, **k)
                current = acc.current_stream()
                o.reduction_stream.wait_stream(current)
                current.wait_stream(o.reduction_stream)

            acc.synchronize = order_streams
            try:
                return method(*args, **kwargs)
            finally:
                if synchronize is None:
                    del acc.synchronize
                else:
                    acc.synchronize = synchronize
        return run

    # DeepSpeed 0.19's synchronizing methods; where a version lacks one, that sync stays.
    for name in ("independent_gradient_partition_epilogue", "allreduce_and_copy",
                 "_allreduce_noncontiguous_bucket_preserving_fp32"):
        if hasattr(o, name):
            setattr(o, name, without_sync(getattr(o, name)))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, mpu) -> torch.Tensor:
    """The module's gradients clipped by their global norm on the device -> the norm."""
    first = mpu.get_model_parallel_rank() == 0
    counted = [p.grad for p in params
               if p.grad is not None and (first or is_model_parallel_parameter(p))]
    return clip_by_global_norm(counted, [p.grad for p in params if p.grad is not None],
                               max_norm, mpu)
