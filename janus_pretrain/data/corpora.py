"""Opening what a run reads: target shards checked against the run's tokenizer, the aligned
source shards of fine-tuning, and the validation loader."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from janus_pretrain.config import RunConfig
from janus_pretrain.data.blend import BlendedCorpus, open_blend
from janus_pretrain.data.loader import BatchLoader, build_loader
from janus_pretrain.data.shards import ShardedCorpus
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import Tokenizer


def open_corpus(path: str, tokenizer: Tokenizer) -> ShardedCorpus:
    """Shards whose ids were made by another tokenizer are refused, even one of the same size;
    shards prepared before meta.json recorded `tokenizer_identity` are checked by size only."""
    corpus = ShardedCorpus(path)
    if corpus.vocab_size != tokenizer.vocab_size:
        raise JanusError(f"data: {path} was tokenized with a vocabulary of "
                         f"{corpus.vocab_size}, data.tokenizer has {tokenizer.vocab_size}")
    recorded = corpus.meta.get("tokenizer_identity")
    if recorded is not None and recorded != tokenizer.identity:
        raise JanusError(f"data: {path} was tokenized with {Path(path) / 'tokenizer.model'}, "
                         f"not data.tokenizer={tokenizer.path}: same size, different pieces")
    return corpus


def open_train(value, tokenizer: Tokenizer):
    """data.train: one corpus, or several blended by weight (data/blend.py), each checked
    against the run's tokenizer."""
    corpus = open_blend(value, lambda path: open_corpus(path, tokenizer))
    if isinstance(corpus, BlendedCorpus) and int(os.environ.get("RANK", "0")) == 0:
        print(f"data: blend of {len(corpus.members)} corpora: {corpus.describe()}")
    return corpus


def open_sources(source: Optional[str], tokenizer: Tokenizer, targets: ShardedCorpus,
                 names: tuple[str, str] = ("data.source", "data.train")) -> Optional[ShardedCorpus]:
    """Fine-tuning: the source shards aligned with the target shards; None when pretraining."""
    if source is None:
        return None
    if isinstance(targets, BlendedCorpus):
        raise JanusError(f"data.train: a blend of corpora is for pretraining; {names[0]} "
                         f"(fine-tuning pairs) needs one target directory")
    sources = open_corpus(source, tokenizer)
    if len(sources) != len(targets):
        raise JanusError(f"data: {names[0]} ({source}) holds {len(sources)} documents, "
                         f"{names[1]} {len(targets)}: they must be aligned pairs")
    return sources


def validation_loader(cfg: RunConfig, tokenizer: Tokenizer, collate, dp_rank: int, dp_size: int
                      ) -> Optional[BatchLoader]:
    """Data-parallel rank `dp_rank`'s loader over data.valid (and data.valid_source); None
    without data.valid."""
    if cfg.data.valid is None:
        return None
    targets = open_corpus(cfg.data.valid, tokenizer)
    return build_loader(cfg.data, targets, collate, dp_rank, dp_size, open_sources(
                            cfg.data.valid_source, tokenizer, targets,
                            ("data.valid_source", "data.valid")))


def pair_overrides(directory: str | Path, max_source_len: Optional[int] = None,
                   max_target_len: Optional[int] = None) -> list[str]:
    """The config overrides that point a run at a pair directory (`janus-finetune prepare`:
    source/ and target/ shards, the tokenizer, pairs.json), cut at the given lengths or else at
    the task's lengths that pairs.json records."""
    directory = Path(directory)
    summary = directory / "pairs.json"
    if max_source_len is None or max_target_len is None:
        if not summary.is_file():
            raise JanusError(f"data: {summary} not found: prepare the pairs with "
                             f"`janus-finetune prepare --task T --output {directory}`")
        recorded = json.loads(summary.read_text())
        if "max_source_len" not in recorded:
            raise JanusError(f"data: {summary} records no task lengths (prepared by an older "
                             f"version): prepare the pairs again")
        max_source_len, max_target_len = recorded["max_source_len"], recorded["max_target_len"]
    return [f"data.train={directory / 'target'}", f"data.source={directory / 'source'}",
            f"data.tokenizer={directory}",  # the directory: its tokenizer.model or tokenizer.json
            f"data.max_source_len={max_source_len}", f"data.max_target_len={max_target_len}"]
