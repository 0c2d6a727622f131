"""Memory-mapped token shards: `<prefix>.bin` holds the ids of all documents back to back,
`<prefix>.idx` a small header and the int64 offsets of each document (count + 1 of them).

Readers map both files and copy out one document at a time, so any number of ranks can read a
corpus of any size without loading it. Opening a corpus reads meta.json and two offsets per
shard, never the token payload: prepare recorded each shard's documents, tokens, largest id and
the sha256 of both files, and opening checks the files' sizes against them (a stat), so the
start of a run costs the same at 1e5 documents as at 1e9. What a size check cannot see (a
changed byte) is found by `janus-pretrain data verify` (`verify_corpus`: checksums, offsets in
order, the largest id), run once after a prepare or a copy; reading a document still checks its
own offsets and ids, so a corrupt byte that reaches training fails there in one line rather than
as an out-of-range index on a device.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from janus_pretrain.errors import JanusError

MAGIC = b"JANUSIDX"
VERSION = 1
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("itemsize", "<u4")])
DTYPES = {2: np.uint16, 4: np.uint32}
REPAIR = "re-run `janus-pretrain data prepare`"


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class ShardWriter:
    """Writes `<prefix>.bin/.idx` from batches of documents, hashing and taking the largest id
    as it goes; the files have temporary names (`.bin.tmp`, `.idx.tmp`) until `close` renames
    them into place, so a killed writer never leaves a shard that looks finished."""

    def __init__(self, prefix: str | Path, dtype: type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.tmp = {k: self.prefix.with_suffix(f".{k}.tmp") for k in ("bin", "idx")}
        self.files = {k: open(p, "wb") for k, p in self.tmp.items()}
        self.hashes = {k: hashlib.sha256() for k in self.files}
        self.documents, self.tokens, self.max_id = 0, 0, -1
        header = np.array([(MAGIC, VERSION, self.dtype.itemsize)], dtype=HEADER)
        self._write("idx", header.tobytes() + np.zeros(1, np.int64).tobytes())

    def _write(self, kind: str, data: bytes) -> None:
        self.files[kind].write(data)
        self.hashes[kind].update(data)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given back to back: `ids` [sum(lengths)] in the shard's dtype, `lengths`
        [documents]."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self._write("bin", ids.tobytes())
        offsets = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._write("idx", offsets.tobytes())
        self.documents += len(lengths)
        self.tokens += len(ids)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> dict:
        """Rename the files into place; returns the shard's meta.json entry."""
        for f in self.files.values():
            f.close()
        for kind, tmp in self.tmp.items():
            os.replace(tmp, self.prefix.with_suffix(f".{kind}"))
        return {"name": self.prefix.name, "documents": self.documents, "tokens": self.tokens,
                "max_id": self.max_id,
                "sha256": {k: h.hexdigest() for k, h in self.hashes.items()}}

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def write_shard(prefix: str | Path, docs: Iterable[Sequence[int]], dtype: type) -> dict:
    """Write documents (id sequences) to `<prefix>.bin/.idx`; returns the shard's meta.json
    entry: name, documents, tokens, max_id (-1 when it holds no token) and sha256 of each file."""
    writer = ShardWriter(prefix, dtype)
    try:
        for doc in docs:
            arr = np.asarray(doc, dtype=dtype)
            writer.add(arr, np.array([len(arr)], dtype=np.int64))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


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

    Opening reads the header and the first and last offsets only. With `vocab_size`, reading a
    document with an id at or above it is an error (a corrupt file, or another tokenizer)."""

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
            raise JanusError(f"data: {idx_path} or {bin_path} is truncated; {REPAIR}")
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=HEADER.itemsize) if (
            idx_path.stat().st_size > HEADER.itemsize) else np.zeros(0, np.int64)
        n_tokens = bin_path.stat().st_size // np.dtype(self.dtype).itemsize
        if len(self.offsets) < 1 or self.offsets[-1] != n_tokens:
            raise JanusError(f"data: {idx_path} and {bin_path} disagree on the number of tokens "
                             f"(index says {self.offsets[-1] if len(self.offsets) else 0}, data "
                             f"holds {n_tokens}); {REPAIR}")
        if self.offsets[0] != 0:
            raise JanusError(f"data: {idx_path} does not start at offset 0; {REPAIR}")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)
        self.vocab_size = vocab_size
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if not 0 <= start <= stop <= len(self.tokens):
            raise JanusError(f"data: {self.prefix}.idx holds document offsets out of order at "
                             f"document {i}; run `janus-pretrain data verify`")
        doc = np.array(self.tokens[start:stop], dtype=np.int64)
        if self.vocab_size is not None and len(doc) and doc.max() >= self.vocab_size:
            raise JanusError(f"data: {self.prefix}.bin holds token id {int(doc.max())} in document "
                             f"{i}, outside the vocabulary of {self.vocab_size}; run "
                             f"`janus-pretrain data verify`")
        return doc

    def lengths(self) -> np.ndarray:
        """Ids per document [len(self)], from the index alone (no token is read)."""
        return np.diff(np.asarray(self.offsets))

    @property
    def max_id(self) -> int:
        """The largest id in the payload (-1 if none): reads all of it."""
        return _max_id(self.prefix.with_suffix(".bin"), self.dtype)


class ShardedCorpus:
    """All shards of a prepared corpus, addressed by one global document index. Opening it reads
    meta.json and the shards' headers (see the module docstring), not their payload."""

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
        self.directory, self.meta_path = directory, meta_path
        self.shards = []
        for name, documents, tokens, max_id in expected:
            shard = Shard(directory / name, self.vocab_size)
            if (len(shard), len(shard.tokens)) != (documents, tokens):
                raise JanusError(f"data: {shard.prefix}.bin/.idx hold {len(shard)} documents, "
                                 f"{len(shard.tokens)} tokens, but {meta_path} recorded "
                                 f"{documents}, {tokens}; {REPAIR}")
            if max_id >= self.vocab_size:
                raise JanusError(f"data: {meta_path} records token id {max_id} in {name}.bin, "
                                 f"outside the vocabulary of {self.vocab_size}; {REPAIR}")
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

    def token_start(self, d: int) -> int:
        """Offset of document d's first id in all documents back to back (d = len(self): the
        total); reads one offset."""
        s = min(int(np.searchsorted(self.starts, d, side="right")) - 1, len(self.shards) - 1)
        return int(self.token_starts[s] + self.shards[s].offsets[d - self.starts[s]])

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

    @property
    def identity(self) -> str:
        """sha256 of what meta.json records about the shards (their checksums among it): names
        this corpus in the keys of cached epoch plans."""
        return hashlib.sha256(json.dumps([self.meta["shards"], self.vocab_size],
                                         sort_keys=True).encode()).hexdigest()


