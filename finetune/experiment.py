"""`janus-finetune experiment`: an experiment is data (experiments/<name>.yaml), run as a plan of
steps that each leave a done-file, so an interrupted experiment continues where it stopped.

An experiment file names the task(s), where its runs live (`root`), the prepared data and the
runs (a preset under configs/, its overrides, `init_from` another run, the data it trains on);
`systems` are the runs it evaluates into the task's report (docs/results/<task>.*), beside other
experiments' rows. `extends: <other>` inherits everything but `systems`, `description` and
`notes` (and adds to its `data`, `defaults` and `runs`), so ablations name the parent's runs and
data without copying them.
The plan is derived, in order, from what each evaluated system needs:

    tokenizer, corpus, pretrain   (pretraining, when a run is initialised from `pretrain:<name>`)
    prepare, distill              (a task's pairs; distilled targets from another run's AR beam)
    train, evaluate, report

Every step is one CLI command run in a child process with `threads` OMP threads. Its done-file
(under `<root>/.done/`) records the command, the git revision, the thread count and the wall
time. An evaluation's result JSON (docs/results/<task>.<run>.json) carries the records of
the runs behind it, so `report` rebuilds docs/results/<task>.md from the JSONs alone
(docs/experiments.md).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from janus_pretrain.config import read_yaml
from janus_pretrain.errors import JanusError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
INHERITED = ("task", "tasks", "root", "results_dir", "threads", "data", "defaults",
             "runs", "pretrain", "corpus", "train_args", "evaluate")


@dataclass
class Step:
    """One command of a plan. `fresh`: paths removed before it starts anew; `resume`: the
    argument that continues an interrupted attempt instead (training checkpoints, distill
    chunks); `record`: what the step's result should say about how it was made."""

    name: str
    argv: list[str]
    fresh: list[Path] = field(default_factory=list)
    resume_if: Optional[Path] = None
    record: dict = field(default_factory=dict)
    result: Optional[Path] = None  # evaluate: the results JSON this step publishes
    always: bool = False  # the report: rebuilt from the JSONs at every run, no done-file
    runs: list[str] = field(default_factory=list)  # evaluate: the train steps behind it


