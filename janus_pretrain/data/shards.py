"""Memory-mapped token shards: `<prefix>.bin` holds the ids of all documents back to back,
`<prefix>.idx` a small header and the int64 offsets of each document (count + 1 of them).

Readers map both files and copy out one document at a time, so any number of ranks can read a
corpus of any size without loading it. Opening a shard checks that the two files agree (sizes,
offsets starting at 0, in order, ending at the token count) and that no id is outside the
vocabulary (a vectorised max over the ids, ~10 ms per 10M tokens); meta.json records each
shard's documents, tokens and largest id at prepare time, and the corpus checks those too. A
change that keeps all of this consistent (an in-range id replaced by another) goes undetected:
that would need a checksum over all the data at every start.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from janus_pretrain.errors import JanusError

MAGIC = b"JANUSIDX"
VERSION = 1
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("itemsize", "<u4")])
DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def write_shard(prefix: str | Path, docs: Iterable[Sequence[int]], dtype: type) -> dict:
    """Write documents (id sequences) to `<prefix>.bin/.idx`; returns the shard's meta.json
    entry: name, documents, tokens and max_id (-1 when it holds no token)."""
    prefix = Path(prefix)
    offsets, max_id = [0], -1
    with open(prefix.with_suffix(".bin"), "wb") as data:
        for doc in docs:
            arr = np.asarray(doc, dtype=dtype)
            data.write(arr.tobytes())
            offsets.append(offsets[-1] + len(arr))
            if len(arr):
                max_id = max(max_id, int(arr.max()))
    header = np.array([(MAGIC, VERSION, np.dtype(dtype).itemsize)], dtype=HEADER)
    with open(prefix.with_suffix(".idx"), "wb") as idx:
        idx.write(header.tobytes())
        idx.write(np.asarray(offsets, dtype=np.int64).tobytes())
    return {"name": prefix.name, "documents": len(offsets) - 1, "tokens": offsets[-1],
            "max_id": max_id}


def _max_id(path: Path, dtype: type) -> int:
    """The largest id in a .bin file (-1 if empty), read in blocks rather than through the map,
    so checking a shard does not leave all of it resident in this process."""
    largest = -1
    with open(path, "rb") as f:
        while (block := np.fromfile(f, dtype=dtype, count=1 << 22)).size:
            largest = max(largest, int(block.max()))
    return largest


class Shard:
    """One memory-mapped shard; `shard[i]` is document i as a fresh int64 array.

    With `vocab_size`, an id at or above it is an error (a corrupt file, or another tokenizer)."""

    def __init__(self, prefix: str | Path, vocab_size: Optional[int] = None):
        prefix = Path(prefix)
        idx_path, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise JanusError(f"data: shard file not found: {p}")
        header = np.fromfile(idx_path, dtype=HEADER, count=1)
        if (len(header) != 1 or header[0]["magic"] != MAGIC or header[0]["version"] != VERSION
                or header[0]["itemsize"] not in DTYPES):
            raise JanusError(f"data: {idx_path} is not a janus-pretrain shard index "
                             f"(version {VERSION})")
        self.dtype = DTYPES[int(header[0]["itemsize"])]
        if ((idx_path.stat().st_size - HEADER.itemsize) % np.dtype(np.int64).itemsize
                or bin_path.stat().st_size % np.dtype(self.dtype).itemsize):
            raise JanusError(f"data: {idx_path} or {bin_path} is truncated; re-run "
                             f"`janus-pretrain data prepare`")
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=HEADER.itemsize) if (
            idx_path.stat().st_size > HEADER.itemsize) else np.zeros(0, np.int64)
        n_tokens = bin_path.stat().st_size // np.dtype(self.dtype).itemsize
        if len(self.offsets) < 1 or self.offsets[-1] != n_tokens:
            raise JanusError(f"data: {idx_path} and {bin_path} disagree on the number of tokens "
                             f"(index says {self.offsets[-1] if len(self.offsets) else 0}, data "
                             f"holds {n_tokens}); re-run `janus-pretrain data prepare`")
        if self.offsets[0] != 0 or np.any(self.offsets[1:] < self.offsets[:-1]):
            raise JanusError(f"data: {idx_path} holds document offsets that are out of order; "
                             f"re-run `janus-pretrain data prepare`")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)
        self.max_id = _max_id(bin_path, self.dtype)
        if vocab_size is not None and self.max_id >= vocab_size:
            raise JanusError(f"data: {bin_path} holds token id {self.max_id}, outside the "
                             f"vocabulary of {vocab_size}; re-run `janus-pretrain data prepare`")
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """Ids per document [len(self)], from the index alone (no token is read)."""
        return np.diff(np.asarray(self.offsets))


class ShardedCorpus:
    """All shards of a prepared corpus, addressed by one global document index."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise JanusError(f"data: {meta_path} not found: prepare the corpus with "
                             f"`janus-pretrain data prepare`")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.vocab_size = int(self.meta["vocab_size"])
            expected = [(str(e["name"]), int(e["documents"]), int(e["tokens"]), int(e["max_id"]))
                        for e in self.meta["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise JanusError(f"data: {meta_path} is not a valid corpus description "
                             f"({type(e).__name__}: {e}); re-run `janus-pretrain data prepare`") from None
        self.shards = []
        for name, documents, tokens, max_id in expected:
            shard = Shard(directory / name, self.vocab_size)
            found = (len(shard), len(shard.tokens), shard.max_id)
            if found != (documents, tokens, max_id):
                raise JanusError(f"data: {shard.prefix}.bin/.idx hold {found[0]} documents, "
                                 f"{found[1]} tokens, max id {found[2]}, but {meta_path} recorded "
                                 f"{documents}, {tokens}, {max_id}; re-run `janus-pretrain data prepare`")
            self.shards.append(shard)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.token_starts = np.cumsum([0] + [len(s.tokens) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.shards[s][int(i - self.starts[s])]

    def lengths(self) -> np.ndarray:
        """Ids per document [len(self)], from the indexes alone."""
        return np.concatenate([s.lengths() for s in self.shards] + [np.zeros(0, np.int64)])

    @property
    def num_tokens(self) -> int:
        return int(self.token_starts[-1])

    def token_slice(self, start: int, stop: int) -> np.ndarray:
        """Ids start..stop-1 of all documents back to back (crossing shards) -> int64
        [stop - start]."""
        parts = []
        for s, shard in enumerate(self.shards):
            lo, hi = self.token_starts[s], self.token_starts[s + 1]
            if lo < stop and start < hi:
                parts.append(shard.tokens[max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(parts + [np.zeros(0, np.int64)]).astype(np.int64)
