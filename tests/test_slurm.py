"""The multi-node launch for real: the slurm scripts parse and dry-run; on a local Slurm with two
emulated nodes (slurm/local/start.sh) a 2-node job completes though one of its ranks is killed
(a failure requeue), and a job sent USR1 checkpoints, requeues itself and resumes; two torchrun
agents on loopback train like one 2-process node."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DIST_VARS, REPO, _train_overrides, read_metrics

from janus_pretrain.parallel.state import free_port

pytestmark = pytest.mark.distributed

SCRIPTS = ("slurm/launch.sh", "slurm/pretrain.sbatch", "slurm/finetune.sbatch", "slurm/local/start.sh",
           "slurm/local/stop.sh")
CONFIG = "configs/pretrain/demo.yaml"
ZERO2 = "parallel.deepspeed_config=configs/deepspeed/zero2.json"
STEPS = 3
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
        "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm_conf():
    """A running two-node Slurm on this host for the module; stopped afterwards, also on failure."""
    start = subprocess.run([REPO / "slurm/local/start.sh"], capture_output=True, text=True,
                           timeout=300)
    if start.returncode == 69:  # start.sh: apt-get could not install the packages
        pytest.skip(f"no Slurm: {start.stderr.strip().splitlines()[-1]}")
    assert start.returncode == 0, start.stderr[-3000:]
    state = start.stdout.strip().splitlines()[-1]
    try:
        conf = dict(line.split("=", 1) for line in Path(state).read_text().splitlines())
        yield conf["SLURM_CONF"]
    finally:
        stop = subprocess.run([REPO / "slurm/local/stop.sh", state], capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


def slurm_env(conf: str) -> dict:
    """The job inherits this (sbatch --export=ALL): our venv first, no rendezvous of ours."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return env


def slurm(conf: str, *cmd: str) -> str:
    return subprocess.run(cmd, env=slurm_env(conf), capture_output=True, text=True, check=True,
                          timeout=30).stdout


def submit(conf: str, log: Path, *overrides: str) -> str:
    return slurm(conf, "sbatch", "--parsable", "--nodes=2", f"--output={log}", f"--chdir={REPO}",
                 str(REPO / "slurm/pretrain.sbatch"), CONFIG, *overrides).strip()


def job(conf: str, job_id: str) -> dict:
    """`scontrol show job` as a dict (sacct would need slurmdbd)."""
    return dict(re.findall(r"(\w+)=(\S*)", slurm(conf, "scontrol", "-o", "show", "job", job_id)))


def read_log(log: Path) -> str:
    # Both nodes append to one log, so their bytes (tqdm's bars included) may interleave.
    return log.read_text(errors="replace") if log.is_file() else "(no log)"


def wait_until(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{read_log(log)[-4000:]}")
        time.sleep(0.5)
    return found


def run_job(conf, log, overrides, act=None, timeout=240) -> dict:
    """Submit, optionally `act(job_id)` on the way, wait for the end; the job never outlives us."""
    job_id = submit(conf, log, *overrides)
    try:
        if act:
            act(job_id)
        return wait_until(lambda: (info := job(conf, job_id))["JobState"] in DONE and info,
                          timeout, f"job {job_id} to end", log)
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env(conf), timeout=30)


@pytest.fixture(scope="module")
def runs():
    return {}


def single_node(runs, launch_training, tmp_path_factory) -> list[dict]:
    """The reference: one node, torchrun with 2 processes, ZeRO-2 (run once per module)."""
    if "single_node" not in runs:
        out = tmp_path_factory.mktemp("single_node")
        result = launch_training(out, nproc=2, extra=(f"train.steps={STEPS}", ZERO2))
        assert result.returncode == 0, result.stderr[-4000:]
        runs["single_node"] = read_metrics(out)
    return runs["single_node"]


