"""`janus-finetune distill`: a teacher's AR outputs for a task's training sources (sequence-level
knowledge distillation, Kim & Rush 2016: the data CMLM and most NAR models are trained on).

    janus-finetune distill --task multi30k_ende --teacher runs/m30k/ar/checkpoints/best \
                           --output runs/m30k/kd
    janus-finetune prepare --task multi30k_ende --distilled runs/m30k/kd --output runs/m30k/kd_data

The non-empty training sources are sorted by length and decoded with beam search in batches,
the very batches one `Generator.generate` call over all of them makes, so every line equals the
teacher's own output for its source. Batches are grouped in chunks; after each chunk its lines are
appended to `<output>/.partial/lines.jsonl`, fsync'd, and the progress record (chunks done, bytes,
seconds) is replaced atomically, so a run interrupted at any point and rerun with the same
arguments drops a half-written chunk and goes on. At the end `<output>/targets.txt` (line i: the
output for training source i, "" for an empty source, whitespace normalised as task text is) and
then `<output>/teacher.json` (teacher, settings, its validation score, wall time) are written
atomically; teacher.json is what says the directory is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from janus_pretrain.checkpoint.atomic import sha256, write_text
from janus_pretrain.checkpoint.files import MARKER
from janus_pretrain.checkpoint.weights import resolve
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import DecodeOptions, Generator
from finetune.live_eval import first_metric
from finetune.tasks import TaskSpec, read_split

TARGETS = "targets.txt"
RECORD = "teacher.json"
PARTIAL = ".partial"


def text_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def _differences(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])


def distill(task: TaskSpec, teacher: str | Path, output: str | Path, beam: int = 5,
            batch_size: int = 64, max_pairs: Optional[int] = None, valid_size: int = 200,
            chunk_batches: int = 16, max_chunks: Optional[int] = None,
            root: Optional[str] = None) -> Optional[dict]:
    """Decode the first `max_pairs` (default all) training sources into `<output>/targets.txt`;
    -> the teacher.json record, or None when `max_chunks` chunks were decoded and some are left
    (rerun to continue)."""
    output = Path(output)
    sources, _ = read_split(task, "train", root)
    sources = sources[:max_pairs]
    ckpt = resolve(teacher)
    plan = {"task": task.name, "teacher": str(ckpt.resolve()),
            "teacher_marker_sha256": sha256(ckpt / MARKER), "beam": beam,
            "length_penalty": task.decoding.length_penalty, "max_len": task.decoding.max_len,
            "batch_size": batch_size, "chunk_batches": chunk_batches, "lines": len(sources),
            "sources_sha256": text_sha256(sources)}
    if (output / RECORD).is_file():
        record = json.loads((output / RECORD).read_text())
        if any(record.get(k) != v for k, v in plan.items()):
            raise JanusError(f"distill: {output} already holds a distillation with other settings "
                             f"({_differences(record, plan)}); choose another --output")
        print(f"distill: {output / TARGETS} is already complete", flush=True)
        return record
    partial = output / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    if (partial / "plan.json").is_file():
        old = json.loads((partial / "plan.json").read_text())
        if old != plan:
            raise JanusError(f"distill: {partial} holds an unfinished run with other settings "
                             f"({_differences(old, plan)}); rerun with its arguments, or delete "
                             f"{partial} to start over")
    else:
        write_text(partial / "plan.json", json.dumps(plan, indent=1))
    progress_file = partial / "progress.json"
    progress = (json.loads(progress_file.read_text()) if progress_file.is_file()
                else {"chunks": 0, "bytes": 0, "decode_s": 0.0})

    gen = Generator.from_checkpoint(ckpt)
    gen.check_mode("ar")
    src = gen.source_ids(sources)
    order = sorted((i for i in range(len(src)) if len(src[i]) > 2), key=lambda i: len(src[i]))
    size = batch_size * chunk_batches
    chunks = [order[s:s + size] for s in range(0, len(order), size)]
    opts = DecodeOptions(mode="ar", beam=beam, length_penalty=task.decoding.length_penalty,
                         max_len=task.decoding.max_len, batch_size=batch_size)
    first = progress["chunks"]
    lines_file = partial / "lines.jsonl"
    lines_file.touch()
    with open(lines_file, "r+b") as f, \
            tqdm(total=len(order), initial=sum(map(len, chunks[:first])), desc="distill",
                 unit="sent", dynamic_ncols=True) as bar:
        f.truncate(progress["bytes"])  # a chunk the last run did not finish
        f.seek(progress["bytes"])
        for k in range(first, len(chunks)):
            if max_chunks is not None and k - first >= max_chunks:
                print(f"distill: stopped after {max_chunks} chunk(s), {k}/{len(chunks)} done; "
                      f"rerun to continue", flush=True)
                return None
            start, rows = time.perf_counter(), []
            for b in range(0, len(chunks[k]), batch_size):
                idx = chunks[k][b:b + batch_size]
                hyps = gen.decode_ids([src[i] for i in idx], opts)
                rows += [json.dumps([i, " ".join(gen.tokenizer.decode(h.tokens).split())],
                                    ensure_ascii=False) + "\n" for i, h in zip(idx, hyps)]
                bar.update(len(idx))
            f.write("".join(rows).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            progress = {"chunks": k + 1, "bytes": f.tell(),
                        "decode_s": progress["decode_s"] + time.perf_counter() - start}
            write_text(progress_file, json.dumps(progress))

    targets = [""] * len(sources)
    for line in lines_file.read_text(encoding="utf-8").splitlines():
        i, text = json.loads(line)
        targets[i] = text
    start = time.perf_counter()
    score = None
    if valid_size > 0:
        valid_src, refs = read_split(task, "valid", root)
        score = first_metric(task, gen, valid_src[:valid_size], refs[:valid_size],
                             dict(mode="ar", beam=beam, length_penalty=task.decoding.length_penalty,
                                  batch_size=batch_size))
    record = {**plan, "targets": TARGETS, "empty_sources": len(sources) - len(order),
              "metric": task.metrics[0], "valid_size": valid_size, "valid_score": score,
              "decode_s": progress["decode_s"], "valid_s": time.perf_counter() - start}
    write_text(output / TARGETS, "".join(t + "\n" for t in targets))
    write_text(output / RECORD, json.dumps(record, indent=1))
    shutil.rmtree(partial)
    return record


def distilled_targets(task: TaskSpec, directory: str | Path, sources: list[str]) -> list[str]:
    """The targets `distill` wrote to `directory` for `sources` (the task's training sources):
    one per source of the first `lines`, checked to come from this task and these sources."""
    directory = Path(directory)
    if not (directory / RECORD).is_file():
        raise JanusError(f"prepare: {directory} holds no finished distillation ({RECORD} is "
                         f"missing); run `janus-finetune distill` to the end first")
    record = json.loads((directory / RECORD).read_text())
    n = record["lines"]
    if record["task"] != task.name:
        raise JanusError(f"prepare: {directory} was distilled for task {record['task']}, "
                         f"not {task.name}")
    if n > len(sources) or text_sha256(sources[:n]) != record["sources_sha256"]:
        raise JanusError(f"prepare: {directory} was distilled from other {task.name} training "
                         f"sources than these (another data root or version of the files?)")
    targets = (directory / record["targets"]).read_text(encoding="utf-8").split("\n")[:-1]
    if len(targets) != n:
        raise JanusError(f"prepare: {directory / record['targets']} has {len(targets)} lines, "
                         f"{RECORD} says {n}")
    return targets