def load(name: str) -> dict:
    """experiments/<name>.yaml (or a path) with its `extends` chain merged; one-line errors."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
        raise JanusError(f"experiment: {path} not found (experiments: {known})")
    spec = read_yaml(path, "experiment")
    spec.setdefault("name", path.stem)
    spec["path"] = str(path)
    parent = spec.pop("extends", None)
    if parent:
        base = load(str(path.parent / f"{parent}.yaml"))
        merged = {k: {**base.get(k, {}), **spec.get(k, {})} for k in ("data", "defaults", "runs")}
        spec = {**{k: base[k] for k in INHERITED if k in base}, **spec, **merged}
    for key in ("root", "systems"):
        if key not in spec:
            raise JanusError(f"experiment: {path}: `{key}` is missing")
    unknown = [s for s in spec["systems"] if s not in spec.get("runs", {})]
    if unknown:
        raise JanusError(f"experiment: {path}: systems {unknown} have no entry under `runs`")
    return spec


def tasks(spec: dict) -> list[str]:
    return spec.get("tasks") or [spec["task"]]


class Plan:
    """The ordered, de-duplicated steps that evaluate an experiment's systems and report them."""

    def __init__(self, spec: dict, data_root: str, python: str = sys.executable):
        self.spec, self.data_root = spec, data_root
        self.root = Path(spec["root"])
        self.results = Path(spec.get("results_dir", "docs/results"))
        self.ft = [python, "-m", "finetune.cli", "--data-root", data_root]
        self.jp = [python, "-m", "janus_pretrain.cli"]
        self.steps: dict[str, Step] = {}
        for task in tasks(spec):
            for system in spec["systems"]:
                self._evaluate(task, system)
        for task in tasks(spec):
            self._add(Step(f"report {task}", [*self.ft, "experiment", "report", spec["path"],
                                              "--task", task], always=True))

    # -- paths ---------------------------------------------------------------------------------
    def run_dir(self, task: str, name: str) -> Path:
        return self.root / name if len(tasks(self.spec)) == 1 else self.root / task / name

    def _wandb_name(self, task: str, run: str) -> str:
        several = len(tasks(self.spec)) > 1
        return f"{self.spec['name']}-{task}-{run}" if several else f"{self.spec['name']}-{run}"

    def result_path(self, task: str, run: str) -> Path:
        return self.results / f"{task}.{run}.json"

    def done_file(self, step: Step) -> Path:
        return self.root / ".done" / (step.name.replace(" ", "_").replace("/", "_") + ".json")

    # -- steps ---------------------------------------------------------------------------------
    def _add(self, step: Step) -> Step:
        return self.steps.setdefault(step.name, step)

    def _tokenizer(self) -> Path:
        c = self.spec["corpus"]
        out = self.root / "tokenizer.model"
        self._add(Step("tokenizer", [*self.jp, "tokenizer", "train", "--input",
                                     f"{self.data_root}/{c['input']}", "--max-sentences",
                                     str(c["max_sentences"]), "--vocab-size", str(c["vocab_size"]),
                                     "--output", str(out)]))
        return out

    def _pretrain(self, name: str) -> Path:
        """A pretraining run on the experiment's corpus -> its directory (for --init-from)."""
        p, c = self.spec["pretrain"], self.spec["corpus"]
        tok, corpus, out = self._tokenizer(), self.root / "corpus", self.root / "pretrain" / name
        limit = ["--max-docs", str(c["max_docs"])] if c.get("max_docs") else []
        self._add(Step("corpus", [*self.jp, "data", "prepare", "--input",
                                  f"{self.data_root}/{c['input']}", "--tokenizer", str(tok),
                                  "--output", str(corpus), "--workers", "2", *limit],
                       fresh=[corpus]))
        preset = p["runs"][name]
        overrides = [*p.get("defaults", []), f"data.train={corpus}", f"data.tokenizer={tok}",
                     f"train.output_dir={out}", f"train.wandb_name={self.spec['name']}-pretrain-{name}"]
        self._add(Step(f"pretrain {name}", [*self.jp, "train", "--config",
                                            f"configs/pretrain/{preset}.yaml", *overrides],
                       fresh=[out], resume_if=out,
                       record={"preset": f"configs/pretrain/{preset}.yaml", "overrides": overrides}))
        return out

    def _data(self, task: str, name: str) -> Path:
        """A prepared pair directory (`data:` entry) -> its path, with the steps that make it."""
        d = self.spec["data"][name]
        out = self.run_dir(task, name)
        argv = [*self.ft, "prepare", "--task", task, "--output", str(out)]
        if "pretrain" in self.spec:  # the pretrained models' tokenizer
            argv += ["--tokenizer", str(self._tokenizer())]
        if d.get("distilled_by"):
            teacher = d["distilled_by"]
            kd = self.run_dir(task, f"distill_{teacher}")
            argv += ["--distilled", str(kd), "--tokenizer",
                     str(self._data(task, d.get("from", "data")) / "tokenizer.model")]
            self._add(Step(f"distill {task}/{teacher}",
                           [*self.ft, "distill", "--task", task, "--teacher",
                            str(self._train(task, teacher) / "checkpoints" / "best"),
                            "--output", str(kd), *_max_pairs(d)]))
        elif d.get("tokenizer_from"):  # a subset keeps the full data's pieces and ids
            argv += ["--tokenizer", str(self._data(task, d["tokenizer_from"]) / "tokenizer.model")]
        elif "pretrain" not in self.spec:
            argv += ["--vocab-size", str(d.get("vocab_size", 8000))]
        self._add(Step(f"prepare {task}/{name}", [*argv, *_max_pairs(d)], fresh=[out]))
        return out

    def _init(self, task: str, ref: str) -> str:
        if ref.startswith("pretrain:"):
            return str(self._pretrain(ref.split(":", 1)[1]))
        return str(self._train(task, ref) / "checkpoints" / "best")

    def _train(self, task: str, run: str) -> Path:
        r = self.spec["runs"][run]
        out = self.run_dir(task, run)
        data = self._data(task, r.get("data", "data"))
        init = ["--init-from", self._init(task, r["init_from"])] if r.get("init_from") else []
        defaults = self.spec.get("defaults", {})
        overrides = [*defaults.get(r.get("defaults", "train"), []), *r.get("overrides", []),
                     f"train.output_dir={out}", f"train.wandb_name={self._wandb_name(task, run)}"]
        preset = f"configs/finetune/{r['preset']}.yaml"
        self._add(Step(f"train {task}/{run}",
                       [*self.ft, "train", "--task", task, "--data", str(data), "--config", preset,
                        *init, *self.spec.get("train_args", []), *overrides],
                       fresh=[out], resume_if=out,
                       record={"preset": preset, "overrides": overrides, "data": str(data),
                               "init_from": r.get("init_from")}))
        return out

    def _evaluate(self, task: str, run: str) -> None:
        ckpt = self._train(task, run) / "checkpoints" / "best"
        r = self.spec["runs"][run]
        options = self.spec.get("evaluate", {})
        limit = options.get("limit", {})
        limit = limit.get(task) if isinstance(limit, dict) else limit
        out = self.root / ".eval" / f"{task}.{run}.json"
        self._add(Step(f"evaluate {task}/{run}",
                       [*self.ft, "evaluate", "--task", task, "--name", r.get("system", run),
                        "--checkpoint", str(ckpt), "--output", str(out),
                        *(["--limit", str(limit)] if limit else []), *options.get("args", [])],
                       result=self.result_path(task, run), runs=self._lineage(task, run)))

    def _lineage(self, task: str, run: str) -> list[str]:
        """The train/pretrain steps whose records a result carries: the run and its ancestors."""
        r = self.spec["runs"][run]
        ref = r.get("init_from")
        up = [] if not ref else ([f"pretrain {ref.split(':', 1)[1]}"] if ref.startswith("pretrain:")
                                 else self._lineage(task, ref))
        return [f"train {task}/{run}", *up]


