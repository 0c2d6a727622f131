"""Full-vocabulary log-probabilities for search, with the tokens a hypothesis may never contain.

The model's logits are split over the tensor-parallel group; search needs argmax / top-k over the
whole vocabulary, so every TP rank gathers the (already normalised) shards and then runs the same
search in lockstep. At TP = 1 the gather is a no-op.
"""
from __future__ import annotations

import torch

from janus_pretrain.parallel.vocab import gather_vocab, log_softmax
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD


def banned(allow_eos: bool) -> list[int]:
    return [PAD, BOS, MASK] + ([] if allow_eos else [EOS])


def full_log_probs(logits: torch.Tensor, vocab_size: int, allow_eos: bool) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> fp32 log-probs [..., V] over the real vocabulary, with
    [PAD], [BOS], [MASK] (and [EOS] unless allowed) at -inf; the table's padding rows are cut."""
    lp = gather_vocab(log_softmax(logits))[..., :vocab_size]
    return lp.index_fill(-1, torch.tensor(banned(allow_eos), device=lp.device), float("-inf"))


def best_tokens(logits: torch.Tensor, vocab_size: int, allow_eos: bool) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> the argmax tokens [...] full_log_probs would pick,
    without normalising: the softmax does not move the argmax."""
    full = gather_vocab(logits)[..., :vocab_size]
    return full.index_fill(-1, torch.tensor(banned(allow_eos), device=full.device),
                           float("-inf")).argmax(-1)

