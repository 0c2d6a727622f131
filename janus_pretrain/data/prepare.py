"""`janus-pretrain data prepare`: corpus -> tokenized, memory-mapped shards, in parallel, on one
node or split across many, resumable.

The corpus is cut into tasks once, recorded in `<output>/.prepare/plan.json`: byte ranges of
local text or jsonl files (a range owns the lines that start in it), row groups of parquet files,
index ranges of a hub dataset. Each task is one shard, written by one worker straight to
`.bin/.idx` (ShardWriter: ids in the shard's dtype, never a list of int64 or an Arrow copy of
them); local files are read directly, so the only Arrow step left is a hub dataset's own cache.
A finished task leaves `.prepare/<shard>.json` (the shard's meta.json entry and its skipped
lines); a rerun keeps finished shards and does the rest, and removes the partial files
(`*.tmp`, at most one per worker) that a killed run left. `--partition i/N` does the i-th of N
contiguous slices of the tasks, so N nodes sharing the output directory split one corpus
(Megatron-LM's preprocess_data.py --partitions); whichever prepare finds every task finished
writes meta.json, and `janus-pretrain data merge` does the same after the fact.

Documents are lines (text: one document a line; jsonl: `field` of each line's object), split on
"\\n" only. Raw text is decoded with invalid UTF-8 replaced by U+FFFD, so a bad byte never stops
a long prepare; documents that are empty or hold U+FFFD (a line that was not UTF-8) are skipped
and counted in meta.json's `skipped`. meta.json records the tokenizer (its file's sha256 and its
identity, a hash of its pieces that training checks) and each shard's size, largest id and
sha256 (data/shards.py).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from janus_pretrain.data.shards import HEADER, Shard, ShardWriter, file_sha256, token_dtype
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import load_tokenizer

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHARD_BYTES = 256 * 2**20  # text per task (and shard) unless more tasks are needed for the workers
BLOCK_BYTES = 8 * 2**20  # text a worker decodes and tokenizes at a time
STATE = ".prepare"


@dataclass(frozen=True)
class Task:
    """One shard's worth of input: bytes [start, end) of a local file (the lines starting there),
    parquet row group `start`, or hub dataset rows [start, end)."""

    index: int
    source: str
    kind: str  # text | json | parquet | hub
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}"


# --- the plan -----------------------------------------------------------------------------------

def _local_kind(local: list[Path]) -> str:
    kinds = {FORMATS.get(p.suffix) for p in local}
    if None in kinds or len(kinds) != 1:
        raise JanusError(f"data: inputs must all be one of {', '.join(sorted(FORMATS))}: "
                         f"got {', '.join(p.name for p in local)}")
    return kinds.pop()


def _byte_tasks(local: list[Path], kind: str, count: int) -> list[tuple]:
    """About `count` ranges of about equal bytes over the files, none spanning two files."""
    sizes = [p.stat().st_size for p in local]
    chunk = max(1, math.ceil(sum(sizes) / count))
    tasks = []
    for path, size in zip(local, sizes):
        pieces = math.ceil(size / chunk)
        bounds = [size * k // pieces for k in range(pieces + 1)]
        tasks += [(str(path), kind, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return tasks


def _parquet_tasks(local: list[Path]) -> list[tuple]:
    import pyarrow.parquet as pq

    tasks = []
    for path in local:
        try:
            groups = pq.ParquetFile(path).metadata.num_row_groups
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise JanusError(f"data: cannot read {path} as parquet ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
        tasks += [(str(path), "parquet", g, g + 1) for g in range(groups)]
    return tasks


def _hub_dataset(name: str, cache_dir: Path):
    import datasets

    try:
        return datasets.load_dataset(name, split="train", cache_dir=str(cache_dir))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise JanusError(f"data: input file not found and not loadable as a hub dataset: "
                         f"{name} ({type(e).__name__})") from None


def plan_tasks(inputs: Sequence[str], output: Path, count: int, field: str) -> list[Task]:
    """The corpus cut into about `count` tasks (text, jsonl), one per row group (parquet) or
    `count` row ranges (a hub dataset)."""
    local = [Path(p) for p in inputs if Path(p).exists()]
    if local and len(local) != len(inputs):
        missing = next(p for p in inputs if not Path(p).exists())
        raise JanusError(f"data: input file not found: {missing}")
    if local:
        kind = _local_kind(local)
        if all(p.stat().st_size == 0 for p in local):
            raise JanusError(f"data: {', '.join(map(str, local))}: empty, nothing to prepare")
        raw = _parquet_tasks(local) if kind == "parquet" else _byte_tasks(local, kind, count)
    else:
        if len(inputs) != 1:
            raise JanusError(f"data: input file not found: {inputs[0]}")
        rows = len(_hub_dataset(inputs[0], output / STATE / "hf-cache"))
        bounds = [rows * k // count for k in range(count + 1)]
        raw = [(inputs[0], "hub", a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return [Task(i, *t) for i, t in enumerate(raw)]


def _fingerprint(inputs: Sequence[str], tok, field: str, max_docs: Optional[int]) -> dict:
    """What a plan's shards depend on: a rerun with other inputs or tokenizer starts anew."""
    files = [[str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] if Path(p).exists()
             else [p] for p in inputs]
    return {"inputs": files, "tokenizer_identity": tok.identity, "field": field,
            "max_docs": max_docs}


