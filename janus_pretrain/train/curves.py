"""A run's curves as `<run>/loss.png` beside its metrics.jsonl, so that a run (a CPU demo, an
offline W&B run never synced) can be judged at a glance: the training loss and each logged loss
term on the left (validation losses dashed, in the colour of their training term), the task
metrics of live validation (`eval/<task>/<metric>/<mode>`, train/validation.py) on the right.
"""
from __future__ import annotations

import json
from pathlib import Path

from janus_pretrain.objectives.build import TERMS

LOSSES = ("loss", *TERMS)


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl -> {key: (steps, values)} for every numeric key but `step`."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return series


def plot_curves(metrics: Path, output: Path | None = None) -> Path | None:
    """Plot `metrics` (a metrics.jsonl) to `output` (default: loss.png beside it); None when the
    file holds no loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics)
    terms = [t for t in LOSSES if f"train/{t}" in series or f"eval/{t}" in series]
    if not terms:
        return None
    tasks = sorted(k for k in series if k.startswith("eval/") and k.count("/") >= 3)
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(11 if tasks else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    for i, term in enumerate(terms):
        colour = f"C{i % 10}"
        for split, style in (("train", "-"), ("eval", "--")):
            if f"{split}/{term}" in series:
                ax.plot(*series[f"{split}/{term}"], style, color=colour, label=f"{split}/{term}")
    ax.set(xlabel="step", ylabel="loss", title=str(metrics.parent))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if tasks:
        ax = axes[0][1]
        for key in tasks:
            ax.plot(*series[key], "o-", label=key.split("/", 1)[1])
        ax.set(xlabel="step", title="validation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    output = output or metrics.parent / "loss.png"
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
