"""Self-speculative decoding: the NAR stream drafts, the AR stream verifies (docs/method.md,
section 6).

Each iteration, for every sentence still decoding, with a tokens y_1..y_a accepted so far:
- draft: one NAR pass over `BOS y_1..y_a [MASK]*(n - a) EOS` (n the length head's length, at least
  a + k), as mask-predict's content stream sees a partly known target; the argmax at positions
  a+1..a+k is the draft d (EOS banned, as in mask-predict);
- verify: one cached AR pass over `y_a d_1..d_k` gives AR's log-probs at positions a+1..a+k+1 and
  its choice g there;
- accept the longest j with d_1..d_j acceptable, emit d_1..d_j and g_(j+1): every iteration emits
  at least one token, and the key/value cache keeps the accepted tokens only.
`exact` accepts d_i = g_i, so the output is AR greedy's (generate/ar.py::greedy) token for token,
score included, up to floating-point near-ties (a verify pass computes k + 1 rows at once, greedy
one). `relaxed` (GAD++, Xia et al., Findings of EMNLP 2023) accepts d_i when it is among AR's
`top` best and log p(d_i) >= log p(g_i) - `margin`.

Batched: each row keeps its own cache length. The self-attention cache is left-aligned (row r's
keys in slots 0..a_r - 1, later slots masked off); a verify pass appends k + 1 slots to every row
and each row's accepted slots are gathered back to the left (JanusModel.gather_cache), so no row
waits for another and the output does not depend on the batch. Finished rows leave the batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.generate.vocab import best_tokens, full_log_probs
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD

ACCEPT = ("exact", "relaxed")


@dataclass
class DraftRequest:
    """What a drafter sees for the B' rows still decoding."""
    rows: torch.Tensor         # [B'] their index in the batch
    prefix: torch.Tensor       # [B', T] BOS y_1..y_a, PAD after
    accepted: torch.Tensor     # [B'] a: tokens accepted so far
    count: int                 # k: tokens to draft per row
    memory: torch.Tensor       # [B', S, H]
    memory_mask: torch.Tensor  # [B', 1, 1, S]
    cross_cache: list[dict]    # per layer: the AR cache's cross-attention keys/values


Drafter = Callable[[DraftRequest], torch.Tensor]  # -> [B', k] draft tokens


class NarDrafter:
    """The NAR (content) stream's argmax at the k positions after the accepted prefix. Only those
    rows go through the output projection, and the memory's keys/values come from the AR cache."""

    def __init__(self, model, lengths: torch.Tensor):
        self.model, self.lengths = model, lengths

    def __call__(self, req: DraftRequest) -> torch.Tensor:
        a, k = req.accepted, req.count
        n = torch.maximum(self.lengths.index_select(0, req.rows), a + k)
        n = n.clamp(max=self.model.cfg.max_positions - 2)
        width = int(n.max()) + 2
        pos = torch.arange(width, device=a.device)[None, :]
        prefix = torch.nn.functional.pad(req.prefix, (0, width - req.prefix.shape[1]), value=PAD)
        tokens = torch.where(pos <= a[:, None], prefix, MASK)
        tokens = torch.where(pos == n[:, None] + 1, EOS, tokens)
        tokens = torch.where(pos > n[:, None] + 1, PAD, tokens)
        cache = [{"self": {}, "cross": cross} for cross in req.cross_cache]
        h = self.model.decode(tokens, None, req.memory, req.memory_mask,
                              self_mask=(tokens != PAD)[:, None, :], cache=cache)
        rows = (a[:, None] + 1 + torch.arange(k, device=a.device)).clamp(max=width - 1)
        h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
        return best_tokens(self.model.output_logits(h), self.model.vocab_size, allow_eos=False)


@dataclass
class SpecStats:
    """Per batch: iterations (one draft + one verify pass each) and tokens per sentence, and
    where the time went (perf_counter: wall time on CPU; on a GPU the phases overlap)."""
    iterations: list[int] = field(default_factory=list)  # per sentence
    emitted: list[int] = field(default_factory=list)     # per sentence, EOS included
    accepted: list[int] = field(default_factory=list)    # per sentence: draft tokens accepted
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0


def _acceptable(drafts, lp, best, accept: str, top: int, margin: float) -> torch.Tensor:
    """[B', k] bool: draft token i may stand at verify row i."""
    if accept == "exact":
        return drafts == best[:, :-1]
    lp = lp[:, :-1]
    mine = lp.gather(-1, drafts[..., None])[..., 0]
    rank = (lp > mine[..., None]).sum(-1)
    return (rank < top) & (mine >= lp.amax(-1) - margin)


