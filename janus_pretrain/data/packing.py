"""Pretraining blocks: the corpus's documents back to back, each followed by a separator ([EOS]),
cut into blocks of `block_len` ids.

BART pretrains on full blocks rather than on documents, so that a batch of short paragraphs is
not mostly padding. The stream is doc 0, [EOS], doc 1, [EOS], ...: the separator marks where one
article ends and the next begins (fairseq's TokenBlockDataset keeps document breaks, and BART's
own data ends every document with </s>), and the denoising noise never spans it
(objectives/noise.py). Block k holds stream positions k*block_len .. (k+1)*block_len - 1 (the
last block may be shorter), so every id of the corpus is in exactly one block and a document may
continue into the next block. The blocks are fixed; the loader shuffles them. A block is found
by a binary search over the documents' token offsets (the corpus's memory-mapped index), so no
table of blocks is built or held.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from typing import Optional

import numpy as np

from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import EOS


class PackedCorpus:
    """`blocks[k]` is block k as int64 [<= block_len]; reads only that block's ids from `corpus`
    (a ShardedCorpus, or anything with `len`, `num_tokens`, `token_start(d)`: the offset of
    document d's first id, and `token_slice(start, stop)`)."""

    def __init__(self, corpus, block_len: int, separator: int = EOS):
        if block_len < 1:
            raise JanusError(f"data: packing needs blocks of at least one id, got {block_len}")
        self.corpus = corpus
        self.block_len = block_len
        self.separator = separator
        self.num_tokens = corpus.num_tokens + len(corpus)  # each document's ids and separator
        self._documents = range(len(corpus))

    def __len__(self) -> int:
        return -(-self.num_tokens // self.block_len)

    def _stream_start(self, d: int) -> int:
        """Where document d starts in the stream: its ids' offset plus the d separators before."""
        return self.corpus.token_start(d) + d

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"block {k} of {len(self)}")
        start, stop = k * self.block_len, min((k + 1) * self.block_len, self.num_tokens)
        d = bisect.bisect_right(self._documents, start, key=self._stream_start) - 1
        parts, pos = [], start
        while pos < stop:
            first, end = self.corpus.token_start(d), self.corpus.token_start(d + 1)
            sep = self._stream_start(d) + end - first  # the separator's stream position
            if pos < sep:
                offset = first - self._stream_start(d)
                parts.append(self.corpus.token_slice(pos + offset, min(stop, sep) + offset))
                pos = min(stop, sep)
            if pos == sep < stop:
                parts.append(np.array([self.separator], dtype=np.int64))
                pos += 1
            d += 1
        return np.concatenate(parts).astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Ids per block [len(self)]: block_len everywhere but the last."""
        out = np.full(len(self), self.block_len, dtype=np.int64)
        if len(out):
            out[-1] = self.num_tokens - (len(out) - 1) * self.block_len
        return out

    @property
    def identity(self) -> Optional[str]:
        corpus = getattr(self.corpus, "identity", None)
        if corpus is None:
            return None
        key = [corpus, self.block_len, self.separator]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()