# --- one task -----------------------------------------------------------------------------------

_worker_tokenizer = {}


def _byte_lines(task: Task):
    """Blocks of the lines that start in bytes [start, end) of a file, as str (invalid UTF-8
    replaced); each block ends at a line end."""
    with open(task.source, "rb") as f:
        def line_start(pos: int) -> int:
            if pos == 0:
                return 0
            f.seek(pos - 1)
            f.readline()
            return f.tell()

        start, end = line_start(task.start), line_start(task.end)
        f.seek(start)
        left, carry = end - start, b""
        while left > 0:
            data = f.read(min(BLOCK_BYTES, left))
            left = left - len(data) if data else 0  # a file that shrank ends the task
            block = carry + data
            cut = block.rfind(b"\n") + 1 if left else len(block)
            block, carry = block[:cut], block[cut:]
            if block:  # else one line longer than a block: read on
                lines = block.decode("utf-8", errors="replace").split("\n")
                yield lines[:-1] if block.endswith(b"\n") else lines


def _json_texts(task: Task, lines: list[str], field: str) -> list:
    texts = []
    for line in lines:
        if not line.strip():
            texts.append("")
            continue
        try:
            texts.append(json.loads(line)[field])
        except (ValueError, TypeError) as e:
            raise JanusError(f"data: cannot read {task.source} as json ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None
        except KeyError:
            raise JanusError(f"data: field '{field}' not in a record of {task.source}") from None
    return texts


def _text_blocks(task: Task, field: str):
    """The task's documents as blocks of strings (None or "" for an empty one)."""
    if task.kind in ("text", "json"):
        for lines in _byte_lines(task):
            yield lines if task.kind == "text" else _json_texts(task, lines, field)
    elif task.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(task.source).read_row_group(task.start)
        if field not in table.column_names:
            raise JanusError(f"data: field '{field}' not in corpus columns {table.column_names}")
        yield table.column(field).to_pylist()
    else:
        ds = _HUB[task.source]
        if field not in ds.column_names:
            raise JanusError(f"data: field '{field}' not in corpus columns {ds.column_names}")
        for a in range(task.start, task.end, 10_000):
            yield ds[a:min(a + 10_000, task.end)][field]


_HUB: dict = {}  # hub datasets, opened before the workers fork


def run_task(task: Task, output: Path, tokenizer_path: str, field: str,
             max_docs: Optional[int]) -> dict:
    """Tokenize one task into `<output>/<task.name>.bin/.idx`; returns its state record."""
    tok = _worker_tokenizer.get(tokenizer_path)
    if tok is None:
        if multiprocessing.parent_process() is not None:  # a pool worker: one core each
            os.environ["RAYON_NUM_THREADS"] = "1"  # (Hugging Face tokenizers' thread pool)
        tok = _worker_tokenizer[tokenizer_path] = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    writer = ShardWriter(output / task.name, dtype)
    skipped = {"empty": 0, "invalid_utf8": 0}
    try:
        for texts in _text_blocks(task, field):
            docs = []
            for text in texts:
                text = text.strip() if isinstance(text, str) else ""
                if not text:
                    skipped["empty"] += 1
                elif "\ufffd" in text:
                    skipped["invalid_utf8"] += 1
                else:
                    docs.append(text)
            if max_docs is not None:
                docs = docs[:max_docs - writer.documents]
            ids = tok.encode_arrays(docs)
            writer.add(np.concatenate(ids + [np.zeros(0, dtype)]).astype(dtype, copy=False),
                       np.fromiter(map(len, ids), np.int64, len(ids)))
            if max_docs is not None and writer.documents >= max_docs:
                break
    except BaseException:
        writer.abort()
        raise
    record = {"shard": writer.close(), "skipped": skipped, "task": asdict(task)}
    _write_atomic(output / STATE / f"{task.name}.json", record)
    return record


def _run_task(args):
    return run_task(*args)


# --- the whole prepare ----------------------------------------------------------------------------

def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _remove_partial(output: Path, tasks: list[Task]) -> None:
    """Files a killed prepare of these tasks left half-written (ShardWriter's and
    _write_atomic's .tmp); other partitions' files, perhaps being written now, stay."""
    for t in tasks:
        for p in itertools.chain(output.glob(f"{t.name}.*.tmp"),
                                 (output / STATE).glob(f"{t.name}.json.*.tmp")):
            p.unlink(missing_ok=True)


def parse_partition(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise JanusError(f"data: --partition {text}: expected i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise JanusError(f"data: --partition {text}: needs 0 <= i < N")
    return i, n


def prepare(inputs: Sequence[str], tokenizer: str, output: str | Path, num_workers: int = 2,
            field: str = "text", max_docs: Optional[int] = None,
            partition: tuple[int, int] = (0, 1), shard_bytes: int = SHARD_BYTES) -> Optional[dict]:
    """Tokenize `inputs` (this partition's tasks of them) into shards under `output`; returns
    meta.json's contents once every task of the corpus is finished, else None."""
    tok = load_tokenizer(tokenizer)
    output = Path(output)
    (output / STATE).mkdir(parents=True, exist_ok=True)
    plan_path = output / STATE / "plan.json"
    fingerprint = _fingerprint(inputs, tok, field, max_docs)
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if plan is not None and plan["fingerprint"] != fingerprint and not any(
            (output / STATE).glob("shard_*.json")):
        plan = None  # nothing of it was finished (a first attempt that failed): plan anew
    if plan is not None and plan["fingerprint"] != fingerprint:
        raise JanusError(f"data: {output} holds a prepare of other inputs, tokenizer, "
                         f"field or max_docs ({plan_path}); remove it or choose another --output")
    if plan is None:
        total = sum(Path(p).stat().st_size for p in inputs if Path(p).exists())
        count = max(math.ceil(total / shard_bytes), num_workers * partition[1], 1)
        tasks = plan_tasks(inputs, output, count, field)
        plan = {"fingerprint": fingerprint, "tasks": [asdict(t) for t in tasks]}
        _write_atomic(plan_path, plan)
    tasks = [Task(**t) for t in plan["tasks"]]
    if any(t.kind == "hub" for t in tasks) and inputs[0] not in _HUB:
        _HUB[inputs[0]] = _hub_dataset(inputs[0], output / STATE / "hf-cache")
    i, n = partition
    mine = tasks[len(tasks) * i // n:len(tasks) * (i + 1) // n]
    _remove_partial(output, mine)
    todo = [t for t in mine if not (output / STATE / f"{t.name}.json").is_file()]
    args = [(t, output, str(tok.path), field, max_docs) for t in todo]
    if num_workers <= 1 or len(todo) <= 1:
        for a in args:
            run_task(*a)
    else:
        with multiprocessing.get_context("fork").Pool(min(num_workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_run_task, args):
                pass
    (output / tok.filename).write_bytes(tok.model_bytes())
    if not all((output / STATE / f"{t.name}.json").is_file() for t in tasks):
        return None
    shutil.rmtree(output / STATE / "hf-cache", ignore_errors=True)
    return merge(output)


def _truncate(directory: Path, entry: dict, documents: int) -> dict:
    """Keep a shard's first `documents` documents (max_docs reached inside it)."""
    shard = Shard(directory / entry["name"])
    tokens, dtype = int(shard.offsets[documents]), shard.dtype
    del shard
    os.truncate(directory / f"{entry['name']}.idx", HEADER.itemsize + 8 * (documents + 1))
    os.truncate(directory / f"{entry['name']}.bin", tokens * np.dtype(dtype).itemsize)
    ids = np.fromfile(directory / f"{entry['name']}.bin", dtype=dtype)
    return {**entry, "documents": documents, "tokens": tokens,
            "max_id": int(ids.max()) if len(ids) else -1,
            "sha256": {k: file_sha256(directory / f"{entry['name']}.{k}") for k in ("bin", "idx")}}


def gather(output: Path, parts: Sequence[str | Path]) -> None:
    """Move the finished shards of partitions prepared into other directories (node-local
    disks) into `output`; every directory must hold the same plan (same inputs, tokenizer,
    --workers and number of partitions)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / STATE).mkdir(exist_ok=True)
    for part in map(Path, parts):
        plan_path = part / STATE / "plan.json"
        if not plan_path.is_file():
            raise JanusError(f"data: {plan_path} not found: {part} holds no prepared partition")
        ours = output / STATE / "plan.json"
        if not ours.is_file():
            shutil.copy(plan_path, ours)
        elif json.loads(ours.read_text()) != json.loads(plan_path.read_text()):
            raise JanusError(f"data: {part} was prepared with another plan than {output} (other "
                             f"inputs, tokenizer, --workers or partitions)")
        for done in (part / STATE).glob("shard_*.json"):
            name = done.stem
            for suffix in (".bin", ".idx"):
                shutil.move(part / f"{name}{suffix}", output / f"{name}{suffix}")
            shutil.move(done, output / STATE / done.name)  # last: the shard is complete
        for tokenizer in part.glob("tokenizer.*"):
            shutil.copy(tokenizer, output / tokenizer.name)


def merge(output: str | Path, parts: Sequence[str | Path] = ()) -> dict:
    """`janus-pretrain data merge`: once every task of the plan is finished (by any number of
    partitions sharing `output`, or prepared into the directories `parts` and moved here
    first), write meta.json; returns its contents."""
    output = Path(output)
    if parts:
        gather(output, parts)
    plan_path = output / STATE / "plan.json"
    if not plan_path.is_file():
        raise JanusError(f"data: {plan_path} not found: nothing was prepared into {output}")
    plan = json.loads(plan_path.read_text())
    tasks = [Task(**t) for t in plan["tasks"]]
    missing = [t.name for t in tasks if not (output / STATE / f"{t.name}.json").is_file()]
    if missing:
        raise JanusError(f"data: {len(missing)} of {len(tasks)} shards of {output} are not "
                         f"prepared yet (first: {missing[0]}); run the partitions that hold them")
    records = [json.loads((output / STATE / f"{t.name}.json").read_text()) for t in tasks]
    tok = load_tokenizer(output)
    max_docs, shards, documents = plan["fingerprint"]["max_docs"], [], 0
    for record in records:
        entry = record["shard"]
        if max_docs is not None and documents + entry["documents"] > max_docs:
            entry = _truncate(output, entry, max_docs - documents)
        documents += entry["documents"]
        shards.append(entry)
    skipped = {k: sum(r["skipped"][k] for r in records) for k in ("empty", "invalid_utf8")}
    meta = {"shards": shards, "documents": documents, "tokens": sum(s["tokens"] for s in shards),
            "vocab_size": tok.vocab_size,
            "tokenizer_sha256": hashlib.sha256(tok.model_bytes()).hexdigest(),
            "tokenizer_identity": tok.identity, "skipped": skipped,
            "inputs": [f[0] for f in plan["fingerprint"]["inputs"]]}
    _write_atomic(output / "meta.json", meta)
    return meta


def files_in(output: str | Path) -> dict[str, int]:
    """{name: mtime in ns} of the files in `output` (nothing if it does not exist yet)."""
    return {p.name: p.stat().st_mtime_ns for p in Path(output).glob("*") if p.is_file()}


def written_since(output: str | Path, before: dict[str, int]) -> list[Path]:
    """The files of `output` that are new or changed since `before` = files_in(output): what a
    failed prepare (a full disk) removes, so nothing half-written is taken for data."""
    return [Path(output) / name for name, mtime in files_in(output).items()
            if before.get(name) != mtime]
