"""Deterministic, resumable micro-batches for one data-parallel rank.

Epoch e visits the documents in the order of a permutation drawn from (seed, e). Global
micro-batch g of the epoch takes documents perm[g*B:(g+1)*B]; data-parallel rank r of D takes
g = i*D + r for its i-th micro-batch. The noise (masking) of a micro-batch is drawn from a
generator seeded by (seed, e, g), so a batch is a pure function of the position (epoch, i): saving
those two numbers is enough to resume exactly, for any number of ranks.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from janus_pretrain.errors import JanusError

Collate = Callable[[list, np.random.Generator], dict]


class BatchLoader:
    def __init__(self, corpus, collate: Collate, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, sources: Optional[object] = None):
        """`corpus[i]` is a target id array; `sources[i]`, if given, the matching source ids
        (fine-tuning pairs); pretraining derives sources from targets in `collate`."""
        self.corpus = corpus
        self.sources = sources
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batches_per_epoch = len(corpus) // (micro_batch_size * dp_size)
        if self.batches_per_epoch == 0:
            raise JanusError(f"data: {len(corpus)} documents are fewer than one micro-batch "
                             f"({micro_batch_size}) per data-parallel rank ({dp_size} ranks)")
        self.epoch = 0
        self.index = 0
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.corpus))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        g = self.index * self.dp_size + self.dp_rank
        ids = self._permutation()[g * self.micro_batch_size:(g + 1) * self.micro_batch_size]
        examples = [(self.sources[i] if self.sources is not None else None, self.corpus[i])
                    for i in ids]
        batch = self.collate(examples, np.random.default_rng([self.seed, self.epoch, g]))
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise JanusError(f"data: checkpoint was written with data.seed={state['seed']}, "
                             f"this run has data.seed={self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
