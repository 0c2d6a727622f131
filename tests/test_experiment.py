"""The experiment runner (finetune/experiment.py): every shipped experiment plans, and a tiny
experiment killed in the middle of a training step continues where it stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune import experiment
from finetune.cli import main as finetune_main
from finetune.tasks import get_task
from janus_pretrain.config import load_config
from janus_pretrain.data.corpora import pair_overrides
from janus_pretrain.errors import JanusError
from tests.conftest import REPO, child_env, multi30k_slice

SHIPPED = sorted(p.stem for p in experiment.EXPERIMENTS.glob("*.yaml"))


def test_every_experiment_is_shipped_with_a_make_wrapper_or_listed():
    assert {"multi30k", "multi30k_ablations", "multi30k_protocol", "multi30k_from_ar",
            "multi30k_3k", "glge"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_dry_run_plan(name, capsys):
    """Each step comes after the steps it reads from, every system is evaluated, and every
    training step's preset and overrides are a valid config (a typo fails here, not an hour in)."""
    spec = experiment.load(name)
    plan = experiment.Plan(spec, "../shared/data")
    names = list(plan.steps)
    outputs = {}
    for i, step in enumerate(plan.steps.values()):
        for path in step.fresh:
            outputs[str(path)] = i
        if step.name.startswith(("train ", "pretrain ")):
            for arg in step.argv:  # everything it reads (data, init-from) was made before it
                made = [p for p in outputs if arg == p or arg.startswith(p + "/")]
                assert all(outputs[p] < i for p in made), (step.name, arg)
            cfg = step.argv[step.argv.index("--config") + 1]
            overrides = [a for a in step.argv if "=" in a and not a.startswith("--")]
            task = step.argv[step.argv.index("--task") + 1] if "--task" in step.argv else None
            spec_task = get_task(task) if task else None
            data = pair_overrides("d", spec_task.max_source_len, spec_task.max_target_len) \
                if task else []
            load_config(REPO / cfg, [*data, *overrides])
    for task in experiment.tasks(spec):
        for system in spec["systems"]:
            assert names.index(f"train {task}/{system}") < names.index(f"evaluate {task}/{system}")
        assert names[-len(experiment.tasks(spec)):] == [f"report {t}" for t in
                                                         experiment.tasks(spec)]
    finetune_main(["experiment", "run", name, "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith(f"experiment {name}: {len(names)} steps")
    assert out.count("] ") == len(names)


def test_unknown_experiment_and_system_are_one_line(tmp_path):
    with pytest.raises(JanusError, match="experiments: .*multi30k"):
        experiment.load("no_such_experiment")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"task": "multi30k_ende", "root": "r", "runs": {},
                                   "systems": ["ar"]}))
    with pytest.raises(JanusError, match=r"systems \['ar'\] have no entry"):
        experiment.load(str(bad))


def _tiny(tmp_path: Path) -> Path:
    """An experiment on a 240-pair Multi30k slice: one ar run of 20 tiny updates."""
    spec = {"description": "a tiny experiment", "notes": ["tiny note"], "task": "multi30k_ende",
            "root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
            "threads": 1, "data": {"data": {"vocab_size": 400}},
            "train_args": ["--valid-size", "4"],
            "defaults": {"train": ["model=tiny", "train.steps=20", "train.save_interval=2",
                                   "train.keep_checkpoints=1", "train.log_interval=10",
                                   "optim.warmup_steps=1", "data.micro_batch_size=8"]},
            "runs": {"ar": {"preset": "ar"}}, "systems": ["ar"],
            "evaluate": {"limit": 4, "args": ["--latency-sentences", "1"]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _runner(tmp_path: Path, path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finetune.cli", "--data-root", str(tmp_path / "data"),
           "experiment", "run", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_experiment_resumes(tmp_path):
    multi30k_slice(tmp_path / "data", 240, 8, 6)
    path = _tiny(tmp_path)
    runs = tmp_path / "runs"
    proc = _runner(tmp_path, path)
    try:  # kill runner and trainer together once the run has its first checkpoint
        deadline = time.time() + 240
        while not list((runs / "ar" / "checkpoints").glob("*/COMPLETE")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = runs / ".done"
    prepared = (done / "prepare_multi30k_ende_data.json").stat().st_mtime
    assert not (done / "train_multi30k_ende_ar.json").exists()

    proc = _runner(tmp_path, path)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "prepare multi30k_ende/data: done" in out
    assert (done / "prepare_multi30k_ende_data.json").stat().st_mtime == prepared
    train = json.loads((done / "train_multi30k_ende_ar.json").read_text())
    assert "--resume" in train["argv"] and train["threads"] == 1 and train["wall_s"] > 0
    assert json.loads((runs / "ar" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 20

    result = json.loads((tmp_path / "results" / "multi30k_ende.ar.json").read_text())
    prov = result["provenance"]
    assert prov["experiment"] == "tiny" and prov["runs"][0]["step"] == "train multi30k_ende/ar"
    assert "train.steps=20" in prov["runs"][0]["overrides"]
    assert prov["evaluate"]["revision"] and result["sentences"] == 4
    md = (tmp_path / "results" / "multi30k_ende.md").read_text()
    assert "experiment `tiny`" in md and "tiny note" in md and "train.steps=20" in md
    assert "| ar | tiny | ar |  | " in md

    again = _runner(tmp_path, path)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "train multi30k_ende/ar: done" in out
