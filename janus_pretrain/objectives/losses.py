"""The JANUS loss terms on vocab-parallel logits (docs/method.md, section 4).

Logits arrive split over the tensor-parallel group along the vocabulary and are never gathered.
A reduction over the vocabulary is a local sum followed by an all-reduce whose backward is the
identity (`_tp_sum`), which is exact because every rank consumes the result the same way; the
log-softmax normaliser, which each rank applies to its own shard, has a written-out backward.
All of it is a no-op at TP = 1. Terms are means over the valid token rows of the micro-batch,
in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    """All-reduce over the TP group in the forward pass, identity in the backward pass."""
    return reduce_from_tensor_model_parallel_region(x, group=ps.get_tensor_model_parallel_group())


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log_softmax over a vocabulary split across the TP group.

    The normaliser is global but each rank uses it on its own shard only, so a plain
    "all-reduce forward, identity backward" would drop the other shards' share of its gradient.
    The backward is therefore written out: grad_x = grad_y - softmax(x) * sum_v(grad_y), with the
    sum all-reduced over the group.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        group = ps.get_tensor_model_parallel_group()
        tp = ps.get_tensor_model_parallel_world_size()
        peak = logits.amax(-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak
        total = shifted.exp().sum(-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(total, group=group)
        out = shifted - total.log()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        total = grad.sum(-1, keepdim=True)
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
        return grad - out.exp() * total


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel log-softmax: [..., V_local] -> fp32 log-probs [..., V_local]."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        # The whole vocabulary is here: torch's fused kernel (forward and backward) does in one
        # pass over the [rows, vocab] logits what the written-out version does in five.
        return torch.log_softmax(logits.float(), dim=-1)
    return _VocabParallelLogSoftmax.apply(logits.float())


def _vocab_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the (split) last dimension: [..., V_local] -> [...]."""
    return _tp_sum(x.sum(-1))


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def label_log_prob(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) from vocab-parallel log-probs: [..., V_local], [...] -> [...]."""
    v_local = logp.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    local = labels - start
    here = (local >= 0) & (local < v_local)
    picked = logp.gather(-1, local.clamp(0, v_local - 1)[..., None])[..., 0]
    return _tp_sum(picked * here)


def cross_entropy(logp: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                  smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross entropy with fairseq-style label smoothing over the full vocabulary.

    logp [..., V_local] (from `log_softmax`), labels / valid [...] -> scalar.
    """
    nll = -label_log_prob(logp, labels)
    if smoothing > 0:
        vocab = logp.shape[-1] * ps.get_tensor_model_parallel_world_size()
        uniform = -_vocab_sum(logp) / vocab
        nll = (1.0 - smoothing) * nll + smoothing * uniform
    return _masked_mean(nll, valid)


def sym_kl(logp: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 per row, averaged over valid rows; gradients reach both sides.

    Uses KL(p||q) + KL(q||p) = sum_v (p - q)(log p - log q).
    """
    per_row = _vocab_sum((logp.exp() - logq.exp()) * (logp - logq)) / 2
    return _masked_mean(per_row, valid)
