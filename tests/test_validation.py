"""Validation inside the loop (train.eval_interval): eval/ lines in metrics.jsonl, and
checkpoints/best following the best score across a resume and surviving a crash in its update."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, read_metrics, rendezvous_env_restored

from janus_pretrain.checkpoint import atomic, store, weights
from janus_pretrain.config import load_config
from janus_pretrain.train.validation import read_best

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
METRIC = "eval/fake/bleu/ar_greedy"


def scripted(scores: list[float]):
    """A task_eval returning the next of `scores` (higher is better) for each validation."""
    it = iter(scores)
    return lambda module: {METRIC: next(it), "eval/fake/bleu/nar_T4": 0.0}


def run(shards_dir, tokenizer_path, out, task_eval, *extra, resume=False):
    from janus_pretrain.train.loop import train

    cfg = load_config(DEMO, [
        "model=tiny", f"data.train={shards_dir}", f"data.valid={shards_dir}",
        f"data.tokenizer={tokenizer_path}", "data.max_source_len=64", "data.max_target_len=64",
        "data.micro_batch_size=4", "optim.warmup_steps=2", "train.log_interval=1",
        "train.save_interval=2", "train.eval_interval=2", "train.eval_batches=2",
        "train.keep_checkpoints=10", "train.steps=8", f"train.output_dir={out}", *extra])
    with rendezvous_env_restored():
        return train(cfg, resume=resume, task_eval=task_eval)


def same_weights(a, b) -> bool:
    wa, wb = weights.tp_rank_weights(a, 0), weights.tp_rank_weights(b, 0)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_best_is_the_best_logged_step_across_a_resume(shards_dir, tokenizer_path, tmp_path,
                                                      single_process, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    run(shards_dir, tokenizer_path, out, scripted([1.0, 5.0, 3.0]), "train.exit_after=6")
    # The resumed run must compare against the recorded 5.0, not start afresh.
    run(shards_dir, tokenizer_path, out, scripted([4.0]), resume=True)
    evals = [m for m in read_metrics(out) if METRIC in m]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    assert all("eval/loss" in m and "eval/ce_ar" in m for m in evals)
    best_step = max(evals, key=lambda m: m[METRIC])["step"]
    best = out / "checkpoints" / "best"
    assert read_best(best) == {"metric": METRIC, "score": 5.0, "step": best_step}
    assert same_weights(best, out / "checkpoints" / "step_00000004")
    assert not same_weights(best, out / "checkpoints" / "step_00000008")


def test_crash_while_updating_best_keeps_the_previous_one(shards_dir, tokenizer_path, tmp_path,
                                                          single_process, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = []
    original = atomic.publish_local

    def crash_on_second(tmp, final, **manifest):  # best's files are written, not yet published
        calls.append(final)
        if len(calls) == 2:
            raise RuntimeError("injected crash before publishing best")
        return original(tmp, final, **manifest)

    monkeypatch.setattr(atomic, "publish_local", crash_on_second)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run(shards_dir, tokenizer_path, out, scripted([1.0, 2.0]), "train.steps=4")
    best = out / "checkpoints" / "best"
    assert read_best(best)["step"] == 2
    assert store.verify(best) == []
    assert same_weights(best, out / "checkpoints" / "step_00000002")
    from janus_pretrain.generate.api import Generator

    assert len(Generator.from_checkpoint(best).generate(["a test"], mode="ar", max_len=4)) == 1


@pytest.mark.parametrize("preset,keys", [
    ("janus", ["eval/multi30k_ende/bleu/ar_greedy", "eval/multi30k_ende/bleu/nar_T4"]),
    ("cmlm", ["eval/multi30k_ende/bleu/nar_T4"])])
def test_task_eval_decodes_the_trained_modes(preset, keys, tokenizer_path, single_process):
    """finetune's callback for the loop: one key per trained mode, AR (the score) first."""
    from finetune.live_eval import task_eval
    from finetune.tasks import get_task
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD, load_tokenizer

    cfg = load_config(REPO / "configs" / "finetune" / f"{preset}.yaml", [
        "model=tiny", f"data.tokenizer={tokenizer_path}", "data.max_source_len=64",
        "data.max_target_len=64"])
    model = JanusModel(cfg.model, load_tokenizer(tokenizer_path).vocab_size, PAD)
    scores = task_eval(get_task("multi30k_ende"), cfg, 3)(model)
    assert list(scores) == keys and all(0 <= v <= 100 for v in scores.values())


def test_finetune_cli_validates_in_the_loop(tmp_path):
    """janus-finetune train with train.eval_interval: the task metric per mode is logged and
    best is the step with the best AR greedy BLEU (not `select`'s pick)."""
    import sys

    from conftest import multi30k_slice, run_killable

    multi30k_slice(tmp_path / "data", 120, 8, 4)
    cli = [sys.executable, "-m", "finetune.cli", "--data-root", str(tmp_path / "data")]
    for args in (["prepare", "--task", "multi30k_ende", "--output", str(tmp_path / "pairs"),
                  "--vocab-size", "400", "--workers", "1"],
                 ["train", "--task", "multi30k_ende", "--data", str(tmp_path / "pairs"),
                  "--config", "configs/finetune/janus.yaml", "--valid-size", "4", "model=tiny",
                  "train.steps=4", "train.save_interval=2", "train.eval_interval=2",
                  "optim.warmup_steps=1", "data.micro_batch_size=8",
                  f"train.output_dir={tmp_path / 'run'}"]):
        done = run_killable([*cli, *args], 240, args[0])
        assert done.returncode == 0, done.stderr[-3000:]
    ar = "eval/multi30k_ende/bleu/ar_greedy"
    evals = [m for m in read_metrics(tmp_path / "run") if ar in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all("eval/multi30k_ende/bleu/nar_T4" in m for m in evals)
    best = read_best(tmp_path / "run" / "checkpoints" / "best")
    top = max(m[ar] for m in evals)
    assert best["metric"] == ar and best["score"] == top
    assert best["step"] == next(m["step"] for m in evals if m[ar] == top)
    assert "select:" not in done.stdout  # the loop kept best; no selection after it


def test_without_a_task_best_has_the_lowest_eval_loss(shards_dir, tokenizer_path, tmp_path,
                                                      single_process, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    run(shards_dir, tokenizer_path, out, None, "train.steps=6", "optim.lr=3e-3")
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4, 6]
    lowest = min(evals, key=lambda m: m["eval/loss"])
    assert read_best(out / "checkpoints" / "best") == {
        "metric": "eval/loss", "score": -lowest["eval/loss"], "step": lowest["step"]}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # rank 0 plotted the run


def test_eval_interval_needs_a_checkpoint_and_something_to_validate(tmp_path):
    from janus_pretrain.errors import JanusError
    from janus_pretrain.train.loop import train

    with pytest.raises(JanusError, match="multiple of train.save_interval=4"):
        load_config(DEMO, ["train.save_interval=4", "train.eval_interval=6"])
    cfg = load_config(DEMO, ["data.train=t", "data.tokenizer=k.model", "train.save_interval=2",
                             "train.eval_interval=2", f"train.output_dir={tmp_path}"])
    with pytest.raises(JanusError, match="needs data.valid"):
        train(cfg)
