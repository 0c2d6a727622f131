"""`janus-finetune compare`: our evaluation results beside published numbers, as markdown, JSON
and a quality-vs-latency plot.

Measured rows come from `janus-finetune evaluate` JSON files (ours, this hardware). Quoted rows
are numbers from papers, each with its source, in a separate table: they were not measured here,
have no latency on our hardware, and are only comparable when the task and split are the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from janus_pretrain.errors import JanusError
from finetune import claims as claim_sets

GLGE_JANUS = ("GLGE easy, as reported in follow-up work by the JANUS authors "
              "(Liang et al., EMNLP 2022)")
MASK_PREDICT = ("Ghazvininejad et al., Mask-Predict, EMNLP 2019, Table 1 (T = 10, length beam 5, "
                "with distillation)")
JANUS_CODE = "JANUS authors' code release (github.com/dropreg/JANUS)"


@dataclass(frozen=True)
class Published:
    task: str
    system: str
    mode: str  # AR or NAR
    scores: dict
    source: str


PUBLISHED = [
    Published("xsum", "ProphetNet-base", "AR", {"rouge1": 39.8, "rouge2": 17.1, "rougeL": 32.0}, GLGE_JANUS),
    Published("xsum", "BART-base", "AR", {"rouge1": 41.4, "rouge2": 18.6, "rougeL": 33.4}, GLGE_JANUS),
    Published("xsum", "BANG", "NAR", {"rouge1": 32.6, "rouge2": 9.0, "rougeL": 27.4}, GLGE_JANUS),
    Published("squadqg", "ProphetNet-base", "AR", {"rougeL": 48.0, "bleu4": 19.5, "meteor": 23.9}, GLGE_JANUS),
    Published("squadqg", "BART-base", "AR", {"rougeL": 49.2, "bleu4": 20.3, "meteor": 23.6}, GLGE_JANUS),
    Published("squadqg", "BANG", "NAR", {"rougeL": 44.1, "bleu4": 12.8, "meteor": 19.0}, GLGE_JANUS),
    Published("iwslt14_deen", "JANUS", "AR", {"bleu": 37.24}, JANUS_CODE),
    Published("iwslt14_deen", "JANUS", "NAR", {"bleu": 34.21}, JANUS_CODE),
    Published("wmt14_ende", "CMLM", "NAR", {"bleu": 27.03}, MASK_PREDICT),
    Published("wmt16_enro", "CMLM", "NAR", {"bleu": 33.08}, MASK_PREDICT),
]


# Our tasks that are a published task on other examples: the published rows are quoted as the
# same task, with this caveat.
PUBLISHED_AS = {"squadqg_dev": ("squadqg", "published on GLGE's SQuAD 1.1 QG test split; ours "
                                "tests on the last 1,000 lines of its dev split, so the rows share "
                                "the task, not the examples")}


def published(task: str) -> list[Published]:
    name = PUBLISHED_AS.get(task, (task,))[0]
    return [p for p in PUBLISHED if p.task == name]


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise JanusError(f"compare: results file not found: {p} (write it with "
                             f"`janus-finetune evaluate`)")
        try:
            data = json.loads(p.read_text())
            data["settings"], data["task"], data["system"], data["metrics"]
        except (ValueError, KeyError, TypeError) as e:
            raise JanusError(f"compare: {p} is not an evaluate result ({type(e).__name__}: {e})") from None
        out.append(data)
    tasks = {r["task"] for r in out}
    if len(tasks) != 1:
        raise JanusError(f"compare: results are for several tasks ({', '.join(sorted(tasks))}); "
                         f"compare one task at a time")
    return out


def measured_rows(results: list[dict]) -> list[dict]:
    """One row per (system, setting), with the speed-up over the AR beam of the same system, or
    failing that the first AR beam row of the comparison."""
    rows = [{"system": r["system"], "setting": s, **{m: v[m] for m in r["metrics"]},
             "latency_ms": v["latency_ms"], "sentences_per_s": v["sentences_per_s"],
             "valid": (r.get("selected") or {}).get("score")}
            for r in results for s, v in r["settings"].items()]
    ar = {row["system"]: row["latency_ms"] for row in rows if row["setting"].startswith("ar_beam")}
    fallback = next(iter(ar.values()), None)
    for row in rows:
        base = ar.get(row["system"], fallback)
        row["speedup_vs_ar_beam"] = base / row["latency_ms"] if base else None
    return rows


def _cell(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(task: str, metric_names: list[str], rows: list[dict], notes: Sequence[str],
             hardware: dict, plot_name: str, curves: Path | None = None,
             claims: Sequence[dict] = (), provenance: str = "") -> str:
    quoted_same = published(task)
    quoted_other = [p for p in PUBLISHED if p not in quoted_same]
    out = [f"# {task}: JANUS AR/NAR vs ablations and published baselines", ""]
    out += [f"- {n}" for n in notes]
    out += [f"- hardware: {hardware.get('device')} ({hardware.get('cpu')}, {hardware.get('cpus')} "
            f"CPUs, torch {hardware.get('torch')}, {hardware.get('torch_threads')} threads)", ""]
    out += ["## Measured here (our code, this hardware)", "",
            "Latency: ms per sentence decoding one at a time; throughput: sentences/s decoding "
            "the test split in batches. Speed-up: over the AR beam search of the same system.", ""]
    out.append(_table(["system", "setting", *metric_names, "ms/sentence", "sentences/s",
                       "speed-up"],
                      [[r["system"], r["setting"], *[r[m] for m in metric_names], r["latency_ms"],
                        r["sentences_per_s"], r["speedup_vs_ar_beam"]] for r in rows]))
    if provenance:
        out += ["", "How each row was made (from its JSON's `provenance`):", "", provenance]
    if claims:
        out += ["", "## Claims (finetune/claims.py: the paper's, at this scale)", "",
                _table(["figure", "target", "measured", "holds", "from"],
                       [[c["figure"], c["target"], c["measured"], "yes" if c["holds"] else "**no**",
                         "; ".join(c["rows"])] for c in claims])]
    out += ["", f"![quality vs latency]({plot_name})", ""]
    if curves:
        out += [f"![validation {metric_names[0]} against updates]({curves.name})", ""]
    out += ["## Published (quoted, not measured here)", ""]
    if task in PUBLISHED_AS:
        out += [f"{PUBLISHED_AS[task][0]}: {PUBLISHED_AS[task][1]}.", ""]
    if quoted_same:
        out.append(_table(["system", "mode", *metric_names, "source"],
                          [[f"{p.system} (published)", p.mode, *[p.scores.get(m) for m in metric_names],
                            p.source] for p in quoted_same]))
    else:
        out.append(f"No published numbers on {task} are quoted here; the rows below are "
                   f"on other tasks and datasets, for context only, not comparable with the "
                   f"measured table.")
    if quoted_other:
        names = sorted({m for p in quoted_other for m in p.scores},
                       key=["rouge1", "rouge2", "rougeL", "bleu4", "meteor", "bleu"].index)
        out += ["", "Other tasks:", "",
                _table(["task", "system", "mode", *names, "source"],
                       [[p.task, f"{p.system} (published)", p.mode, *[p.scores.get(m) for m in names], p.source]
                        for p in quoted_other])]
    return "\n".join(out) + "\n"


def system_colours(systems: Sequence[str]) -> dict[str, str]:
    """system -> colour, distinct for any number of systems: tab10, else tab20's dark shades
    before its light ones (no two neighbours of one hue), else points spread over turbo."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    systems = list(dict.fromkeys(systems))
    n = len(systems)
    if n <= 10:
        cols = colormaps["tab10"].colors[:n]
    elif n <= 20:
        tab20 = colormaps["tab20"].colors
        cols = (tab20[0::2] + tab20[1::2])[:n]
    else:
        cols = [colormaps["turbo"](i / (n - 1)) for i in range(n)]
    return dict(zip(systems, map(to_hex, cols)))


