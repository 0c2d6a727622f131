"""checkpoint/slices.py's copies from fragments, against plain indexing of the whole tensor: a
parameter cut into fragments at arbitrary offsets (as ZeRO-1/2 partitions cut it), read by flat
ranges and by column blocks of rows, including rows that cross a fragment boundary."""
from __future__ import annotations

import numpy as np
import torch

from janus_pretrain.checkpoint.slices import Fragment, SavedRank, _runs


def _saved(whole: torch.Tensor, cuts: list[int]) -> SavedRank:
    """`whole` (flat) cut at `cuts` into fragments, each in its own 'file' after some padding."""
    bounds = [0, *cuts, whole.numel()]
    files, fragments = [], []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        pad = 3 + i
        files.append({"flat": torch.cat([torch.full((pad,), -1.0), whole[lo:hi]])})
        fragments.append(Fragment(i, "flat", pad, lo, hi - lo))
    rank = SavedRank([], {"w": whole.shape}, {"w": fragments},
                     lambda file, slot, key: file[slot], set())
    rank._open = dict(enumerate(files))
    return rank


def test_flat_ranges_and_row_blocks_equal_indexing():
    rng = np.random.default_rng(0)
    rows, row = 9, 12
    whole = torch.arange(rows * row, dtype=torch.float32)
    rank = _saved(whole, [5, 30, 31, 70])  # boundaries inside rows, one fragment of one element
    for _ in range(200):
        lo, hi = sorted(int(x) for x in rng.integers(0, whole.numel() + 1, 2))
        out = torch.empty(hi - lo)
        rank.copy_flat(out, "w", "fp32", lo)
        assert torch.equal(out, whole[lo:hi])
        first = int(rng.integers(0, rows))
        n = int(rng.integers(1, rows - first + 1))
        a = int(rng.integers(0, row))
        width = int(rng.integers(1, row - a + 1))
        out = torch.full((n, row), float("nan"))[:, 2:2 + width] if width <= row - 2 else \
            torch.empty(n, width)  # a strided destination, as a TP chunk's columns are
        rank.copy_rows(out, "w", "fp32", first, row, a)
        assert torch.equal(out, whole.view(rows, row)[first:first + n, a:a + width])


def test_runs_cover_a_range_in_rows():
    for lo, hi, row in ((0, 12, 4), (3, 5, 4), (3, 14, 4), (4, 8, 4), (1, 2, 1)):
        covered = [r * row + c for first, end, c0, c1 in _runs(lo, hi, row)
                   for r in range(first, end) for c in range(c0, c1)]
        assert covered == list(range(lo, hi))
