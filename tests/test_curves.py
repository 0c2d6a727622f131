"""A run's metrics.jsonl -> loss.png beside it (janus_pretrain/train/curves.py)."""
from __future__ import annotations

import json

from janus_pretrain.train.curves import plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics_become_a_png_beside_them(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 10, "train/loss": 6.0, "train/ce_ar": 5.0, "train/lr": 1e-3},
        {"step": 20, "train/loss": 4.0, "train/ce_ar": 3.5, "train/lr": 9e-4},
        {"step": 20, "eval/loss": 4.5, "eval/ce_ar": 4.0, "eval/m30k/bleu/ar_greedy": 3.2},
    ])
    png = plot_curves(metrics)
    assert png == tmp_path / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_series_keep_their_own_steps(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 5, "train/loss": 2.0},
        {"step": 8, "eval/loss": 3.0},
        {"step": 10, "train/loss": 1.5},
    ])
    assert read_metrics(metrics) == {"train/loss": ([5, 10], [2.0, 1.5]), "eval/loss": ([8], [3.0])}


def test_no_loss_logged_yet_no_png(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "train/lr": 1e-3}])
    assert plot_curves(metrics) is None
    assert not (tmp_path / "loss.png").exists()
