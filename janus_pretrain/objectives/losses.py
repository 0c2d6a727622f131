"""The JANUS loss terms on vocab-parallel logits (DESIGN.md section 1, "Loss").

Logits arrive split over the tensor-parallel group along the vocabulary; every reduction over the
vocabulary is a local sum followed by `reduce_from_tensor_model_parallel_region` (all-reduce
forward, identity backward), which is exact and a no-op at TP = 1. All terms are means over the
valid token rows of the micro-batch and are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    """All-reduce over the TP group in the forward pass, identity in the backward pass."""
    return reduce_from_tensor_model_parallel_region(x, group=ps.get_tensor_model_parallel_group())


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel log-softmax: [..., V_local] -> fp32 log-probs [..., V_local]."""
    logits = logits.float()
    peak = logits.detach().amax(-1, keepdim=True)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = logits - peak
    total = _tp_sum(shifted.exp().sum(-1, keepdim=True))
    return shifted - total.log()


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
