"""Few batch shapes: batches made of one length bucket each, padded up to it.

On a GPU every new shape costs: cuDNN builds an attention plan per shape, torch.compile and CUDA
graphs capture one per shape. Token-budget batches vary in length, and JANUS's two-stream decoder
runs L + 2K rows where K is the batch's largest count of masked positions, so an epoch of real
data brings ~100 shapes. Padding the source and target up to the next `lengths` entry and the
masked slots K up to the next `slot_shares` entry x the padded target length leaves a handful;
with a token budget, `fill_bucketed` also makes every batch of a bucket the same number of rows.
The padding is of the kind every batch already has ([PAD] columns, -1 slots, which the masks
and losses skip), so results change only by the padding's arithmetic. `bench overhead --shapes`
counts the shapes and the padding, with and without buckets.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

from janus_pretrain.tokenizer import PAD


@dataclass(frozen=True)
class Buckets:
    lengths: tuple[int, ...]
    max_source_len: int
    max_target_len: int
    slot_shares: tuple[float, ...] = (1.0,)

    def length(self, n: int, cap: int) -> int:
        """The padded length of rows of at most n ids (n <= cap): the next bucket, or the cap."""
        i = bisect.bisect_left(self.lengths, n)
        return min(self.lengths[i], cap) if i < len(self.lengths) else cap

    def lengths_of(self, n: np.ndarray, cap: int) -> np.ndarray:
        """`length` of every entry of n [N] (the token-budget plan's row lengths)."""
        table = np.array([*[b for b in self.lengths if b < cap], cap])
        return table[np.minimum(np.searchsorted(table, n), len(table) - 1)]

    def slots(self, k: int, target_len: int) -> int:
        """The padded number of masked slots for a batch needing k (k <= target_len); none for
        a batch that masks nothing (an AR-only objective)."""
        if k == 0:
            return 0
        for f in (*self.slot_shares, 1.0):
            if k <= (s := math.ceil(f * target_len)):
                return s
        return target_len

    def pad(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch with src / tgt (and masked, masked_pos) padded up to their buckets
        along the length axis, where present; other entries as they are."""
        out = dict(batch)
        if "src" in batch:
            out["src"] = _pad_to(batch["src"], self.length(batch["src"].shape[1],
                                                           self.max_source_len), PAD)
        if "tgt" in batch:
            tgt_len = self.length(batch["tgt"].shape[1], self.max_target_len)
            out["tgt"] = _pad_to(batch["tgt"], tgt_len, PAD)
            if "masked" in batch:
                out["masked"] = _pad_to(batch["masked"], tgt_len, False)
            if "masked_pos" in batch:
                k = self.slots(batch["masked_pos"].shape[1], tgt_len)
                out["masked_pos"] = _pad_to(batch["masked_pos"], k, -1)
        return out


def _pad_to(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """[B, n] -> [B, length] right-padded with `value` (n <= length)."""
    if x.shape[1] == length:
        return x
    out = torch.full((x.shape[0], length), value, dtype=x.dtype)
    out[:, :x.shape[1]] = x
    return out


def build_buckets(data) -> Buckets | None:
    """The buckets a DataConfig asks for (`data.length_buckets`; empty: none)."""
    if not data.length_buckets:
        return None
    return Buckets(tuple(sorted(data.length_buckets)), data.max_source_len, data.max_target_len,
                   tuple(sorted(data.slot_shares)))


def _index_of_lengths(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (the distinct lengths, ascending; each entry's index among them), by table lookup."""
    distinct = np.flatnonzero(np.bincount(lengths))
    table = np.zeros(int(distinct[-1]) + 1, dtype=np.uint16)
    table[distinct] = np.arange(len(distinct))
    return distinct, table[lengths]


def fill_bucketed(order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cut `order` (example indices, shuffled) into batches of one (source, target) bucket
    each: src, tgt [N] are bucketed row lengths, a bucket's batches hold
    max_tokens // max(s, t) rows. What does not fill a bucket's last batch moves on to the
    next bucket that holds it (both lengths at least as large), so each bucket has one shape;
    what is left at the end forms the last batches, at the largest lengths it needs.
    -> (example order, batch offsets) of an EpochPlan (data/plan.py). Vectorised but for a loop
    over the buckets present (a few dozen at most)."""
    s, t = src[order], tgt[order]
    s_lengths, s_index = _index_of_lengths(s)
    t_lengths, t_index = _index_of_lengths(t)
    pair = (s_index * len(t_lengths) + t_index).astype(np.uint16)
    present = np.flatnonzero(np.bincount(pair))
    buckets = sorted(((int(s_lengths[k // len(t_lengths)]), int(t_lengths[k % len(t_lengths)]),
                       int(k)) for k in present), key=lambda b: (max(b[:2]), b[1], b[0]))
    rank = np.zeros(int(present.max()) + 1, dtype=np.uint16)
    rank[[k for *_, k in buckets]] = np.arange(len(buckets))
    ranks = rank[pair]
    grouped = order[np.argsort(ranks, kind="stable")]  # by bucket, shuffled within
    ends = np.cumsum(np.bincount(ranks, minlength=len(buckets)))
    parts, offsets, done = [], [], 0
    pending: list[tuple[int, int, np.ndarray]] = []  # (lengths, examples) to carry on

    def cut(examples: np.ndarray, rows: int) -> None:
        nonlocal done
        parts.append(examples)
        offsets.append(done + np.arange(0, len(examples), rows))
        done += len(examples)

    for g, (sl, tl, _) in enumerate(buckets):
        held = [p for p in pending if p[0] <= sl and p[1] <= tl]
        pending = [p for p in pending if not (p[0] <= sl and p[1] <= tl)]
        start = ends[g - 1] if g else 0
        examples = np.concatenate([grouped[start:ends[g]], *(p[2] for p in held)])
        rows = max(1, max_tokens // max(sl, tl))
        full = len(examples) // rows * rows
        cut(examples[:full], rows)
        if full < len(examples):
            pending.append((sl, tl, examples[full:]))
    if pending:  # left over: batches at the lengths they need together
        rows = max(1, max_tokens // max(max(p[0] for p in pending), max(p[1] for p in pending)))
        cut(np.concatenate([p[2] for p in pending]), rows)
    return (np.concatenate(parts).astype(np.int64),
            np.concatenate([*offsets, [done]]).astype(np.int64))
