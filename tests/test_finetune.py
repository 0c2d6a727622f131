"""Task registry, and a tiny fine-tune -> select -> evaluate -> compare through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.tasks import TASKS, data_root, get_task, read_split
from janus_pretrain.errors import JanusError
from conftest import REPO, SHARED_DATA, multi30k_slice, run_killable

GLGE = {"cnndm", "gigaword", "xsum", "msnews", "squadqg", "msqg", "coqa", "personachat"}
NMT = {"wmt14_ende", "wmt16_enro", "iwslt14_deen"}
SHIPPED = {"multi30k_ende", "wmt_ende_sample", "squadqg_dev", "aeslc", "dialogsum", "dailydialog"}


def test_registry_defines_every_task():
    assert GLGE | NMT | SHIPPED <= set(TASKS)
    for task in TASKS.values():
        assert set(task.splits) == {"train", "valid", "test"}, task.name
        assert task.metrics and task.max_target_len >= 8


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_tasks_load(name):
    task = get_task(name)
    sizes = {}
    for split in ("train", "valid", "test"):
        sources, targets = read_split(task, split, SHARED_DATA)
        assert len(sources) == len(targets) > 0
        assert all("\n" not in s for s in sources[:100])
        sizes[split] = len(sources)
    if name == "squadqg_dev":  # carved deterministically out of the 10,570-line dev set
        assert sizes == {"train": 8570, "valid": 1000, "test": 1000}
        dev = (SHARED_DATA / "glge" / "squad_qg" / "dev.tgt").read_text(encoding="utf-8").splitlines()
        assert read_split(task, "test", SHARED_DATA)[1][0] == " ".join(dev[9570].split())


@pytest.mark.parametrize("name", sorted(GLGE | NMT))
def test_missing_file_is_one_line(name, tmp_path):
    task = get_task(name)
    with pytest.raises(JanusError) as e:
        read_split(task, "train", tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and "file not found" in message
    assert task.howto in message


def test_data_root_default_and_unknown_task(monkeypatch):
    monkeypatch.delenv("JANUS_DATA", raising=False)
    assert data_root().resolve() == SHARED_DATA.resolve()
    monkeypatch.setenv("JANUS_DATA", "/elsewhere")
    assert data_root() == Path("/elsewhere")
    with pytest.raises(JanusError, match="unknown task 'nope'"):
        get_task("nope")


def test_pairs_and_masking_must_agree():
    from janus_pretrain.config import load_config

    base = ["data.train=t", "data.tokenizer=k.model", "model=tiny", "data.max_source_len=64",
            "data.max_target_len=64"]
    load_config(REPO / "configs" / "finetune" / "janus.yaml", [*base, "data.source=s"]).check_data()
    with pytest.raises(JanusError, match="data.source"):
        load_config(REPO / "configs" / "finetune" / "cmlm.yaml", base).check_data()
    with pytest.raises(JanusError, match="data.source"):
        load_config(REPO / "configs" / "pretrain" / "demo.yaml", [*base, "data.source=s"]).check_data()


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    result = run_killable([sys.executable, "-m", "finetune.cli", *args], timeout,
                          f"janus-finetune {args[0]}")
    assert result.returncode == 0, f"janus-finetune {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result


def test_cli_missing_task_file_exits_2(tmp_path):
    proc = run_killable([sys.executable, "-m", "finetune.cli", "--data-root", str(tmp_path),
                         "prepare", "--task", "xsum", "--output", str(tmp_path / "out")], 60,
                        "janus-finetune prepare")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: task xsum: train file")


def test_tiny_finetune_evaluate_compare(tmp_path):
    multi30k_slice(tmp_path / "data", 240, 16, 12)  # a 240-pair slice: every step stays small
    data_arg = ["--data-root", str(tmp_path / "data")]
    _cli(*data_arg, "prepare", "--task", "multi30k_ende", "--output", str(tmp_path / "pairs"),
         "--vocab-size", "400", "--workers", "1")
    run = tmp_path / "janus"
    out = _cli(*data_arg, "train", "--task", "multi30k_ende", "--data", str(tmp_path / "pairs"),
               "--config", "configs/finetune/janus.yaml", "--average-last", "2",
               "--valid-size", "8", "model=tiny", "train.steps=4", "train.save_interval=2",
               "train.log_interval=2", "optim.warmup_steps=1", "data.micro_batch_size=8",
               f"train.output_dir={run}").stdout
    assert "best ->" in out and "averaged" in out
    best = run / "checkpoints" / "best"
    assert (best / "COMPLETE").is_file() and (best / "mp_rank_00_model_states.pt").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/ce_ar", "train/ce_nar", "train/ce_aux", "train/kl_ar_aux"} <= set(logged[-1])

    result = tmp_path / "janus.json"
    _cli(*data_arg, "evaluate", "--task", "multi30k_ende", "--checkpoint", str(best),
         "--output", str(result), "--latency-sentences", "2", "--batch-size", "4")
    data = json.loads(result.read_text())
    assert set(data["settings"]) == {"ar_beam5", "ar_greedy", "nar_T1", "nar_T4", "nar_T10",
                                     "spec_exact", "spec_relaxed"}
    for values in data["settings"].values():
        assert 0 <= values["bleu"] <= 100
        assert values["latency_ms"] > 0 and values["sentences_per_s"] > 0
    greedy, exact = data["settings"]["ar_greedy"], data["settings"]["spec_exact"]
    assert exact["bleu"] == greedy["bleu"] and exact["samples"] == greedy["samples"]
    assert greedy["passes_per_sentence"] >= 1 and exact["passes_per_sentence"] >= 2
    assert data["settings"]["spec_relaxed"]["tokens_per_iteration"] >= 1

    report = tmp_path / "report"
    _cli("compare", "--results", str(result), "--output-dir", str(report), "--note", "tiny")
    md = (report / "multi30k_ende.md").read_text()
    assert "| janus | nar_T4 |" in md and "(published)" in md and "not measured here" in md
    assert (report / "multi30k_ende.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "multi30k_ende.json").read_text())["measured"]
