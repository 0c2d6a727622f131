"""Which examples form each global micro-batch of an epoch: a pure function of (seed, epoch).

Two plans, both `EpochPlan`s (flat arrays, data/plan.py):

- `fixed_size_plan`: a permutation drawn from (seed, epoch) cut into batches of B examples (the
  remainder of the epoch is dropped); the training loader takes its micro-batches from the
  permutation in turn, at any DP size (data/loader.py);
- `token_budget_plan`, as fairseq's --max-tokens: examples sorted by padded length (ties broken
  by the same permutation), cut greedily into batches whose padded cells (rows x longest row,
  source and target each) stay within a budget, then taken in groups of G consecutive (so the
  micro-batches of one optimizer step, G of them over all ranks, are of similar cost) and the
  groups shuffled. Every example is in exactly one batch. G is fixed for a run (a fixed global
  batch makes it the same at any DP size), so the plan does not depend on the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from janus_pretrain.data.buckets import Buckets, fill_bucketed
from janus_pretrain.data.plan import EpochPlan
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
                    ) -> EpochPlan:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    count = n // (micro_batch_size * dp_size) * dp_size
    return EpochPlan(perm[:count * micro_batch_size],
                     np.arange(0, count * micro_batch_size + 1, micro_batch_size, dtype=np.int64))


def fill_batches(order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
                 ) -> np.ndarray:
    """Cut `order` (example indices) greedily into consecutive batches with
    rows * max(src) <= max_tokens and rows * max(tgt) <= max_tokens (src, tgt: row lengths [N]);
    returns the batches' offsets into `order` [batches + 1].

    Vectorised over runs of equal cost per row (max(src, tgt), at most a few hundred distinct
    values): a run either tops up the open batch or fills whole batches of max_tokens // cost
    rows, so the Python loop is over runs, not examples (1e7 examples in well under a second)."""
    key = np.maximum(src, tgt)[order]
    if not len(key):
        return np.zeros(1, np.int64)
    runs = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1]).astype(np.int64)
    return fill_runs(runs, np.diff(np.append(runs, len(order))), key[runs], max_tokens)


def fill_runs(runs: np.ndarray, run_lens: np.ndarray, costs: np.ndarray, max_tokens: int
              ) -> np.ndarray:
    """`fill_batches` given its runs: start [R], length [R] and cost per row [R] of each run of
    consecutive examples of equal cost; -> the batches' offsets."""
    if not len(runs):
        return np.zeros(1, np.int64)
    starts, rows, longest = [np.zeros(1, np.int64)], 0, 0
    for pos, n, cost in zip(runs.tolist(), run_lens.tolist(), costs.tolist()):
        longest = max(longest, cost)
        room = max_tokens // longest - rows
        if rows and room <= 0:  # the open batch is full at this run's cost
            starts.append(np.array([pos]))
            rows, longest, room = 0, cost, max_tokens // cost
        take = min(room, n)
        rows += take
        if take < n:  # whole batches of this run's cost, the last one left open
            cap = max_tokens // cost
            new = np.arange(pos + take, pos + n, cap, dtype=np.int64)
            starts.append(new)
            rows, longest = pos + n - int(new[-1]), cost
    return np.concatenate(starts + [np.array([int(runs[-1] + run_lens[-1])])])


def split_to_multiple(offsets: np.ndarray, group: int) -> np.ndarray:
    """Halve the batches with the most rows (keeping the length order) until their number is a
    multiple of `group`, so that no example is dropped; splitting only lowers cost."""
    while (len(offsets) - 1) % group:
        sizes = np.diff(offsets)
        k = int(np.argmax(sizes))
        if sizes[k] < 2:
            raise JanusError(f"data: {len(sizes)} single-example batches cannot be shared "
                             f"into groups of {group} (micro-batches of a step on all ranks)")
        offsets = np.insert(offsets, k + 1, offsets[k] + sizes[k] // 2)
    return offsets


def length_order(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """np.lexsort((src, tgt)) (by target length, then source length, ties kept in order) as
    stable radix sorts of 16-bit keys: ~10x faster at 1e7 examples; one pass when the two
    sides are the same lengths (pretraining)."""
    if max(int(src.max(initial=0)), int(tgt.max(initial=0))) >= 2**16:
        return np.lexsort((src, tgt))
    if np.array_equal(src, tgt):
        return np.argsort(tgt.astype(np.uint16), kind="stable")
    first = np.argsort(src.astype(np.uint16), kind="stable")
    return first[np.argsort(tgt[first].astype(np.uint16), kind="stable")]


def token_budget_plan(source_lens: np.ndarray, target_lens: np.ndarray, budget: TokenBudget,
                      seed: int, epoch: int, group: int) -> EpochPlan:
    """Bare id counts [N] each (pretraining: the source is never longer than its target, so
    pass the target counts, the same array twice) -> the epoch's global batches (see the
    module docstring)."""
    same = source_lens is target_lens and budget.buckets is None
    if same:  # pretraining: (target row, source row) orders as the longer side's row alone
        longest = max(budget.max_source_len, budget.max_target_len)
        src = tgt = np.minimum(np.asarray(target_lens), longest - 2) + 2
    else:
        src, tgt = budget.row_lengths(np.asarray(source_lens), np.asarray(target_lens))
    too_long = max(int(src.max(initial=0)), int(tgt.max(initial=0)))
    if too_long > budget.max_tokens:
        raise JanusError(f"data: data.max_tokens={budget.max_tokens} is below one example of "
                         f"{too_long} tokens (with [BOS]/[EOS]): raise it to at least "
                         f"max(data.max_source_len, data.max_target_len)")
    if too_long < 2**16:  # a quarter of the memory traffic for every gather and sort below
        src, tgt = src.astype(np.uint16), tgt.astype(np.uint16)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(tgt))
    if budget.buckets is not None:
        order, offsets = fill_bucketed(perm, src, tgt, budget.max_tokens)
        plan = EpochPlan(order, split_to_multiple(offsets, group))
    elif same:  # one sort, and the runs of equal cost are the lengths' histogram
        order = perm[np.argsort(tgt[perm], kind="stable")]
        counts = np.bincount(tgt)
        costs = np.flatnonzero(counts)
        runs = np.cumsum(counts[costs]) - counts[costs]
        plan = EpochPlan(order, split_to_multiple(
            fill_runs(runs, counts[costs], costs, budget.max_tokens), group))
    else:
        order = perm[length_order(src[perm], tgt[perm])]
        plan = EpochPlan(order, split_to_multiple(
            fill_batches(order, src, tgt, budget.max_tokens), group))
    groups = rng.permutation(len(plan) // group)
    return plan.take((groups[:, None] * group + np.arange(group)).ravel())
