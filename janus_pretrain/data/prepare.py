"""`janus-pretrain data prepare`: corpus -> tokenized, memory-mapped shards.

Corpora come through HF `datasets`: local text (one document a line), jsonl or parquet files, or a
hub dataset name where the cluster has network. Tokenization runs in `num_workers` processes
(`datasets.map(num_proc=...)`); the shards are then written one per worker-sized slice, with a
meta.json that records the tokenizer they were made with (its file's sha256 and its identity, a
hash of its pieces that training checks) and each shard's size and largest id.

Raw text is decoded with invalid UTF-8 replaced by U+FFFD, so a bad byte never stops a long
prepare; documents that are empty or hold U+FFFD (a line that was not UTF-8) are skipped and
counted in meta.json's `skipped`.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Sequence

import datasets

from janus_pretrain import disk_space
from janus_pretrain.data.shards import token_dtype, write_shard
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import load_tokenizer

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_worker_tokenizer = {}


def _tokenize(batch: dict, tokenizer_path: str, field: str) -> dict:
    tok = _worker_tokenizer.get(tokenizer_path)
    if tok is None:
        tok = _worker_tokenizer[tokenizer_path] = load_tokenizer(tokenizer_path)
    return {"ids": tok.encode([t.strip() for t in batch[field]])}


def _not_empty(text) -> bool:
    return bool(text and text.strip())


def _valid_text(text: str) -> bool:
    return "\ufffd" not in text


def load_corpus(inputs: Sequence[str], field: str, cache_dir: str) -> datasets.Dataset:
    """Local files (all of one format) or a single hub dataset name -> a `datasets.Dataset`."""
    local = [Path(p) for p in inputs if Path(p).exists()]
    if local and len(local) != len(inputs):
        missing = next(p for p in inputs if not Path(p).exists())
        raise JanusError(f"data: input file not found: {missing}")
    if local:
        kinds = {FORMATS.get(p.suffix) for p in local}
        if None in kinds or len(kinds) != 1:
            raise JanusError(f"data: inputs must all be one of {', '.join(sorted(FORMATS))}: "
                             f"got {', '.join(p.name for p in local)}")
        builder = kinds.pop()
        if all(p.stat().st_size == 0 for p in local):
            raise JanusError(f"data: {', '.join(map(str, local))}: empty, nothing to prepare")
        options = {"encoding_errors": "replace"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in local], split="train",
                                       cache_dir=cache_dir, **options)
        except Exception as e:  # noqa: BLE001 - arrow and json readers raise many types
            root = e.__cause__ or e  # datasets wraps the reader's error
            if disk_space.is_full(root, cache_dir):  # its cache, not the input (cli.py says so)
                raise root from None
            detail = (str(root).splitlines() or [""])[0]
            raise JanusError(f"data: cannot read {', '.join(map(str, local))} as {builder} "
                             f"({type(root).__name__}: {detail})") from None
    else:
        if len(inputs) != 1:
            raise JanusError(f"data: input file not found: {inputs[0]}")
        try:
            ds = datasets.load_dataset(inputs[0], split="train", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise JanusError(f"data: input file not found and not loadable as a hub dataset: "
                             f"{inputs[0]} ({type(e).__name__})") from None
    if field not in ds.column_names:
        raise JanusError(f"data: field '{field}' not in corpus columns {ds.column_names}")
    return ds


def prepare(inputs: Sequence[str], tokenizer: str, output: str | Path, num_workers: int = 2,
            field: str = "text", max_docs: int | None = None) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the written meta.json contents."""
    tok = load_tokenizer(tokenizer)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    with tempfile.TemporaryDirectory(dir=output, prefix=".hf-cache-") as cache:
        ds = load_corpus(inputs, field, cache)
        skipped = {}
        for reason, keep in (("empty", _not_empty), ("invalid_utf8", _valid_text)):
            before = len(ds)
            ds = ds.filter(lambda b, keep=keep: [keep(t) for t in b[field]], batched=True,
                           num_proc=num_workers)
            skipped[reason] = before - len(ds)
        if max_docs is not None:
            ds = ds.select(range(min(max_docs, len(ds))))
        ds = ds.map(_tokenize, batched=True, num_proc=num_workers, remove_columns=ds.column_names,
                    fn_kwargs={"tokenizer_path": str(tok.path), "field": field})
        num_shards = max(1, min(num_workers, len(ds)))
        shards = [write_shard(output / f"shard_{i:05d}",
                              (row["ids"] for row in ds.shard(num_shards, i, contiguous=True)), dtype)
                  for i in range(num_shards)]
    (output / tok.filename).write_bytes(tok.model_bytes())
    meta = {"shards": shards, "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards), "vocab_size": tok.vocab_size,
            "tokenizer_sha256": hashlib.sha256(tok.model_bytes()).hexdigest(),
            "tokenizer_identity": tok.identity,
            "skipped": skipped, "inputs": [str(p) for p in inputs]}
    (output / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def files_in(output: str | Path) -> dict[str, int]:
    """{name: mtime in ns} of the files in `output` (nothing if it does not exist yet)."""
    return {p.name: p.stat().st_mtime_ns for p in Path(output).glob("*") if p.is_file()}


def written_since(output: str | Path, before: dict[str, int]) -> list[Path]:
    """The files of `output` that are new or changed since `before` = files_in(output): what a
    failed prepare (a full disk) removes, so nothing half-written is taken for data."""
    return [Path(output) / name for name, mtime in files_in(output).items()
            if before.get(name) != mtime]