def assert_same_losses(got: list[dict], want: list[dict]):
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for a, b in zip(want, got):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6), (a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5), (a, b)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", REPO / script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def dry_run(conf: str, **env) -> list[str]:
    result = subprocess.run(
        ["bash", "slurm/pretrain.sbatch", CONFIG, "train.steps=100", "data.train=a b"], cwd=REPO,
        env={**slurm_env(conf), "DRY_RUN": "1", "SLURM_JOB_ID": "4321",
             "SLURM_JOB_NODELIST": "node[1-2]", **env},
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1:]  # after the job banner


def test_finetune_sbatch_defaults_to_the_janus_preset(slurm_conf):
    result = subprocess.run(
        ["bash", "slurm/finetune.sbatch"], cwd=REPO, capture_output=True, text=True, timeout=30,
        env={**slurm_env(slurm_conf), "DRY_RUN": "1", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "node[1-2]"})
    assert result.returncode == 0, result.stderr
    nodes = result.stdout.splitlines()[1:]
    assert len(nodes) == 2
    assert all("-m janus_pretrain.cli train --config configs/finetune/janus.yaml --resume" in line
               for line in nodes), nodes


def test_dry_run_prints_each_nodes_launch_command(slurm_conf):
    train = f"-m janus_pretrain.cli train --config {CONFIG} --resume train.steps=100 data.train=a\\ b"
    assert dry_run(slurm_conf, NPROC_PER_NODE="3") == [
        f"node {rank} (node{rank + 1}): torchrun --nnodes=2 --nproc_per_node=3 --node_rank={rank} "
        f"--master_addr=node1 --master_port=24321 {train}" for rank in (0, 1)]
    # GPUs in the allocation win over NPROC_PER_NODE; the deepspeed launcher gets a hostfile.
    lines = dry_run(slurm_conf, LAUNCHER="deepspeed", SLURM_GPUS_ON_NODE="4", NPROC_PER_NODE="3")
    assert lines[:3] == ["hostfile slurm/logs/hostfile-4321:", "node1 slots=4", "node2 slots=4"]
    assert lines[3:] == [
        f"node {rank} (node{rank + 1}): deepspeed --hostfile=slurm/logs/hostfile-4321 --no_ssh "
        f"--node_rank={rank} --master_addr=node1 --master_port=24321 --no_local_rank --module "
        f"janus_pretrain.cli train --config {CONFIG} --resume train.steps=100 data.train=a\\ b"
        for rank in (0, 1)]
    assert not (REPO / "slurm/logs/hostfile-4321").exists(), "a dry run wrote the hostfile"


def test_usr1_checkpoints_requeues_and_resumes(slurm_conf, shards_dir, tokenizer_path, tmp_path):
    out, log = tmp_path / "train", tmp_path / "job.out"
    steps = 20  # long enough that USR1 arrives mid-run
    timeline = {}

    def preempt(job_id):
        wait_until(lambda: "step 1:" in read_log(log), 180, "training steps", log)
        timeline["signalled"] = time.monotonic()
        slurm(slurm_conf, "scancel", "--signal=USR1", "--batch", job_id)
        wait_until(lambda: "SLURM_RESTART_COUNT=1" in read_log(log), 120, "the rerun", log)
        timeline["rerun"] = time.monotonic()

    start = time.monotonic()
    info = run_job(slurm_conf, log, [*_train_overrides(shards_dir, tokenizer_path, out),
                                     f"train.steps={steps}", ZERO2], act=preempt, timeout=420)
    text = read_log(log)
    print(f"USR1 after {timeline['signalled'] - start:.0f}s, rerun started after "
          f"{timeline['rerun'] - start:.0f}s, done after {time.monotonic() - start:.0f}s")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        text[-4000:]
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+)", text)
    assert stopped, text[-4000:]
    step = int(stopped[1])
    assert 1 <= step < steps, "the run ended before the signal: make it longer"
    first, rerun = text.split("SLURM_RESTART_COUNT=1")
    assert "forwarding SIGUSR1" in first and "requeueing job" in first
    assert f"resuming from {out / 'checkpoints' / f'step_{step:08d}'}" in rerun
    assert (out / "checkpoints/latest").read_text().strip() == f"step_{steps:08d}"
    assert [m["step"] for m in read_metrics(out)] == list(range(1, steps + 1))


