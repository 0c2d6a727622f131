"""Several prepared corpora trained on together, by weight (as Megatron's BlendedDataset).

`data.train` names one directory, or several with weights: a list of `{path, weight}`, or
Megatron's string form "w1 path1 w2 path2 ...". Weights are normalised. A blend epoch holds as
many examples as all the corpora together (N), corpus k's share of them round(w_k * N) (largest
remainders, so the counts sum to N exactly): a small corpus of large weight is repeated within
an epoch, a large corpus of small weight is taken in part. Corpus k's j-th example in blend
epoch e is its document (e * count_k + j) mod len_k, so successive epochs walk on through it
and every document of a corpus comes round equally often. The loader shuffles the blend epoch
(its plan is over all N), so a window of steps holds the corpora in proportion; all of it is a
pure function of (epoch, index), so a blend resumes exactly as one corpus does.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from janus_pretrain.errors import JanusError

FORMS = ("a directory, a list of {path, weight}, or \"w1 dir1 w2 dir2 ...\"")


def parse_blend(value: Any, key: str = "data.train") -> list[tuple[str, float]]:
    """`data.train` -> [(path, normalised weight)]; one directory is a blend of one."""
    if isinstance(value, str):
        words = value.split()
        if len(words) == 1:
            pairs = [(value, 1.0)]
        else:
            try:
                pairs = [(words[i + 1], float(words[i])) for i in range(0, len(words), 2)]
            except (ValueError, IndexError):
                raise JanusError(f"config: {key}: '{value}' is not {FORMS}") from None
    elif isinstance(value, (list, tuple)) and value:
        pairs = []
        for item in value:
            if not (isinstance(item, dict) and set(item) == {"path", "weight"}):
                raise JanusError(f"config: {key}: {item!r} is not {{path, weight}}; use {FORMS}")
            try:
                pairs.append((str(item["path"]), float(item["weight"])))
            except (TypeError, ValueError):
                raise JanusError(f"config: {key}: weight {item['weight']!r} is not a number") from None
    else:
        raise JanusError(f"config: {key}: {value!r} is not {FORMS}")
    if any(not w > 0 for _, w in pairs):
        raise JanusError(f"config: {key}: weights must be positive, got "
                         f"{', '.join(f'{w:g}' for _, w in pairs)}")
    total = sum(w for _, w in pairs)
    return [(p, w / total) for p, w in pairs]


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """round(w_k * total) by largest remainders: non-negative, summing to `total` exactly."""
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]] += 1
    return counts


class BlendedCorpus:
    """Corpora (each with `len`, `[i]` and `lengths()`) by weight; `for_epoch(e)` is blend epoch
    e as a corpus of N examples (see the module docstring)."""

    def __init__(self, members: Sequence, weights: Sequence[float], names: Sequence[str]):
        self.members, self.weights = list(members), [float(w) for w in weights]
        self.names = [n if list(names).count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        self.sizes = np.array([len(m) for m in members], dtype=np.int64)
        empty = [n for n, s in zip(self.names, self.sizes) if s == 0]
        if empty:
            raise JanusError(f"data.train: corpus {empty[0]} of the blend holds no example")
        self.counts = blend_counts(self.weights, int(self.sizes.sum()))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._consumed: dict = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def identity(self) -> Optional[str]:
        ids = [getattr(m, "identity", None) for m in self.members]
        if None in ids:
            return None
        return hashlib.sha256(json.dumps([ids, self.counts.tolist()]).encode()).hexdigest()

    def map_members(self, fn: Callable) -> "BlendedCorpus":
        """The same blend over fn(member) (packed blocks instead of documents, say)."""
        return BlendedCorpus([fn(m) for m in self.members], self.weights, self.names)

    def documents(self, k: int, epoch: int) -> np.ndarray:
        """Corpus k's documents in blend epoch `epoch`, in order [count_k]."""
        return (epoch * self.counts[k] + np.arange(self.counts[k])) % self.sizes[k]

    def for_epoch(self, epoch: int) -> "BlendEpoch":
        return BlendEpoch(self, epoch)

    def member_of(self, examples: np.ndarray) -> np.ndarray:
        """The corpus each of a blend epoch's examples comes from."""
        return np.searchsorted(self.starts, examples, side="right") - 1

    def describe(self) -> str:
        """One line: each corpus's weight, share of an epoch, and passes over it per epoch."""
        return "; ".join(f"{n}: weight {w:.3g}, {c} of {len(self)} examples an epoch "
                         f"({c / s:.3g} passes over its {s})"
                         for n, w, c, s in zip(self.names, self.weights, self.counts, self.sizes))

    def mixture(self, epoch: int, taken: np.ndarray) -> dict[str, float]:
        """W&B metrics for a position: each corpus's share of the examples `taken` so far in
        `epoch` (all ranks; counted incrementally, as they only grow within an epoch) and the
        passes over it so far."""
        done, counts = self._consumed.get(epoch, (0, np.zeros(len(self.members), np.int64)))
        if len(taken) < done:
            done, counts = 0, np.zeros(len(self.members), np.int64)
        counts = counts + np.bincount(self.member_of(np.asarray(taken[done:])),
                                      minlength=len(self.members))
        self._consumed = {epoch: (len(taken), counts)}
        share = counts / max(1, len(taken))
        metrics = {}
        for k, name in enumerate(self.names):
            metrics[f"data/{name}/share"] = float(share[k])
            metrics[f"data/{name}/epochs"] = float((epoch * self.counts[k] + counts[k])
                                                   / self.sizes[k])
        return metrics


class BlendEpoch:
    """Blend epoch e as a corpus: example i is corpus k's document documents(k, e)[i - start_k]."""

    def __init__(self, blend: BlendedCorpus, epoch: int):
        self.blend, self.epoch = blend, epoch

    def __len__(self) -> int:
        return len(self.blend)

    def __getitem__(self, i: int) -> np.ndarray:
        b = self.blend
        k = int(b.member_of(np.asarray([i]))[0])
        j = i - int(b.starts[k])
        return b.members[k][int((self.epoch * b.counts[k] + j) % b.sizes[k])]

    def lengths(self) -> np.ndarray:
        """Ids per example [N], from the members' indexes."""
        b = self.blend
        return np.concatenate([np.asarray(m.lengths())[b.documents(k, self.epoch)]
                               for k, m in enumerate(b.members)])


def open_blend(value: Any, open_one: Callable[[str], Any]):
    """`data.train` opened: one corpus as it is, several as a BlendedCorpus."""
    pairs = parse_blend(value)
    if len(pairs) == 1:
        return open_one(pairs[0][0])
    return BlendedCorpus([open_one(p) for p, _ in pairs], [w for _, w in pairs],
                         [Path(p).name for p, _ in pairs])