def _max_pairs(d: dict) -> list[str]:
    return ["--max-pairs", str(d["max_pairs"])] if d.get("max_pairs") else []


def revision(results: Path) -> str:
    """The checkout's commit, `+uncommitted` when tracked files other than the results (which
    the experiment itself writes) differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){results}"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+uncommitted" if dirty else "")


def status(plan: Plan) -> list[tuple[Step, bool]]:
    return [(s, not s.always and plan.done_file(s).is_file()) for s in plan.steps.values()]


def dry_run(plan: Plan) -> str:
    lines = [f"experiment {plan.spec['name']}: {len(plan.steps)} steps, runs under {plan.root}, "
             f"{plan.spec.get('threads', 2)} threads"]
    for i, (step, done) in enumerate(status(plan), 1):
        lines.append(f"{i:3d}. [{'done' if done else 'todo'}] {step.name}")
        lines.append("       " + " ".join(step.argv))
    return "\n".join(lines)


def execute(plan: Plan, threads: Optional[int] = None) -> None:
    """Run every step whose done-file is missing, in order; stop at the first that fails."""
    threads = threads or plan.spec.get("threads", 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    for step, done in status(plan):
        if done:
            print(f"experiment: {step.name}: done", flush=True)
            continue
        argv = list(step.argv)
        if step.resume_if is not None and _has_checkpoint(step.resume_if):
            argv.insert(argv.index("--config"), "--resume")
        else:
            for p in step.fresh:
                shutil.rmtree(p, ignore_errors=True)
        print(f"experiment: {step.name}: {' '.join(argv)}", flush=True)
        start = time.time()
        code = subprocess.call(argv, env=env)
        if code != 0:
            raise JanusError(f"experiment: step '{step.name}' failed (exit {code}); fix it and "
                             f"rerun: finished steps are kept")
        record = {"step": step.name, "argv": argv, "revision": revision(plan.results),
                  "threads": threads,
                  "wall_s": round(time.time() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **step.record}
        if step.result is not None:
            _publish(plan, step, record)
        if step.always:
            continue
        path = plan.done_file(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))


def _has_checkpoint(run: Path) -> bool:
    from janus_pretrain.checkpoint.store import complete

    return bool(complete(run / "checkpoints"))


def _publish(plan: Plan, step: Step, record: dict) -> None:
    """Evaluate's output + the records of the runs behind it -> the report's results JSON."""
    produced = Path(step.argv[step.argv.index("--output") + 1])
    result = json.loads(produced.read_text())
    lineage = []
    for name in step.runs:
        done = plan.done_file(plan.steps[name])
        lineage.append(json.loads(done.read_text()) if done.is_file() else {"step": name})
    result["provenance"] = {"experiment": plan.spec["name"],
                            "description": plan.spec.get("description", "").strip(),
                            "notes": plan.spec.get("notes", []), "evaluate": record,
                            "runs": lineage}
    step.result.parent.mkdir(parents=True, exist_ok=True)
    step.result.write_text(json.dumps(result, indent=2, ensure_ascii=False))


def report_notes(results: list[dict]) -> list[str]:
    """The report's header, from the results JSONs alone: each experiment's description and
    notes once, and the overrides every row's training shares."""
    notes, seen = [], set()
    for r in results:
        p = r.get("provenance")
        if p and p["experiment"] not in seen:
            seen.add(p["experiment"])
            notes.append(f"experiment `{p['experiment']}` (experiments/{p['experiment']}.yaml): "
                         f"{' '.join(p['description'].split())}")
            notes += list(p.get("notes", []))
    common = _common_overrides(results)
    if common:
        notes.append(f"every row's training (unless its row below says otherwise): `{' '.join(common)}`")
    return notes