def verify_corpus(directory: str | Path) -> dict:
    """`janus-pretrain data verify`: every shard's files against the sha256 meta.json records,
    its offsets in order and its largest id as recorded; the first disagreement is a JanusError
    naming the file. Returns meta.json's contents."""
    corpus = ShardedCorpus(directory)
    for entry, shard in zip(corpus.meta["shards"], corpus.shards):
        recorded = entry.get("sha256")
        if recorded is None:
            raise JanusError(f"data: {corpus.meta_path} records no checksums for {entry['name']} "
                             f"(prepared by an older version); {REPAIR}")
        for kind in ("idx", "bin"):
            path = shard.prefix.with_suffix(f".{kind}")
            if file_sha256(path) != recorded[kind]:
                raise JanusError(f"data: {path} does not match the sha256 in {corpus.meta_path}: "
                                 f"the file changed after prepare; {REPAIR}")
        offsets = np.asarray(shard.offsets)
        if np.any(offsets[1:] < offsets[:-1]):
            raise JanusError(f"data: {shard.prefix}.idx holds document offsets that are out of "
                             f"order; {REPAIR}")
        if shard.max_id != int(entry["max_id"]):
            raise JanusError(f"data: {shard.prefix}.bin holds largest id {shard.max_id}, "
                             f"{corpus.meta_path} records {entry['max_id']}; {REPAIR}")
    return corpus.meta
