"""BANG's NAR decoding (objective.kind=bang_nar): one pass, no length prediction, no refinement.

The decoder input is the learned [MASK] vector at positions 1..max_len + 1 with causal
self-attention, as in training (objectives/bang.py), so row t does not depend on how many rows
follow it. Each row takes its argmax token (EOS allowed); the output is cut at the first EOS
and consecutive repeated tokens are dropped. An EOS before any token is skipped rather than
ending the output empty, as the authors' post-processing (post_processed_nar.py) does.
"""
from __future__ import annotations

import torch

from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.generate.vocab import full_log_probs
from janus_pretrain.tokenizer import EOS, PAD


def collapse(tokens: list[int]) -> list[int]:
    """Argmax ids of one row -> the output: leading EOS skipped, cut at the next EOS,
    consecutive repeats dropped."""
    start = next((i for i, x in enumerate(tokens) if x != EOS), len(tokens))
    out: list[int] = []
    for x in tokens[start:]:
        if x == EOS:
            break
        if not out or x != out[-1]:
            out.append(x)
    return out


@torch.no_grad()
def one_pass(model, memory, memory_mask, max_len: int) -> list[Hypothesis]:
    """memory [B, S, H] -> one hypothesis per source, from one decoder pass of max_len + 1 rows
    (fewer if the position table is shorter). Its score is the mean log-probability of the
    argmax tokens of all rows, its log_prob their sum."""
    b, device = memory.shape[0], memory.device
    rows = min(max_len + 1, model.cfg.max_positions - 1)
    positions = torch.arange(1, rows + 1, device=device).expand(b, rows)
    tokens = torch.full((b, rows), PAD, dtype=torch.long, device=device)
    query = torch.ones(rows, dtype=torch.bool, device=device)
    h = model.decode(tokens, positions, memory, memory_mask, causal=True, query=query)
    best_lp, best_tok = full_log_probs(model.output_logits(h), model.vocab_size,
                                       allow_eos=True).max(-1)
    total = best_lp.sum(1)
    return [Hypothesis(collapse(toks), float(total[i]) / rows, float(total[i]))
            for i, toks in enumerate(best_tok.tolist())]
