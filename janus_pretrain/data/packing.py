"""Pretraining blocks: the corpus's documents back to back, cut into blocks of `block_len` ids.

BART pretrains on full blocks rather than on documents, so that a batch of short paragraphs is
not mostly padding: block k holds ids k*block_len .. (k+1)*block_len - 1 of the concatenated
documents (the last block may be shorter), so every id of the corpus is in exactly one block and
a document may continue into the next block. The blocks are fixed; the loader shuffles them.
"""
from __future__ import annotations

import numpy as np

from janus_pretrain.errors import JanusError


class PackedCorpus:
    """`blocks[k]` is block k as int64 [<= block_len]; reads only that block's ids from `corpus`
    (a ShardedCorpus, or anything with `num_tokens` and `token_slice(start, stop)`)."""

    def __init__(self, corpus, block_len: int):
        if block_len < 1:
            raise JanusError(f"data: packing needs blocks of at least one id, got {block_len}")
        self.corpus = corpus
        self.block_len = block_len
        self.num_tokens = corpus.num_tokens

    def __len__(self) -> int:
        return -(-self.num_tokens // self.block_len)

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"block {k} of {len(self)}")
        return self.corpus.token_slice(k * self.block_len, min((k + 1) * self.block_len,
                                                               self.num_tokens))

    def lengths(self) -> np.ndarray:
        """Ids per block [len(self)]: block_len everywhere but the last."""
        out = np.full(len(self), self.block_len, dtype=np.int64)
        if len(out):
            out[-1] = self.num_tokens - (len(out) - 1) * self.block_len
        return out