def _common_overrides(results: list[dict]) -> list[str]:
    lists = [run["overrides"] for r in results for run in r.get("provenance", {}).get("runs", [])
             if run.get("overrides")]
    return [o for o in lists[0] if all(o in x for x in lists)] if lists else []


def provenance_table(results: list[dict]) -> str:
    """Markdown: how every row was made (preset, overrides beyond the shared ones, the run it
    started from, revision, threads, wall time of training and evaluation)."""
    common = set(_common_overrides(results))
    lines = ["| system | experiment | trained | from | revision | threads | train s | evaluate s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.get("provenance")
        if not p:
            lines.append(f"| {r['system']} | no record | | | | | | |")
            continue
        run, e = p["runs"][0], p["evaluate"]
        extra = [o for o in run.get("overrides", []) if o not in common and not o.startswith(
            ("train.output_dir=", "train.wandb_name="))]
        trained = f"{Path(run.get('preset', '?')).stem} `{' '.join(extra)}`" if extra else \
            Path(run.get("preset", "?")).stem
        lines.append(f"| {r['system']} | {p['experiment']} | {trained} | "
                     f"{run.get('init_from') or ''} | {run.get('revision', '?')} | "
                     f"{run.get('threads', '?')} | {_seconds(run)} | {_seconds(e)} |")
    late = sorted({r["system"] for r in results if r.get("provenance", {}).get("recorded")})
    if late:
        lines += ["", f"Recorded after the fact ({', '.join(late)}): these rows were made by the "
                  f"Makefile before the experiment runner; revision = the parent of the commit "
                  f"that last wrote the JSON, threads = what the evaluation recorded, times from "
                  f"the Makefile's log where it kept one."]
    return "\n".join(lines)


def _seconds(record: dict) -> str:
    return f"{record['wall_s']:.0f}" if record.get("wall_s") is not None else "n/a"
