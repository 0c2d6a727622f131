"""The one-GPU run (slurm/gpu_run.sh, docs/gpu.md) without a GPU: `bench gpu` and `bench cuda`
refuse in one line without CUDA, and the whole command's --dry-run-cpu runs its three phases at
tiny shapes (phase a's checks, phase b's rows without flex and captured ones, phase c's Multi30k
slice trained and evaluated), each writing its results into the output folder."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DIST_VARS, REPO, multi30k_slice


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("name", ["gpu", "cuda"])
def test_refuses_without_cuda(name):
    from janus_pretrain.bench import cuda, gpu

    with pytest.raises(SystemExit, match=rf"^bench {name}: no CUDA device here \(use --dry-run-cpu"):
        {"gpu": gpu, "cuda": cuda}[name].main([])


def test_gpu_run_dry_run_cpu_writes_every_phase(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               DATA_ROOT=str(multi30k_slice(tmp_path / "data", 240, 16, 12)))
    out = tmp_path / "out"
    run = subprocess.run(["bash", "slurm/gpu_run.sh", str(out), "--dry-run-cpu"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "a_cuda.json", "b_speed.json", "c_ar.json", "c_janus.json", "c_metrics_ar.jsonl",
        "c_metrics_janus.jsonl", "log.txt"]  # at most 8 files come back from the machine
    log = (out / "log.txt").read_text()
    for phase in ("a", "b"):
        assert f"phase {phase} exit 0" in log
    assert "bf16 janus sdpa / bf16 ar sdpa step time" in log  # the side-by-side ratios
    assert any(line.split()[:1] == ["spec_exact"] for line in log.splitlines())  # c: batch 1

    checks = json.loads((out / "a_cuda.json").read_text())["checks"]
    assert {k: v["status"] for k, v in checks.items()} == {
        "bf16_step": "pass", "loss_scale_skip": "pass", "zero2": "pass", "checkpointing": "pass",
        "decode": "pass", "flex_sdpa": "skipped"}
    assert checks["loss_scale_skip"]["skipped_steps"] == 1
    assert checks["decode"]["spec_exact"]["equal"] == checks["decode"]["spec_exact"]["of"] > 0

    rows = json.loads((out / "b_speed.json").read_text())["rows"]
    assert list(rows) == ["bf16 ar sdpa", "bf16 janus sdpa", "bf16 janus sdpa no-cudnn",
                          "bf16 bart sdpa", "bf16 janus loop ZeRO-0", "bf16 janus loop ZeRO-1",
                          "bf16 janus loop ZeRO-2"]
    for row, r in rows.items():
        assert r["seconds"] > 0 and r["flops"] > 0 and 0 < r["mfu"], row

    settings = {run: set(json.loads((out / f"c_{run}.json").read_text())["settings"])
                for run in ("ar", "janus")}
    assert settings["ar"] == {"ar_beam5", "ar_greedy"}
    assert {"ar_beam5", "nar_T4", "nar_T10"} <= settings["janus"]
    for run in ("ar", "janus"):  # WANDB_MODE=disabled: the curves, and no wandb import
        logged = [json.loads(x) for x in (out / f"c_metrics_{run}.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == 4 and any("eval/multi30k_ende/bleu/ar_greedy" in x
                                               for x in logged)


def test_gpu_run_reruns_a_part(tmp_path):
    """PHASES and CHECKS (how a lent GPU's second call reran one check): only phase a, only the
    named check; an unknown check name is refused in one line."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               DATA_ROOT=str(tmp_path), PHASES="a", CHECKS="bf16_step")
    out = tmp_path / "out"
    run = subprocess.run(["bash", "slurm/gpu_run.sh", str(out), "--dry-run-cpu"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_cuda.json", "log.txt"]
    checks = json.loads((out / "a_cuda.json").read_text())["checks"]
    assert {k: v["status"] for k, v in checks.items()} == {"bf16_step": "pass"}

    env["CHECKS"] = "bf16_step no_such_check"
    run = subprocess.run(["bash", "slurm/gpu_run.sh", str(tmp_path / "out2"), "--dry-run-cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "bench cuda: CHECKS names no check ['no_such_check']" in run.stdout
