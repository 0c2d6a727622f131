"""Distillation: the teacher's AR outputs for a task's training sources, line-aligned with them,
resumable after an interruption, and what `prepare --distilled` makes training pairs of."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, SHARED_DATA, run_killable
from finetune.distill import PARTIAL, RECORD, TARGETS, distill, distilled_targets
from finetune.live_eval import first_metric
from finetune.pairs import prepare_pairs
from finetune.tasks import get_task, read_split
from janus_pretrain.checkpoint.weights import resolve
from janus_pretrain.data.shards import ShardedCorpus
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import Generator
from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.tokenizer import load_tokenizer

TASK = get_task("multi30k_ende")
AR = dict(mode="ar", beam=2, batch_size=2, max_len=TASK.decoding.max_len)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A Multi30k of 9 training pairs (the third source emptied) and 4 validation pairs."""
    root = tmp_path_factory.mktemp("distill_data")
    folder = root / "nmt" / "multi30k"
    folder.mkdir(parents=True)
    for stem, n in (("train", 9), ("val", 4)):
        for lang in ("en", "de"):
            lines = (SHARED_DATA / "nmt" / "multi30k" / f"{stem}.{lang}").read_text(
                encoding="utf-8").splitlines()[:n]
            if (stem, lang) == ("train", "en"):
                lines[2] = ""
            (folder / f"{stem}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def normalised(texts):
    return [" ".join(t.split()) for t in texts]


def test_distill_cli_is_the_teachers_beam_output(trained_run, data_root, tmp_path, single_process):
    out = tmp_path / "kd"
    proc = run_killable([sys.executable, "-m", "finetune.cli", "--data-root", str(data_root),
                         "distill", "--task", TASK.name, "--teacher", str(trained_run),
                         "--output", str(out), "--beam", "2", "--batch-size", "2",
                         "--chunk-batches", "2", "--max-pairs", "8", "--valid-size", "4"],
                        240, "janus-finetune distill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher validation bleu" in proc.stdout and "distill:" in proc.stderr  # the bar
    sources = read_split(TASK, "train", data_root)[0][:8]
    gen = Generator.from_checkpoint(trained_run)
    lines = (out / TARGETS).read_text(encoding="utf-8").split("\n")[:-1]
    assert lines == normalised(gen.generate(sources, **AR))
    assert len(lines) == 8 and lines[2] == ""
    record = json.loads((out / RECORD).read_text())
    valid_src, refs = read_split(TASK, "valid", data_root)
    assert record["valid_score"] == first_metric(TASK, gen, valid_src, refs,
                                                 dict(mode="ar", beam=2, batch_size=2))
    assert (record["lines"], record["empty_sources"], record["beam"]) == (8, 1, 2)
    assert record["teacher"] == str(resolve(trained_run).resolve())
    assert not (out / PARTIAL).exists()


def test_interrupted_distill_resumes_to_the_same_file_and_prepare_uses_it(
        trained_run, data_root, tmp_path, single_process, monkeypatch):
    real = Generator.decode_ids

    def echoing(self, src, opts):
        # A 2-step teacher says the same thing for every source: append the source's tokens so
        # that a line in the wrong place shows.
        return [Hypothesis(h.tokens + s[1:-1].tolist(), h.score, h.log_prob)
                for s, h in zip(src, real(self, src, opts))]

    monkeypatch.setattr(Generator, "decode_ids", echoing)
    kw = dict(beam=2, batch_size=2, chunk_batches=1, valid_size=0, root=data_root)
    whole = tmp_path / "whole"
    distill(TASK, trained_run, whole, **kw)
    sources = read_split(TASK, "train", data_root)[0]
    lines = (whole / TARGETS).read_text(encoding="utf-8").split("\n")[:-1]
    assert lines == normalised(Generator.from_checkpoint(trained_run).generate(sources, **AR))
    assert len(set(lines)) == len(sources) == 9

    part = tmp_path / "part"
    assert distill(TASK, trained_run, part, max_chunks=1, **kw) is None
    assert not (part / TARGETS).exists()
    assert json.loads((part / PARTIAL / "progress.json").read_text())["chunks"] == 1
    with pytest.raises(JanusError, match="other settings.*beam: 2 -> 3"):
        distill(TASK, trained_run, part, **{**kw, "beam": 3})
    with open(part / PARTIAL / "lines.jsonl", "ab") as f:  # killed while writing chunk 2
        f.write(b'[4, "half a line' + b" and" * 10_000)  # longer than all that follows
    assert distill(TASK, trained_run, part, max_chunks=2, **kw) is None
    record = distill(TASK, trained_run, part, **kw)
    assert (part / TARGETS).read_bytes() == (whole / TARGETS).read_bytes()
    assert record["lines"] == 9 and not (part / PARTIAL).exists()

    monkeypatch.setattr(Generator, "decode_ids", None)  # a finished directory decodes nothing
    assert distill(TASK, trained_run, part, **kw) == record

    tokenizer = resolve(trained_run)  # the checkpoint directory holds its tokenizer file
    summary = prepare_pairs(TASK, tmp_path / "pairs", str(tokenizer), workers=1, root=data_root,
                            distilled=whole)
    kept = [(s, t) for s, t in zip(sources, lines) if s and t]
    assert summary["pairs"] == len(kept) == 8 and summary["dropped_empty"] == 1
    tok = load_tokenizer(tokenizer)
    for side, texts in (("source", [s for s, _ in kept]), ("target", [t for _, t in kept])):
        corpus = ShardedCorpus(tmp_path / "pairs" / side)
        assert [corpus[i].tolist() for i in range(len(corpus))] == tok.encode(texts), side
    with pytest.raises(JanusError, match="other multi30k_ende training sources"):
        distilled_targets(TASK, whole, ["another sentence", *sources[1:]])


def test_selfkd_preset_is_the_janus_loss_continued():
    from janus_pretrain.config import load_config

    base = ["data.train=t", "data.source=s", "data.tokenizer=k.model", "data.max_target_len=64"]
    janus, selfkd = (load_config(REPO / "configs" / "finetune" / f"{name}.yaml", base)
                     for name in ("janus", "janus_selfkd"))
    assert selfkd.objective == janus.objective and selfkd.model == janus.model
    assert selfkd.train.steps < janus.train.steps and selfkd.optim.lr < janus.optim.lr