@torch.no_grad()
def speculative(model, memory, memory_mask, max_len: int, block: int = 4, accept: str = "exact",
                top: int = 3, margin: float = 1.0, force_len: Optional[int] = None,
                drafter: Optional[Drafter] = None) -> tuple[list[Hypothesis], SpecStats]:
    """memory [B, S, H] -> one hypothesis per source and the batch's SpecStats. At most max_len
    tokens + EOS, as greedy; `force_len` forbids EOS before that many tokens and forces it after.
    `drafter` replaces the NAR drafter (tests force drafts through it)."""
    start = time.perf_counter()
    b, device = memory.shape[0], memory.device
    limit = force_len if force_len is not None else max_len
    if drafter is None:
        if force_len is not None:
            lengths = torch.full((b,), force_len, device=device)
        else:
            logits = model.length_logits(memory, memory_mask).float()
            logits[:, 0] = float("-inf")  # an empty target is never proposed
            lengths = logits.argmax(-1).clamp(max=limit)
        drafter = NarDrafter(model, lengths)
    stats = SpecStats([0] * b, [0] * b, [0] * b)
    out: list[list[int]] = [[] for _ in range(b)]
    total = [0.0] * b
    rows = list(range(b))
    cache = model.new_cache()
    steps = torch.arange(block + 1, device=device)
    max_pos = model.cfg.max_positions - 1
    while rows:
        index = torch.tensor(rows, device=device)
        acc = [len(out[r]) for r in rows]
        a = torch.tensor(acc, device=device)
        prefix = torch.tensor([[BOS] + out[r] + [PAD] * (max(acc) - len(out[r])) for r in rows],
                              device=device)
        cached = cache[0]["self"]["k"].shape[2] if "k" in cache[0]["self"] else 0
        t0 = time.perf_counter()
        drafts = drafter(DraftRequest(index, prefix, a, block, memory, memory_mask,
                                      [layer["cross"] for layer in cache]))
        t1 = time.perf_counter()
        # Verify: y_a d_1..d_k at positions a..a+k over the row's own cached slots.
        tokens = torch.cat([prefix.gather(1, a[:, None]), drafts], 1)
        positions = (a[:, None] + steps).clamp(max=max_pos)
        old = torch.arange(cached, device=device)[None, None, :] < a[:, None, None]
        new = torch.ones(block + 1, block + 1, dtype=torch.bool, device=device).tril()
        self_mask = torch.cat([old.expand(-1, block + 1, -1), new.expand(len(rows), -1, -1)], 2)
        h = model.decode(tokens, positions, memory, memory_mask, self_mask=self_mask, cache=cache)
        lp = full_log_probs(model.output_logits(h), model.vocab_size, allow_eos=True)
        target = a[:, None] + steps + 1  # the position each verify row predicts
        if force_len is not None:
            lp[..., EOS] = lp[..., EOS].masked_fill(target <= limit, float("-inf"))
        best = lp.argmax(-1).masked_fill(target == limit + 1, EOS)
        budget = (limit - a).clamp(max=block)
        ok = _acceptable(drafts, lp, best, accept, top, margin) & (steps[:-1] < budget[:, None])
        j = ok.long().cumprod(1).sum(1)
        chosen = torch.where(steps < j[:, None], torch.cat([drafts, drafts[:, -1:]], 1), best)
        gains = lp.gather(-1, chosen[..., None])[..., 0]
        t2 = time.perf_counter()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        keep, slots = [], []
        for i, (r, got, gain, n_ok) in enumerate(zip(rows, chosen.tolist(), gains.tolist(),
                                                     j.tolist())):
            got = got[:n_ok + 1]
            if EOS in got:
                got = got[:got.index(EOS) + 1]
            stats.iterations[r] += 1
            stats.emitted[r] += len(got)
            stats.accepted[r] += min(n_ok, len(got))
            total[r] += sum(gain[:len(got)])
            if got[-1] == EOS:
                out[r].extend(got[:-1])
                continue
            out[r].extend(got)
            keep.append(i)
            slots.append(list(range(acc[i])) + [cached + s for s in range(len(got))])
        rows = [rows[i] for i in keep]
        if rows:
            width = max(map(len, slots))
            slots_t = torch.tensor([s + [0] * (width - len(s)) for s in slots], device=device)
            model.gather_cache(cache, torch.tensor(keep, device=device), slots_t)
            memory = memory.index_select(0, index.new_tensor(keep))
            memory_mask = memory_mask.index_select(0, index.new_tensor(keep))
    stats.total_s = time.perf_counter() - start
    return [Hypothesis(out[i], total[i], total[i]) for i in range(b)], stats
