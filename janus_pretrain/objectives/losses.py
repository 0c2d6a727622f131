"""The JANUS loss terms on vocab-parallel logits (DESIGN.md section 1, "Loss").

Logits arrive split over the tensor-parallel group along the vocabulary and are never gathered;
the vocab-parallel reductions live in janus_pretrain.parallel.vocab. Terms are means over the
valid token rows of the micro-batch, in fp32.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from janus_pretrain.parallel.vocab import label_log_prob, vocab_sum


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def cross_entropy(logp: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                  smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross entropy with fairseq-style label smoothing over the full vocabulary.

    logp [..., V_local] (from `log_softmax`), labels / valid [...] -> scalar.
    """
    nll = -label_log_prob(logp, labels)
    if smoothing > 0:
        vocab = logp.shape[-1] * ps.get_tensor_model_parallel_world_size()
        uniform = -vocab_sum(logp) / vocab
        nll = (1.0 - smoothing) * nll + smoothing * uniform
    return _masked_mean(nll, valid)


def sym_kl(logp: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 per row, averaged over valid rows; gradients reach both sides.

    Uses KL(p||q) + KL(q||p) = sum_v (p - q)(log p - log q).
    """
    per_row = vocab_sum((logp.exp() - logq.exp()) * (logp - logq)) / 2
    return _masked_mean(per_row, valid)
