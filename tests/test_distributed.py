"""Multi-process training on gloo: ZeRO-2 follows the ZeRO-0 trajectory, a resumed run equals an
uninterrupted one bit for bit (also after SIGTERM), and a checkpoint refuses a foreign tokenizer."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, _train_overrides, read_metrics

from janus_pretrain.parallel.state import free_port
from janus_pretrain.train.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.distributed

STEPS = 5
EXACT = ("train/loss", "train/ce_ar", "train/ce_nar", "train/ce_aux", "train/kl_ar_aux",
         "train/kl_nar_aux", "train/lr", "train/grad_norm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {}


def trained(runs, launch_training, tmp_path_factory, name, *extra):
    """Each distinct run once per module (the tests share them)."""
    if name not in runs:
        out = tmp_path_factory.mktemp(name)
        result = launch_training(out, nproc=2, extra=(f"train.steps={STEPS}", *extra))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = out
    return runs[name]


def test_zero2_loss_trajectory_equals_zero0(runs, launch_training, tmp_path_factory):
    z0 = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero0",
                              "parallel.deepspeed_config=configs/deepspeed/zero0.json"))
    z2 = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero2",
                              "parallel.deepspeed_config=configs/deepspeed/zero2.json"))
    assert [m["step"] for m in z0] == list(range(1, STEPS + 1)) == [m["step"] for m in z2]
    for a, b in zip(z0, z2):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5), (a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    # The runs trained: the loss moved (a trajectory, not a constant).
    assert z0[-1]["train/loss"] < z0[0]["train/loss"]


def test_resume_equals_uninterrupted_run(runs, launch_training, tmp_path_factory):
    full = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero2",
                                "parallel.deepspeed_config=configs/deepspeed/zero2.json"))
    out = tmp_path_factory.mktemp("resumed")
    common = (f"train.steps={STEPS}", "parallel.deepspeed_config=configs/deepspeed/zero2.json")
    assert_split_run_equals(full, launch_training, out, common)
    runs["resumed"] = out


def assert_split_run_equals(full: list, launch_training, out, common: tuple) -> None:
    """Train to step 2 and stop, then resume to STEPS: the metrics are `full`'s bit for bit."""
    first = launch_training(out, nproc=2, extra=(*common, "train.exit_after=2"))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    second = launch_training(out, nproc=2, extra=common, resume=True)
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        for key in EXACT:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_bf16_without_zero_resumes_exactly(runs, launch_training, tmp_path_factory):
    """bf16 at ZeRO-0 runs our MasterWeights optimizer (train/master_weights.py) inside the
    DeepSpeed engine: its fp32 masters and moments go through DeepSpeed's checkpoint, so a
    resumed run (2 data-parallel ranks) equals the uninterrupted one bit for bit."""
    common = (f"train.steps={STEPS}", "parallel.deepspeed_config=configs/deepspeed/zero0.json",
              "parallel.precision=bf16")
    full = read_metrics(trained(runs, launch_training, tmp_path_factory, "bf16_zero0", *common))
    assert_split_run_equals(full, launch_training, tmp_path_factory.mktemp("bf16_resumed"), common)
    assert full[-1]["train/loss"] < full[0]["train/loss"]


def test_checkpoint_rejects_another_tokenizer(runs, launch_training, tmp_path_factory,
                                              corpus_file):
    from janus_pretrain.data.prepare import prepare
    from janus_pretrain.tokenizer import train_tokenizer

    out = trained(runs, launch_training, tmp_path_factory, "zero0",
                  "parallel.deepspeed_config=configs/deepspeed/zero0.json")
    other = tmp_path_factory.mktemp("other_tok")
    train_tokenizer([corpus_file], other / "tok.model", vocab_size=900)
    prepare([str(corpus_file)], str(other / "tok.model"), other / "shards", num_workers=1)
    result = launch_training(out, nproc=1, resume=True, extra=(
        f"train.steps={STEPS + 1}", f"data.tokenizer={other / 'tok.model'}",
        f"data.train={other / 'shards'}"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint:"), result.stderr[-3000:]
    assert "tokenizer" in lines[0]


def start_ranks(output, shards_dir, tokenizer_path, nproc, extra, logs):
    """One `janus-pretrain train` process per rank, as srun starts them (RANK etc. set here),
    all in one new process group, so that a test can signal them together as Slurm does."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "janus_pretrain.cli", "train", "--config",
               str(REPO / "configs" / "pretrain" / "demo.yaml"),
               *_train_overrides(shards_dir, tokenizer_path, output), *extra]
        log = open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      process_group=procs[0].pid if procs else 0))
    return procs


def model_weights(checkpoint_dir):
    module = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {name: value for name, value in module.items() if torch.is_tensor(value)}


def test_sigterm_checkpoints_exits_75_and_resume_is_exact(runs, launch_training, tmp_path_factory,
                                                         shards_dir, tokenizer_path):
    full_dir = trained(runs, launch_training, tmp_path_factory, "zero2",
                       "parallel.deepspeed_config=configs/deepspeed/zero2.json")
    out, logs = tmp_path_factory.mktemp("preempted"), tmp_path_factory.mktemp("preempted_logs")
    common = (f"train.steps={STEPS}", "parallel.deepspeed_config=configs/deepspeed/zero2.json")
    procs = start_ranks(out, shards_dir, tokenizer_path, 2, common, logs)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file():  # the first step is done: signal mid-run
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (logs / "rank0.log").read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(procs[0].pid, signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log0 = (logs / "rank0.log").read_text()
    assert codes == [REQUEUE_EXIT_CODE] * 2, log0[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert 1 <= stopped < STEPS, "the run ended before the signal: make it longer"
    assert f"stopped by SIGTERM after step {stopped}" in log0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    second = launch_training(out, nproc=2, extra=common, resume=True)
    assert second.returncode == 0, second.stderr[-4000:]
    full, resumed = read_metrics(full_dir), read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        for key in EXACT:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    last = f"step_{STEPS:08d}"
    want, got = model_weights(full_dir / "checkpoints" / last), model_weights(out / "checkpoints" / last)
    assert want and want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
