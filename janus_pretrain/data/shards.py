"""Memory-mapped token shards: `<prefix>.bin` holds the ids of all documents back to back,
`<prefix>.idx` a small header and the int64 offsets of each document (count + 1 of them).

Readers map both files and copy out one document at a time, so any number of ranks can read a
corpus of any size without loading it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from janus_pretrain.errors import JanusError

MAGIC = b"JANUSIDX"
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("itemsize", "<u4")])
DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def write_shard(prefix: str | Path, docs: Iterable[Sequence[int]], dtype: type) -> tuple[int, int]:
    """Write documents (id sequences) to `<prefix>.bin/.idx`; returns (documents, tokens)."""
    prefix = Path(prefix)
    offsets = [0]
    with open(prefix.with_suffix(".bin"), "wb") as data:
        for doc in docs:
            arr = np.asarray(doc, dtype=dtype)
            data.write(arr.tobytes())
            offsets.append(offsets[-1] + len(arr))
    header = np.array([(MAGIC, 1, np.dtype(dtype).itemsize)], dtype=HEADER)
    with open(prefix.with_suffix(".idx"), "wb") as idx:
        idx.write(header.tobytes())
        idx.write(np.asarray(offsets, dtype=np.int64).tobytes())
    return len(offsets) - 1, offsets[-1]


class Shard:
    """One memory-mapped shard; `shard[i]` is document i as a fresh int64 array."""

    def __init__(self, prefix: str | Path):
        prefix = Path(prefix)
        idx_path, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise JanusError(f"data: shard file not found: {p}")
        header = np.fromfile(idx_path, dtype=HEADER, count=1)
        if len(header) != 1 or header[0]["magic"] != MAGIC or header[0]["itemsize"] not in DTYPES:
            raise JanusError(f"data: {idx_path} is not a janus-pretrain shard index")
        self.dtype = DTYPES[int(header[0]["itemsize"])]
        if ((idx_path.stat().st_size - HEADER.itemsize) % np.dtype(np.int64).itemsize
                or bin_path.stat().st_size % np.dtype(self.dtype).itemsize):
            raise JanusError(f"data: {idx_path} or {bin_path} is truncated; re-run "
                             f"`janus-pretrain data prepare`")
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=HEADER.itemsize)
        n_tokens = bin_path.stat().st_size // np.dtype(self.dtype).itemsize
        if len(self.offsets) < 1 or self.offsets[-1] != n_tokens:
            raise JanusError(f"data: {idx_path} and {bin_path} disagree on the number of tokens "
                             f"(index says {self.offsets[-1] if len(self.offsets) else 0}, data "
                             f"holds {n_tokens}); re-run `janus-pretrain data prepare`")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)


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
            names, self.vocab_size = self.meta["shards"], int(self.meta["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise JanusError(f"data: {meta_path} is not a valid corpus description "
                             f"({type(e).__name__}: {e}); re-run `janus-pretrain data prepare`") from None
        self.shards = [Shard(directory / name) for name in names]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.shards[s][int(i - self.starts[s])]
