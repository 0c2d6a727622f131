"""Autoregressive decoding: greedy and beam search, incremental with a key/value cache.

Both take an encoded batch (`model.run_encoder`) and return, per source, token ids without BOS/EOS
and the hypothesis score. `incremental=False` recomputes the full prefix at every step; it exists
as the reference the cached path is tested against.

`predict_stream=True` decodes a BANG model (objective.kind=bang) with its first predicting stream,
as it was trained (docs/method.md, section 9): the prefix runs as the causal main stream, and the
next token is read from one more row, the learned [MASK] vector at the next position, which sees
the whole prefix and itself. Cached, a step runs two rows (the newest main row and the predicting
row, causal over cache + both) and then drops the predicting row's keys from the cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.generate.vocab import full_log_probs
from janus_pretrain.tokenizer import BOS, EOS


class _Stepper:
    """Next-token log-probs for a growing batch of prefixes, cached or recomputed."""

    def __init__(self, model, memory, memory_mask, incremental: bool, predict_stream: bool):
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cache = model.new_cache() if incremental else None
        self.predict_stream = predict_stream

    def __call__(self, prefix: torch.Tensor, allow_eos: bool) -> torch.Tensor:
        """prefix [N, t] -> log-probs [N, V] of token t+1."""
        if self.predict_stream:
            h = self._predicting_row(prefix)
        elif self.cache is not None:
            h = self.model.decode(prefix[:, -1:], None, self.memory, self.memory_mask,
                                  cache=self.cache)
        else:
            h = self.model.decode(prefix, None, self.memory, self.memory_mask, causal=True)
        return full_log_probs(self.model.output_logits(h[:, -1]), self.model.vocab_size, allow_eos)

    def _predicting_row(self, prefix: torch.Tensor) -> torch.Tensor:
        """BANG: [main rows of the prefix (or only the newest, cached) | [MASK] at position t]."""
        t, device = prefix.shape[1], prefix.device
        if self.cache is None:
            positions = torch.arange(t + 1, device=device)
            tokens, query = torch.cat([prefix, prefix[:, -1:]], 1), positions == t
            return self.model.decode(tokens, positions, self.memory, self.memory_mask,
                                     causal=True, query=query)
        tokens, positions = prefix[:, -1:].repeat(1, 2), torch.arange(t - 1, t + 1, device=device)
        causal = torch.ones(2, t + 1, dtype=torch.bool, device=device)
        causal[0, t] = False
        h = self.model.decode(tokens, positions, self.memory, self.memory_mask,
                              self_mask=causal.expand(prefix.shape[0], 2, t + 1), cache=self.cache,
                              query=torch.tensor([False, True], device=device))
        self.model.truncate_cache(self.cache, t)
        return h

    def select(self, index: torch.Tensor) -> None:
        self.memory = self.memory.index_select(0, index)
        self.memory_mask = self.memory_mask.index_select(0, index)
        if self.cache is not None:
            self.model.reorder_cache(self.cache, index)


def _banned_ngrams(prefix: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `prefix`."""
    if n <= 0 or len(prefix) < n:
        return []
    tail = tuple(prefix[len(prefix) - n + 1:])
    return [prefix[i + n - 1] for i in range(len(prefix) - n + 1) if tuple(prefix[i:i + n - 1]) == tail]


