"""Non-autoregressive decoding: mask-predict (Ghazvininejad et al., 2019) on the NAR stream.

Per source: predict the target length, keep the `length_beam` most likely lengths, start each
candidate from all [MASK], and predict every position in parallel. Iteration t of T (t = 1..T-1)
re-masks the floor(n * (T - t) / T) lowest-probability tokens and predicts them again, so a
candidate costs exactly T decoder passes (T = 1: one argmax pass). The best candidate by average
log-probability wins, or by the AR stream's score of it when `rerank` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.generate.vocab import full_log_probs
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD


@dataclass
class Candidates:
    tokens: torch.Tensor     # [N, L] BOS y1..yn EOS PAD..
    inner: torch.Tensor      # [N, L] bool: the n positions being predicted
    lengths: torch.Tensor    # [N]


def remask_count(n: torch.Tensor, t: int, iterations: int) -> torch.Tensor:
    """Linear schedule: how many of n tokens to re-mask before iteration t (1 <= t < T)."""
    return torch.div(n * (iterations - t), iterations, rounding_mode="floor")


def initial_candidates(lengths: torch.Tensor) -> Candidates:
    """lengths [N] -> all-[MASK] candidates framed by BOS/EOS."""
    n_max = int(lengths.max())
    pos = torch.arange(n_max + 2, device=lengths.device)[None, :]
    inner = (pos >= 1) & (pos <= lengths[:, None])
    tokens = torch.full(inner.shape, PAD, dtype=torch.long, device=lengths.device)
    tokens[:, 0] = BOS
    tokens[inner] = MASK
    tokens.scatter_(1, (lengths + 1)[:, None], EOS)
    return Candidates(tokens, inner, lengths)


@torch.no_grad()
def mask_predict(model, memory, memory_mask, iterations: int = 10, length_beam: int = 3,
                 lengths: Optional[torch.Tensor] = None, max_len: int = 200,
                 dedup: bool = False, rerank: bool = False) -> list[Hypothesis]:
    """memory [B, S, H] -> one hypothesis per source. `lengths` [B] fixes the target lengths
    (no length prediction, one candidate each); otherwise the length head proposes them."""
    b = memory.shape[0]
    if lengths is None:
        length_logits = model.length_logits(memory, memory_mask).float()
        length_logits[:, 0] = float("-inf")  # an empty target is never proposed
        k = min(length_beam, length_logits.shape[1] - 1)
        lengths = length_logits.topk(k, dim=-1).indices.clamp(max=max_len)  # [B, k]
    else:
        lengths = lengths.to(memory.device)[:, None]
    k = lengths.shape[1]
    rows = torch.arange(b, device=memory.device).repeat_interleave(k)
    mem, mem_mask = memory.index_select(0, rows), memory_mask.index_select(0, rows)
    cand = initial_candidates(lengths.reshape(-1))
    key_mask = (cand.tokens != PAD)[:, None, :]
    tokens = cand.tokens
    probs = torch.zeros(tokens.shape, device=memory.device)
    for t in range(iterations):
        if t == 0:
            masked = cand.inner
        else:
            # Lowest-probability tokens first; positions outside the target sort last.
            order = probs.masked_fill(~cand.inner, float("inf")).argsort(dim=1)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            masked = rank < remask_count(cand.lengths, t, iterations)[:, None]
            tokens = tokens.masked_fill(masked, MASK)
        h = model.decode(tokens, None, mem, mem_mask, self_mask=key_mask)
        lp = full_log_probs(model.output_logits(h), model.vocab_size, allow_eos=False)
        best_lp, best_tok = lp.max(-1)
        tokens = torch.where(masked, best_tok, tokens)
        probs = torch.where(masked, best_lp, probs)
    avg = (probs * cand.inner).sum(1) / cand.lengths
    if rerank:
        avg = ar_scores(model, tokens, mem, mem_mask)
    best = avg.view(b, k).argmax(1)
    out = []
    for i in range(b):
        r = i * k + int(best[i])
        toks = tokens[r, 1:1 + int(cand.lengths[r])].tolist()
        if dedup:
            toks = [x for j, x in enumerate(toks) if j == 0 or x != toks[j - 1]]
        out.append(Hypothesis(toks, float(avg[r]), float((probs[r] * cand.inner[r]).sum())))
    return out


def ar_scores(model, tokens: torch.Tensor, memory, memory_mask) -> torch.Tensor:
    """Average AR log-probability of complete candidates [N, L] (BOS .. EOS PAD..) -> [N]."""
    h = model.decode(tokens[:, :-1], None, memory, memory_mask, causal=True)
    lp = full_log_probs(model.output_logits(h), model.vocab_size, allow_eos=True)
    labels = tokens[:, 1:]
    valid = labels != PAD
    picked = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(~valid, 0.0)
    return picked.sum(1) / valid.sum(1)
