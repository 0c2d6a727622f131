"""The task registry: where each fine-tuning task's files are, how to read them, how to score it.

A task is data, not code: a `TaskSpec` names its split files relative to a data root (default
`../shared/data` beside the repository, or `--data-root` / `JANUS_DATA`), the lengths to cut at,
the metrics to report (the first one picks the best checkpoint) and the default decoding settings.
Most GLGE and NMT sets are not shipped offline; their specs still point at the layout of the
official releases, so the same command runs wherever the files are, and a missing file fails in
one line that says how to obtain it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from janus_pretrain.errors import JanusError

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

GLGE_HOWTO = "download the GLGE release (github.com/microsoft/glge) and unpack it under the data root"
SHARED_HOWTO = "it ships in ../shared/data (see its README.md); pass --data-root if it lives elsewhere"


@dataclass(frozen=True)
class Split:
    """One split: line-aligned `source` / `target` files, or (`target` None) one jsonl file whose
    `fields` hold source and target. `lines` = (start, stop) keeps a slice, which is how a task
    carves train / valid / test out of one shipped file, deterministically."""

    source: str
    target: Optional[str] = None
    fields: tuple[str, str] = ("src", "tgt")
    lines: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Decoding:
    """Default search settings of a task (see janus_pretrain.generate.api.DecodeOptions)."""

    beam: int = 5
    length_penalty: float = 1.0
    max_len: int = 128


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    splits: dict[str, Split]  # train, valid, test
    metrics: tuple[str, ...]  # names from finetune.metrics.METRICS; the first selects checkpoints
    howto: str
    max_source_len: int = 512
    max_target_len: int = 128
    decoding: Decoding = field(default_factory=Decoding)

    def files(self, split: str, root: Path) -> list[Path]:
        s = self.split(split)
        return [root / p for p in (s.source, s.target) if p is not None]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise JanusError(f"task {self.name}: no split '{name}' (has {', '.join(self.splits)})")
        return self.splits[name]


def _pairs(prefix: str, src: str, tgt: str, **splits: str) -> dict[str, Split]:
    """`<prefix>/<file>.<src>` <-> `<prefix>/<file>.<tgt>` for each split name -> file stem."""
    return {split: Split(f"{prefix}/{stem}.{src}", f"{prefix}/{stem}.{tgt}")
            for split, stem in splits.items()}


def _glge(task: str, metrics: tuple[str, ...], description: str, max_source_len: int,
          max_target_len: int, decoding: Decoding) -> TaskSpec:
    return TaskSpec(task, description,
                    _pairs(f"glge/{task}/org_data", "src", "tgt", train="train", valid="dev",
                           test="test"),
                    metrics, GLGE_HOWTO, max_source_len, max_target_len, decoding)


def _slices(source: str, target: str, *bounds: int) -> dict[str, Split]:
    """train / valid / test as consecutive line ranges of one aligned file pair (consecutive, so
    the examples of one document or dialogue mostly stay on one side)."""
    a, b, c, d = bounds
    return {name: Split(source, target, lines=(lo, hi))
            for name, (lo, hi) in zip(("train", "valid", "test"), ((a, b), (b, c), (c, d)))}


ROUGE = ("rouge1", "rouge2", "rougeL")
QG = ("rougeL", "bleu4", "meteor")
DIALOGUE = ("bleu1", "bleu2", "distinct1", "distinct2")
SUMMARY = Decoding(beam=5, length_penalty=1.0, max_len=140)
SHORT = Decoding(beam=5, length_penalty=1.0, max_len=64)

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # GLGE (Liu et al. 2021): the eight tasks, in the release's org_data layout.
    _glge("cnndm", ROUGE, "CNN/DailyMail summarization", 512, 140, SUMMARY),
    _glge("gigaword", ROUGE, "Gigaword headline generation", 128, 40, SHORT),
    _glge("xsum", ROUGE, "XSum extreme summarization", 512, 64, SUMMARY),
    _glge("msnews", ROUGE, "MSNews headline generation", 512, 48, SHORT),
    _glge("squadqg", QG, "SQuAD 1.1 question generation", 512, 48, SHORT),
    _glge("msqg", QG, "MSQG question generation", 512, 48, SHORT),
    _glge("coqa", ("f1",), "CoQA conversational question answering", 512, 48, SHORT),
    _glge("personachat", DIALOGUE, "PersonaChat response generation", 512, 64, SHORT),
    # NMT, in the layout of fairseq's preparation scripts (raw text, one sentence a line).
    TaskSpec("wmt14_ende", "WMT14 English-German",
             _pairs("nmt/wmt14_en_de", "en", "de", train="train", valid="valid", test="test"),
             ("bleu",), "run fairseq's examples/translation/prepare-wmt14en2de.sh (raw text)",
             256, 256, Decoding(beam=5, max_len=256)),
    TaskSpec("wmt16_enro", "WMT16 English-Romanian (newstest2016 is shipped as the test set)",
             {**_pairs("nmt/wmt16_en_ro", "en", "ro", train="train", valid="newstest2015"),
              **_pairs("nmt/wmt16_en_ro", "en", "ro", test="newstest2016")},
             ("bleu",), "get WMT16 En-Ro train/newstest2015 (e.g. the Mask-Predict release) into "
             "nmt/wmt16_en_ro/", 256, 256, Decoding(beam=5, max_len=256)),
    TaskSpec("iwslt14_deen", "IWSLT14 German-English",
             _pairs("nmt/iwslt14_de_en", "de", "en", train="train", valid="valid", test="test"),
             ("bleu",), "run fairseq's examples/translation/prepare-iwslt14.sh", 256, 256,
             Decoding(beam=5, max_len=256)),
    # The real data shipped offline in ../shared/data.
    TaskSpec("multi30k_ende", "Multi30k English->German (test_2016_flickr)",
             _pairs("nmt/multi30k", "en", "de", train="train", valid="val",
                    test="test_2016_flickr"),
             ("bleu",), SHARED_HOWTO, 64, 64, Decoding(beam=5, max_len=64)),
    TaskSpec("wmt_ende_sample", "WMT En->De 10k-sentence sample, Moses-tokenized (newstest2014)",
             _pairs("nmt/wmt_ende_toy", "en", "de", train="train", valid="val", test="test"),
             ("bleu",), SHARED_HOWTO, 128, 128, Decoding(beam=5, max_len=128)),
    TaskSpec("squadqg_dev", "SQuAD 1.1 QG: the shipped dev set cut into 8570/1000/1000 lines",
             _slices("glge/squad_qg/dev.src", "glge/squad_qg/dev.tgt", 0, 8570, 9570, 10570),
             QG, SHARED_HOWTO, 256, 48, SHORT),
    TaskSpec("aeslc", "AESLC email subject lines (valid: the last 500 train pairs; test: dev)",
             {"train": Split("summarization/aeslc/train.src", "summarization/aeslc/train.tgt",
                             lines=(0, 13936)),
              "valid": Split("summarization/aeslc/train.src", "summarization/aeslc/train.tgt",
                             lines=(13936, 14436)),
              "test": Split("summarization/aeslc/dev.src", "summarization/aeslc/dev.tgt")},
             ROUGE, SHARED_HOWTO, 512, 32, Decoding(beam=5, max_len=32)),
    TaskSpec("dialogsum", "DialogSum (valid: the last 500 train dialogues; test: dev)",
             {"train": Split("summarization/dialogsum/train.jsonl", fields=("dialogue", "summary"),
                             lines=(0, 11960)),
              "valid": Split("summarization/dialogsum/train.jsonl", fields=("dialogue", "summary"),
                             lines=(11960, 12460)),
              "test": Split("summarization/dialogsum/dev.jsonl", fields=("dialogue", "summary"))},
             ROUGE, SHARED_HOWTO, 512, 96, Decoding(beam=5, max_len=96)),
    TaskSpec("dailydialog", "DailyDialog history -> next turn (16033/1000/1000 pairs)",
             _slices("dialogue/dailydialog_subset/pairs.src", "dialogue/dailydialog_subset/pairs.tgt",
                     0, 16033, 17033, 18033),
             DIALOGUE, SHARED_HOWTO, 256, 64, SHORT),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise JanusError(f"task: unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def data_root(root: Optional[str | Path] = None) -> Path:
    return Path(root or os.environ.get("JANUS_DATA") or DEFAULT_DATA_ROOT)


def _clean(text: str) -> str:
    # One line per example: any whitespace, including the newlines inside a dialogue, is a space.
    return " ".join(text.split())


def read_split(task: TaskSpec, split: str, root: Optional[str | Path] = None
               ) -> tuple[list[str], list[str]]:
    """-> (sources, targets), aligned, whitespace normalised to single spaces."""
    s = task.split(split)
    root = data_root(root)
    for path in task.files(split, root):
        if not path.is_file():
            raise JanusError(f"task {task.name}: {split} file not found: {path} ({task.howto})")
    if s.target is None:
        src_field, tgt_field = s.fields
        sources, targets = [], []
        with open(root / s.source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    sources.append(row[src_field])
                    targets.append(row[tgt_field])
                except (ValueError, KeyError, TypeError) as e:
                    raise JanusError(f"task {task.name}: {root / s.source}:{n}: no "
                                     f"'{src_field}'/'{tgt_field}' ({type(e).__name__})") from None
    else:
        sources = (root / s.source).read_text(encoding="utf-8").split("\n")
        targets = (root / s.target).read_text(encoding="utf-8").split("\n")
        # A final newline is not an example.
        sources, targets = [x[:-1] if x and x[-1] == "" else x for x in (sources, targets)]
        if len(sources) != len(targets):
            raise JanusError(f"task {task.name}: {root / s.source} has {len(sources)} lines, "
                             f"{root / s.target} has {len(targets)}")
    if s.lines is not None:
        lo, hi = s.lines
        if hi > len(sources):
            raise JanusError(f"task {task.name}: {split} wants lines {lo}-{hi} of "
                             f"{root / s.source}, which has {len(sources)}")
        sources, targets = sources[lo:hi], targets[lo:hi]
    return [_clean(x) for x in sources], [_clean(y) for y in targets]