@torch.no_grad()
def greedy(model, memory, memory_mask, max_len: int, force_len: Optional[int] = None,
           incremental: bool = True, predict_stream: bool = False) -> list[Hypothesis]:
    """Pick the most likely token at every step. memory [B, S, H]; at most max_len tokens + EOS;
    `force_len` forbids EOS before that many tokens and forces it after."""
    b = memory.shape[0]
    step = _Stepper(model, memory, memory_mask, incremental, predict_stream)
    prefix = torch.full((b, 1), BOS, dtype=torch.long, device=memory.device)
    total = torch.zeros(b, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    length = torch.zeros(b, dtype=torch.long, device=memory.device)
    limit = force_len if force_len is not None else max_len
    for t in range(limit + 1):
        lp = step(prefix, allow_eos=force_len is None or t == force_len)
        if t == limit:
            token = torch.full((b,), EOS, dtype=torch.long, device=memory.device)
        else:
            token = lp.argmax(-1)
        gain = lp.gather(1, token[:, None])[:, 0]
        total = torch.where(done, total, total + gain)
        length = torch.where(done, length, length + 1)
        done = done | (token == EOS)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        if bool(done.all()):
            break
    out = []
    for i in range(b):
        toks = prefix[i, 1:].tolist()
        toks = toks[:toks.index(EOS)] if EOS in toks else toks
        out.append(Hypothesis(toks, float(total[i]), float(total[i])))
    return out


@torch.no_grad()
def beam_search(model, memory, memory_mask, beam: int = 5, max_len: int = 200,
                length_penalty: float = 1.0, no_repeat_ngram: int = 0,
                force_len: Optional[int] = None, incremental: bool = True,
                predict_stream: bool = False) -> list[list[Hypothesis]]:
    """Batched beam search; per source, up to `beam` finished hypotheses sorted by score.

    A source is done once it holds `beam` finished hypotheses (fairseq's stopping rule); at
    max_len every open hypothesis is closed with EOS, so no output is longer than max_len tokens.
    """
    b, device = memory.shape[0], memory.device
    rows = torch.arange(b, device=device).repeat_interleave(beam)
    step = _Stepper(model, memory.index_select(0, rows), memory_mask.index_select(0, rows),
                    incremental, predict_stream)
    prefix = torch.full((b * beam, 1), BOS, dtype=torch.long, device=device)
    scores = torch.full((b, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    active = list(range(b))  # sources still searching, in the order of the batch rows
    limit = force_len if force_len is not None else max_len
    for t in range(limit + 1):
        lp = step(prefix, allow_eos=force_len is None or t == force_len)
        if t == limit:  # close every hypothesis
            keep_eos = lp[:, EOS].clone()
            lp.fill_(float("-inf"))
            lp[:, EOS] = keep_eos
        if no_repeat_ngram > 0:
            for r, hyp in enumerate(prefix[:, 1:].tolist()):
                banned = _banned_ngrams(hyp, no_repeat_ngram)
                if banned:
                    lp[r, banned] = float("-inf")
        vocab = lp.shape[-1]
        cand = (scores.view(-1, 1) + lp).view(len(active), beam * vocab)
        top_scores, top_idx = cand.topk(min(2 * beam, cand.shape[1]), dim=1)
        top_beam, top_tok = top_idx // vocab, top_idx % vocab
        next_rows, next_tokens, next_scores, still = [], [], [], []
        top_scores_l, top_beam_l, top_tok_l = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
        for a, src in enumerate(active):
            picked = []
            for rank, (s, bm, tok) in enumerate(zip(top_scores_l[a], top_beam_l[a], top_tok_l[a])):
                if s == float("-inf"):
                    break
                row = a * beam + bm
                if tok == EOS:
                    # Only the top `beam` candidates may finish (fairseq, and HF generate alike).
                    if rank < beam and len(finished[src]) < beam:
                        n = t + 1  # tokens generated, EOS included
                        finished[src].append(Hypothesis(prefix[row, 1:].tolist(), s / n ** length_penalty, s))
                else:
                    picked.append((row, tok, s))
                if len(picked) == beam:
                    break
            if len(finished[src]) >= beam or not picked:
                continue
            while len(picked) < beam:  # too few live candidates: pad with dead copies
                picked.append((picked[0][0], picked[0][1], float("-inf")))
            still.append(src)
            for row, tok, s in picked:
                next_rows.append(row)
                next_tokens.append(tok)
                next_scores.append(s)
        if not still:
            break
        index = torch.tensor(next_rows, device=device)
        prefix = torch.cat([prefix.index_select(0, index),
                            torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(len(still), beam)
        step.select(index)
        active = still
    return [sorted(f, key=lambda h: -h.score) for f in finished]
