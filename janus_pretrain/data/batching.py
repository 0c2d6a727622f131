"""Which examples form each global micro-batch of an epoch: a pure function of (seed, epoch).

Two plans, both lists of example-index arrays whose length is a multiple of the data-parallel
size D, so that the consecutive batches g = i*D .. i*D + D - 1 are step i's batches on ranks
0 .. D-1:

- `fixed_size_plan`: a permutation drawn from (seed, epoch) cut into batches of B examples (the
  remainder of the epoch is dropped);
- `token_budget_plan`, as fairseq's --max-tokens: examples sorted by padded length (ties broken
  by the same permutation), cut greedily into batches whose padded cells (rows x longest row,
  source and target each) stay within a budget, then taken in groups of D consecutive (so the
  ranks of one step get batches of similar cost) and the groups shuffled. Every example is in
  exactly one batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from janus_pretrain.data.buckets import Buckets, fill_bucketed
from janus_pretrain.errors import JanusError


@dataclass(frozen=True)
class TokenBudget:
    """At most `max_tokens` padded cells per batch on each side, counting the [BOS]/[EOS] the
    collator adds to rows it has cut to max_source_len - 2 / max_target_len - 2 ids."""

    max_tokens: int
    max_source_len: int
    max_target_len: int
    buckets: Optional[Buckets] = None  # rows are then padded up to their bucket's length

    def row_lengths(self, source_lens: np.ndarray, target_lens: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Bare id counts [N] each -> collated (and bucketed) row lengths [N] each (source,
        target)."""
        src = np.minimum(source_lens, self.max_source_len - 2) + 2
        tgt = np.minimum(target_lens, self.max_target_len - 2) + 2
        if self.buckets is None:
            return src, tgt
        return (self.buckets.lengths_of(src, self.max_source_len),
                self.buckets.lengths_of(tgt, self.max_target_len))


def fixed_size_plan(n: int, micro_batch_size: int, seed: int, epoch: int, dp_size: int
                    ) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    count = n // (micro_batch_size * dp_size) * dp_size
    return [perm[g * micro_batch_size:(g + 1) * micro_batch_size] for g in range(count)]


def fill_batches(order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
                 ) -> list[np.ndarray]:
    """Cut `order` (example indices) greedily into consecutive batches with
    rows * max(src) <= max_tokens and rows * max(tgt) <= max_tokens (src, tgt: row lengths [N])."""
    batches, start, longest_src, longest_tgt = [], 0, 0, 0
    for pos, i in enumerate(order.tolist()):
        s, t = max(longest_src, int(src[i])), max(longest_tgt, int(tgt[i]))
        if (pos + 1 - start) * max(s, t) > max_tokens and pos > start:
            batches.append(order[start:pos])
            start, s, t = pos, int(src[i]), int(tgt[i])
        longest_src, longest_tgt = s, t
    if len(order) > start:
        batches.append(order[start:])
    return batches


def split_to_multiple(batches: list[np.ndarray], dp_size: int) -> list[np.ndarray]:
    """Halve the batches with the most rows (in place, keeping the length order) until their
    number is a multiple of dp_size, so that no example is dropped; splitting only lowers cost."""
    batches = list(batches)
    while len(batches) % dp_size:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[k]) < 2:
            raise JanusError(f"data: {len(batches)} single-example batches cannot be shared "
                             f"evenly by {dp_size} data-parallel ranks")
        half = len(batches[k]) // 2
        batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


def token_budget_plan(source_lens: np.ndarray, target_lens: np.ndarray, budget: TokenBudget,
                      seed: int, epoch: int, dp_size: int) -> list[np.ndarray]:
    """Bare id counts [N] each (pretraining: the source is never longer than its target, so
    pass the target counts) -> the epoch's global batches (see the module docstring)."""
    src, tgt = budget.row_lengths(np.asarray(source_lens), np.asarray(target_lens))
    too_long = max(int(src.max(initial=0)), int(tgt.max(initial=0)))
    if too_long > budget.max_tokens:
        raise JanusError(f"data: data.max_tokens={budget.max_tokens} is below one example of "
                         f"{too_long} tokens (with [BOS]/[EOS]): raise it to at least "
                         f"max(data.max_source_len, data.max_target_len)")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(tgt))
    if budget.buckets is not None:
        batches = fill_bucketed(perm, src, tgt, budget.max_tokens)
    else:
        order = perm[np.lexsort((src[perm], tgt[perm]))]
        batches = fill_batches(order, src, tgt, budget.max_tokens)
    batches = split_to_multiple(batches, dp_size)
    groups = rng.permutation(len(batches) // dp_size)
    return [batches[q * dp_size + r] for q in groups.tolist() for r in range(dp_size)]
