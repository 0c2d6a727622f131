"""Reductions over a vocabulary split across the tensor-parallel group (Megatron keeps its
vocab-parallel cross entropy beside its layers, tensor_parallel/cross_entropy.py).

Logits arrive as `[..., V_local]` shards, rank r holding columns [r * V_local, (r + 1) * V_local)
of the padded table, and are never gathered for the loss. A reduction over the vocabulary is a
local sum followed by an all-reduce whose backward is the identity (`tp_sum`), which is exact
because every rank consumes the result the same way; the log-softmax normaliser, which each rank
applies to its own shard, has a written-out backward. All of it is a no-op at TP = 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from janus_pretrain.parallel import tp

# The logit of a column that pads the vocabulary table (model output_logits). Far enough below any
# real logit that its probability is exactly 0, yet finite in fp16, bf16 and fp32: the loss's
# products p log p are then 0 there (not 0 * -inf), so no pass over the logits has to mask them.
PAD_LOGIT = -30000.0


def real_columns(logits: torch.Tensor) -> torch.Tensor:
    """[..., V_local] -> [V_local] fp32, 1.0 in the columns of real tokens, 0.0 in padding."""
    return (logits.detach()[(0,) * (logits.dim() - 1)] > PAD_LOGIT / 2).float()


def tp_sum(x: torch.Tensor) -> torch.Tensor:
    """All-reduce over the TP group in the forward pass, identity in the backward pass."""
    if tp.world_size() == 1:
        return x
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=tp.group())


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log_softmax over a vocabulary split across the TP group.

    The normaliser is global but each rank uses it on its own shard only, so a plain
    "all-reduce forward, identity backward" would drop the other shards' share of its gradient.
    The backward is therefore written out: grad_x = grad_y - softmax(x) * sum_v(grad_y), with the
    sum all-reduced over the group.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        group = tp.group()
        peak = logits.amax(-1, keepdim=True)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak
        total = shifted.exp().sum(-1, keepdim=True)
        dist.all_reduce(total, group=group)
        out = shifted - total.log()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        total = grad.sum(-1, keepdim=True)
        dist.all_reduce(total, group=tp.group())
        return grad - out.exp() * total


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel log-softmax: [..., V_local] -> fp32 log-probs [..., V_local]."""
    if tp.world_size() == 1:
        # The whole vocabulary is here: torch's fused kernel (forward and backward) does in one
        # pass over the [rows, vocab] logits what the written-out version does in five.
        return torch.log_softmax(logits.float(), dim=-1)
    return _VocabParallelLogSoftmax.apply(logits.float())


def vocab_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the (split) last dimension: [..., V_local] -> [...]."""
    return tp_sum(x.sum(-1))


def shard_start(v_local: int) -> int:
    """First global vocabulary column of this rank's shard of width v_local."""
    return tp.rank() * v_local


def gather_vocab(local: torch.Tensor) -> torch.Tensor:
    """Concatenate the vocabulary shards of the TP group: [..., V_local] -> [..., V] (search runs
    without autograd; this also avoids megatron-core's gather, which allocates its buffer on a
    CUDA device)."""
    size = tp.world_size()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=tp.group())
    return torch.cat(parts, dim=-1)