def latency_series(metric: str, rows: list[dict]) -> list[dict]:
    """The quality-vs-latency plot's lines: one per system through its scored settings, each
    system in its own colour."""
    colours = system_colours([r["system"] for r in rows])
    series = []
    for system, colour in colours.items():
        mine = [r for r in rows if r["system"] == system and r[metric] is not None]
        series.append({"system": system, "colour": colour, "settings": [r["setting"] for r in mine],
                       "latency_ms": [r["latency_ms"] for r in mine],
                       "score": [r[metric] for r in mine]})
    return series


def plot(task: str, metric: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in latency_series(metric, rows):
        ax.plot(line["latency_ms"], line["score"], "o-", label=line["system"], color=line["colour"])
        for setting, x, y in zip(line["settings"], line["latency_ms"], line["score"]):
            ax.annotate(setting, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    for p in published(task):
        if metric in p.scores:
            ax.axhline(p.scores[metric], ls="--", lw=0.8, color="gray")
            ax.annotate(f"{p.system} {p.mode} (published)", (0.01, p.scores[metric]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms per sentence (batch 1, this machine)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: quality vs latency (measured)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)  # off the lines
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# One line style per decoding mode in the validation curves; one colour per system in a panel.
MODE_STYLES = {"ar_greedy": "-", "nar_T4": "--", "nar_T1": ":", "nar_T10": "-."}


def curve_panels(results: list[dict]) -> dict[str, list[dict]]:
    """Runs with an in-loop validation curve, grouped into one panel per experiment (the
    `provenance` of their JSON; `other` without one), in report order."""
    panels: dict[str, list[dict]] = {}
    for r in results:
        if r.get("validation_curve"):
            panels.setdefault((r.get("provenance") or {}).get("experiment", "other"), []).append(r)
    return panels


def plot_curves(task: str, metric: str, results: list[dict], path: Path) -> bool:
    """Validation `metric` against updates for every run with an in-loop validation curve: a panel
    per experiment, a colour per system, a line style per decoding mode (MODE_STYLES); the
    selected (best) step circled. False when no run has a curve."""
    panels = curve_panels(results)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (experiment, runs) in zip(axes.flat, panels.items()):
        colours = system_colours([r["system"] for r in runs])
        for r in runs:
            modes = sorted({k.split("/", 1)[1] for point in r["validation_curve"] for k in point
                            if k.startswith(f"{metric}/")})
            for i, mode in enumerate(modes):
                points = [(p["step"], p[f"{metric}/{mode}"]) for p in r["validation_curve"]
                          if f"{metric}/{mode}" in p]
                ax.plot(*zip(*points), MODE_STYLES.get(mode, ":"), marker=".",
                        color=colours[r["system"]], label=r["system"] if i == 0 else None)
                best = r.get("selected") or {}
                if best.get("step") in dict(points):
                    ax.plot(best["step"], dict(points)[best["step"]], "o", mfc="none", ms=9,
                            color=colours[r["system"]])
        ax.set_title(experiment, fontsize=9)
        ax.set_xlabel("updates", fontsize=8)
        ax.set_ylabel(f"validation {metric}", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    styles = ", ".join(f"{m} {s}" for m, s in MODE_STYLES.items())
    fig.suptitle(f"{task}: in-loop validation ({styles}; circle: the selected checkpoint)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(result_files: Sequence[str | Path], output_dir: str | Path,
            notes: Sequence[str] = (), provenance: str = "") -> dict[str, Path]:
    """Write `<output_dir>/<task>.md`, `.json` and `.png`; returns their paths."""
    results = load_results(result_files)
    task, metric_names = results[0]["task"], results[0]["metrics"]
    rows = measured_rows(results)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{task}.{kind}" for kind in ("md", "json", "png")}
    plot(task, metric_names[0], rows, paths["png"])
    curves = out / f"{task}.curves.png"
    if plot_curves(task, metric_names[0], results, curves):
        paths["curves"] = curves
    all_notes = [*notes, *sorted({n for r in results for n in r.get("notes", [])})]
    claims = claim_sets.check(claim_sets.CLAIMS.get(task, []), rows, metric_names[0])
    paths["md"].write_text(markdown(task, metric_names, rows, all_notes, results[0]["hardware"],
                                    paths["png"].name, paths.get("curves"), claims, provenance))
    paths["json"].write_text(json.dumps(
        {"task": task, "notes": all_notes, "measured": rows, "claims": claims,
         "published": [asdict(p) for p in published(task)],
         "results": results}, indent=2, ensure_ascii=False))
    return paths
