"""`janus-finetune prepare`: a task's training pairs -> two aligned token-shard corpora.

Sources and targets go through `janus-pretrain data prepare` separately, into `<out>/source/` and
`<out>/target/`; document i of one is the pair of document i of the other, which is what the
training loop reads when `data.source` is set. `data prepare` drops empty and non-UTF-8 lines,
so pairs with an empty side are dropped here first (and counted), and the two corpora are checked
to hold the same number of documents. Without a given tokenizer, one is trained on both sides of
the training pairs (a joint vocabulary, as the shared embeddings need). With `distilled`, the
targets are a teacher's outputs (`janus-finetune distill`) in place of the task's references.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from janus_pretrain.data.corpora import pair_overrides
from janus_pretrain.data.prepare import prepare
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import SentencePieceTokenizer, load_tokenizer, train_tokenizer
from finetune.tasks import TaskSpec, read_split


def prepare_pairs(task: TaskSpec, output: str | Path, tokenizer: Optional[str] = None,
                  vocab_size: int = 8000, max_pairs: Optional[int] = None, workers: int = 2,
                  root: Optional[str] = None, distilled: Optional[str | Path] = None) -> dict:
    """Write `<output>/{source,target}/` shards and the tokenizer (`<output>/tokenizer.model`,
    or `tokenizer.json` when `tokenizer` is a Hugging Face one); returns the summary also written
    to `<output>/pairs.json`. `distilled`: a `distill` output directory whose lines replace the
    targets (of the training sources it covers)."""
    if max_pairs is not None and max_pairs < 1:
        raise JanusError(f"prepare: --max-pairs must be at least 1, not {max_pairs}")
    output = Path(output)
    sources, targets = read_split(task, "train", root)
    if distilled is not None:
        from finetune.distill import distilled_targets  # imports torch, which prepare need not

        targets = distilled_targets(task, distilled, sources)
        sources = sources[:len(targets)]
    kept = [(s, t) for s, t in zip(sources, targets) if s and t][:max_pairs]
    if not kept:
        raise JanusError(f"task {task.name}: no training pair with a non-empty source and target")
    output.mkdir(parents=True, exist_ok=True)
    reused = load_tokenizer(tokenizer) if tokenizer else None
    tok_path = output / (reused or SentencePieceTokenizer).filename
    with tempfile.TemporaryDirectory(dir=output, prefix=".pairs-") as tmp:
        files = {}
        for side, texts in (("source", [s for s, _ in kept]), ("target", [t for _, t in kept])):
            files[side] = Path(tmp) / f"{side}.txt"
            files[side].write_text("".join(x + "\n" for x in texts), encoding="utf-8")
        if reused:
            tok_path.write_bytes(reused.model_bytes())
        else:
            train_tokenizer([files["source"], files["target"]], tok_path, vocab_size)
        metas = {side: prepare([str(path)], str(tok_path), output / side, workers)
                 for side, path in files.items()}
    counts = {side: meta["documents"] for side, meta in metas.items()}
    if counts["source"] != counts["target"]:
        raise JanusError(f"task {task.name}: source and target shards disagree on the number of "
                         f"pairs ({counts}); a line break or invalid UTF-8 inside an example?")
    summary = {"task": task.name, "pairs": counts["source"],
               "distilled": None if distilled is None else str(distilled),
               "dropped_empty": len(sources) - len([1 for s, t in zip(sources, targets) if s and t]),
               "tokenizer": str(tok_path), "vocab_size": load_tokenizer(tok_path).vocab_size,
               "max_source_len": task.max_source_len, "max_target_len": task.max_target_len}
    (output / "pairs.json").write_text(json.dumps(summary, indent=2))
    return summary


def data_overrides(task: TaskSpec, output: str | Path) -> list[str]:
    """The config overrides that point a run at pairs `prepare_pairs` wrote to `output`, cut at
    the task's lengths (`janus-finetune train`; `bench train --data` reads the same)."""
    output = Path(output)
    for side in ("source", "target"):
        if not (output / side / "meta.json").is_file():
            raise JanusError(f"data: {output} is not a directory written by `janus-finetune "
                             f"prepare` (no {output / side / 'meta.json'}): run `janus-finetune "
                             f"prepare --task {task.name} --output {output}` first")
    return pair_overrides(output, task.max_source_len, task.max_target_len)
