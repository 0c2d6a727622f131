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


def fill_bucketed(order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
                  ) -> list[np.ndarray]:
    """Cut `order` (example indices, shuffled) into batches of one (source, target) bucket
    each: src, tgt [N] are bucketed row lengths, a bucket's batches hold
    max_tokens // max(s, t) rows. What does not fill a bucket's last batch moves on to the
    next bucket that holds it (both lengths at least as large), so each bucket has one shape;
    what is left at the end forms the last batches, at the largest lengths it needs."""
    keys = sorted(set(zip(src[order].tolist(), tgt[order].tolist())),
                  key=lambda k: (max(k), k[1], k[0]))
    members = {k: [] for k in keys}
    for i, key in zip(order.tolist(), zip(src[order].tolist(), tgt[order].tolist())):
        members[key].append(i)
    batches: list[np.ndarray] = []
    pending: list[tuple[tuple[int, int], list[int]]] = []  # (bucket, examples) to carry on
    for key in keys:
        held = [p for p in pending if p[0][0] <= key[0] and p[0][1] <= key[1]]
        pending = [p for p in pending if not (p[0][0] <= key[0] and p[0][1] <= key[1])]
        examples = members[key] + [i for _, carried in held for i in carried]
        rows = max(1, max_tokens // max(key))
        full = len(examples) // rows * rows
        batches += [np.array(examples[j:j + rows]) for j in range(0, full, rows)]
        if full < len(examples):
            pending.append((key, examples[full:]))
    if pending:  # left over: batches at the lengths they need together
        rest = [i for _, carried in pending for i in carried]
        key = (max(k[0] for k, _ in pending), max(k[1] for k, _ in pending))
        rows = max(1, max_tokens // max(key))
        batches += [np.array(rest[j:j + rows]) for j in range(0, len(rest), rows)]
    return batches