def test_sbatch_two_nodes_survive_a_killed_rank(slurm_conf, shards_dir, tokenizer_path, tmp_path,
                                                runs, launch_training, tmp_path_factory,
                                                monkeypatch):
    """A 2-node job whose node-2 rank is SIGKILLed after step 1's checkpoint: srun ends node 1's
    rank too, the job requeues itself (a failure, within the retry budget), resumes from step 1
    and completes with the losses of one uninterrupted node of two processes."""
    out, log = tmp_path / "train", tmp_path / "job.out"
    start = time.monotonic()
    monkeypatch.setenv("JANUS_TEST_KILL_AFTER_SAVE", "1")  # the job inherits it (slurm_env)
    monkeypatch.setenv("RETRY_LOG", str(tmp_path / "failures"))  # job ids restart with the cluster
    info = run_job(slurm_conf, log, [*_train_overrides(shards_dir, tokenizer_path, out),
                                     f"train.steps={STEPS}", "train.save_interval=1",
                                     "train.async_save=false", ZERO2], timeout=420)
    text = read_log(log)
    print(f"killed, requeued and finished in {time.monotonic() - start:.0f}s")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        text[-4000:]
    first, rerun = text.split("SLURM_RESTART_COUNT=1")
    assert "on node[1-2]: SLURM_RESTART_COUNT=0" in first
    assert "training failed (status" in first and "(retry 1 of 3 per 86400s)" in first
    assert f"resuming from {out / 'checkpoints' / 'step_00000001'}" in rerun
    assert (out / "checkpoints/latest").read_text().strip() == f"step_{STEPS:08d}"
    got = {m["step"]: m for m in read_metrics(out)}
    assert_same_losses([got[s] for s in sorted(got)],
                       single_node(runs, launch_training, tmp_path_factory))


def test_a_config_error_ends_the_job_before_any_rank_starts(slurm_conf, shards_dir,
                                                            tokenizer_path, tmp_path):
    """`train --check` on the batch node: exit 2, one line, no srun (so no requeue: under
    torchrun a rank's exit 2 would reach the script as 1, a failure)."""
    result = subprocess.run(
        ["bash", "slurm/pretrain.sbatch", CONFIG, *_train_overrides(shards_dir, tokenizer_path,
                                                                     tmp_path / "run"),
         "train.global_batch=24", "data.micro_batch_size=4"],
        cwd=REPO, env={**slurm_env(slurm_conf), "SLURM_JOB_ID": "9", "NPROC_PER_NODE": "2",
                       "SLURM_JOB_NODELIST": "node[1-2]", "RETRY_LOG": str(tmp_path / "f")},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "error: config: train.global_batch: 24 sequences = 6 micro-batches of 4, which 4 "
        "data-parallel ranks cannot share; use data-parallel sizes 3 or 6 (1 or 3 nodes of 2 GPUs "
        "at parallel.tensor_parallel=1)"], result.stderr
    assert "srun" not in result.stdout and not (tmp_path / "f").exists()


def test_two_torchrun_agents_equal_one_node(runs, launch_training, tmp_path_factory, tmp_path,
                                            shards_dir, tokenizer_path):
    """`--nnodes=2` with c10d rendezvous on loopback, one process per agent, no Slurm."""
    out = tmp_path / "train"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-agents",
           "-m", "janus_pretrain.cli", "train", "--config", CONFIG,
           *_train_overrides(shards_dir, tokenizer_path, out), f"train.steps={STEPS}", ZERO2]
    agents = []
    try:
        for i in range(2):
            with open(tmp_path / f"agent{i}.log", "w") as log:
                # A session each, so that a timeout kills the agent and its worker together.
                agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log,
                                               start_new_session=True))
        codes = [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    assert codes == [0, 0], (tmp_path / "agent0.log").read_text()[-4000:]
    assert_same_losses(read_metrics(out), single_node(runs, launch_training, tmp_path_factory))
