"""Faults a user meets in the first week (the fault-tolerance promises of docs/training.md):
preempted fine-tuning asks for a requeue, decoding keeps its output, a non-finite run never
becomes `best`, malformed YAML is one line, a run directory takes one training at a time."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus_pretrain.errors import JanusError
from tests.conftest import REPO, child_env, multi30k_slice


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A 240-pair Multi30k slice, prepared: (data root, pair directory)."""
    root = tmp_path_factory.mktemp("faults")
    multi30k_slice(root / "data", 240, 8, 6)
    out = root / "pairs"
    subprocess.run([sys.executable, "-m", "finetune.cli", "--data-root", str(root / "data"),
                    "prepare", "--task", "multi30k_ende", "--output", str(out), "--vocab-size",
                    "400", "--workers", "1"], cwd=REPO, env=child_env(), check=True,
                   capture_output=True)
    return root / "data", out


def test_finetune_train_stopped_by_a_signal_requeues_without_select(tmp_path, monkeypatch, capsys):
    import janus_pretrain.train.loop as loop
    from janus_pretrain.parallel import state
    from janus_pretrain.train.loop import TrainResult
    from janus_pretrain.train.signals import REQUEUE_EXIT_CODE
    from finetune import cli

    selected = []
    monkeypatch.setattr(state, "shutdown", lambda: None)
    monkeypatch.setattr(cli, "_select", lambda *a: selected.append(a))
    result = TrainResult(rank=0, start_step=0, step=7, checkpoint="ckpt", stopped_by="SIGTERM")
    monkeypatch.setattr(loop, "train", lambda cfg, resume, task_eval: result)
    for side in ("source", "target"):  # as `janus-finetune prepare` leaves it
        (tmp_path / side).mkdir()
        (tmp_path / side / "meta.json").write_text("{}")
    argv = ["train", "--task", "multi30k_ende", "--data", str(tmp_path), "--config",
            "configs/finetune/janus.yaml", f"train.output_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == REQUEUE_EXIT_CODE and selected == []
    assert f"stopped by SIGTERM after step 7; exit status {REQUEUE_EXIT_CODE}" in capsys.readouterr().out
    result.stopped_by = None  # a finished run is still selected, and exits 0
    cli.main(argv)
    assert len(selected) == 1


def finetune_cmd(pairs, run: Path, *overrides: str) -> list[str]:
    data_root, data = pairs
    return [sys.executable, "-m", "finetune.cli", "--data-root", str(data_root), "train",
            "--task", "multi30k_ende", "--data", str(data), "--config", "configs/finetune/ar.yaml",
            "--valid-size", "4", "model=tiny", "train.save_interval=2", "train.log_interval=2",
            "optim.warmup_steps=1", "data.micro_batch_size=8", f"train.output_dir={run}",
            *overrides]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not list((run / "checkpoints").glob("*/COMPLETE")):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint: {proc.stdout.read()[-3000:]}")
        time.sleep(0.1)


def test_sigterm_in_finetuning_exits_75_without_select(pairs, tmp_path):
    run = tmp_path / "run"
    proc = start(finetune_cmd(pairs, run, "train.steps=2000"))
    try:
        wait_for_checkpoint(proc, run)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by SIGTERM" in out and "select:" not in out
    assert not (run / "checkpoints" / "best").exists()


def test_infinite_learning_rate_is_refused_in_one_line():
    from janus_pretrain.config import load_config

    with pytest.raises(JanusError, match=r"^config: optim.lr: must be positive and finite$"):
        load_config(REPO / "configs/finetune/ar.yaml", ["optim.lr=inf"])


def test_a_nonfinite_checkpoint_never_becomes_best(pairs, tmp_path):
    """A run whose weights went NaN (a huge learning rate): `select` refuses it in one line
    (fewer steps than the bad-step limit); in-loop validation never publishes it, and the
    bad-step limit's error names no checkpoint as the weights to go back to."""
    import torch

    run = tmp_path / "run"
    out = subprocess.run(finetune_cmd(pairs, run, "train.steps=4", "optim.lr=1e39",
                                      "optim.clip_grad=0"),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "non-finite weights" in out.stderr.splitlines()[-1] and "is usable" in out.stderr
    states = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] /
                        "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not all(torch.isfinite(v).all() for v in states.values())  # it did diverge
    assert not (run / "checkpoints" / "best").exists()

    # Diverged (steps 2, 3, ... skipped): the error names no NaN checkpoint as the weights to go
    # back to.
    live = tmp_path / "live"
    out = subprocess.run(finetune_cmd(pairs, live, "train.steps=4", "optim.lr=1e39",
                                      "optim.clip_grad=0", "train.eval_interval=2",
                                      "train.max_bad_steps=2"),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "validation: step 2 has non-finite weights: never a candidate for best" in out.stdout
    assert re.fullmatch(r"error: train: \d steps in a row \(up to step \d\) had a non-finite .*; "
                        r"no checkpoint holds finite weights\. Lower optim\.lr .*",
                        out.stderr.splitlines()[-1]), out.stderr[-2000:]
    assert not (live / "checkpoints" / "best").exists()


def test_yaml_key_twice_and_syntax_errors_are_one_line_with_the_line(tmp_path):
    from janus_pretrain.config import load_config

    twice = tmp_path / "twice.yaml"
    twice.write_text("model: tiny\ntrain:\n  steps: 10\noptim:\n  lr: 1.0e-3\ntrain:\n  log_interval: 5\n")
    with pytest.raises(JanusError, match=r"^config: .*twice.yaml is not valid YAML at line 6, "
                                         r"column 1: key 'train' appears twice \(lines 2 and 6\)$"):
        load_config(twice, ["data.train=x", "data.tokenizer=y"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: tiny\ntrain:\n  steps: [10\n")
    with pytest.raises(JanusError, match=r"broken.yaml is not valid YAML at line 4, column 1: "):
        load_config(broken, ["data.train=x", "data.tokenizer=y"])


def test_generate_refuses_an_unwritable_output_before_decoding(tmp_path):
    out = subprocess.run([sys.executable, "-m", "janus_pretrain.cli", "generate", "--checkpoint",
                          str(tmp_path / "never_loaded"), "--mode", "ar", "--output",
                          str(tmp_path / "no" / "such" / "dir" / "out.txt")],
                         cwd=REPO, env=child_env(), input="hi\n", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: generate: cannot write --output {tmp_path}/no/such/dir/out.txt: "
        f"No such file or directory"]


def test_generate_writes_each_chunk_before_decoding_the_next(tmp_path, monkeypatch):
    """Interrupted after its first chunk of WRITE_EVERY batches, generate has written that
    chunk's lines (and decoded the chunk in one call, so it is sorted by length as a whole)."""
    from janus_pretrain.generate import api, cli
    from janus_pretrain.parallel import state

    class Stops:
        calls = 0

        def generate(self, sources, **_):
            Stops.calls += 1
            if Stops.calls == 2:
                raise KeyboardInterrupt
            return [s.upper() for s in sources]

    monkeypatch.setattr(api.Generator, "from_checkpoint", staticmethod(lambda path: Stops()))
    monkeypatch.setattr(state, "shutdown", lambda: None)  # the session's process group stays
    chunk = 2 * cli.WRITE_EVERY  # --batch-size 2
    (tmp_path / "in.txt").write_text("".join(f"line {i}\n" for i in range(chunk + 3)))
    parser = __import__("argparse").ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--checkpoint", str(tmp_path), "--input",
                              str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"),
                              "--batch-size", "2"])
    with pytest.raises(KeyboardInterrupt):
        cli.run(args)
    assert (tmp_path / "out.txt").read_text() == "".join(f"LINE {i}\n" for i in range(chunk))



def test_a_second_training_into_a_locked_directory_is_refused(tmp_path, shards_dir, tokenizer_path):
    from janus_pretrain.train.run_lock import lock_run_directory

    run = tmp_path / "run"
    held = lock_run_directory(run)  # as a running training's rank 0 holds it
    try:
        with pytest.raises(JanusError, match=f"in use by another training \\(pid {os.getpid()} on "):
            lock_run_directory(run)
        result = subprocess.run(
            [sys.executable, "-m", "janus_pretrain.cli", "train", "--config",
             str(REPO / "configs" / "pretrain" / "demo.yaml"),
             "model=tiny", f"train.output_dir={run}",  # refused before any training
             f"data.train={shards_dir}", f"data.tokenizer={tokenizer_path}"],
            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    finally:
        held.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"error: train: {run} is in use by another training (pid {os.getpid()} on "
        f"{os.uname().nodename}): wait for it to end, or choose another train.output_dir"]
    assert not (run / "checkpoints").exists()
    lock_run_directory(run).close()  # free again once the holder is gone


# --- 8. W&B: a resumed run continues the same run ------------------------------------------------

def offline_history(run_dir) -> list[int]:
    """The steps whose history an offline W&B run's .wandb file holds, once the run's exit
    record is there (wandb's core process may still be writing after `finish` returns). The file
    is a LevelDB log (7-byte ":W&B" header, 32 KiB blocks of records: crc32c, length, type, then
    the bytes) of protobuf Records; wandb 0.31 reads it in its Go core only, so it is parsed here."""
    import struct
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + 60
    while True:
        data = next(run_dir.glob("*.wandb")).read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pending, kinds, steps = 7, 32768, b"", [], []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little room left for a header: the block is padded
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):  # a record still being written
                break
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                kinds.append(record.WhichOneof("record_type"))
                if kinds[-1] == "history":
                    steps.append(record.history.step.num)
        if "exit" in kinds:
            return steps
        assert time.monotonic() < deadline, f"{run_dir}: no exit record"
        time.sleep(0.2)


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from conftest import read_metrics
    from janus_pretrain.train.metrics import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")

    def invocation(start_step: int, steps: range) -> None:
        logger = RunLogger(True, tmp_path, 10, start_step, 1, 1.0, "test", None, {})
        for step in steps:
            logger.write_eval(step, {"eval/loss": float(step)})
        logger.close()

    invocation(0, range(1, 5))  # killed after logging step 4; its checkpoint is step 2
    invocation(2, range(3, 7))  # resumed from step 2
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
    assert offline_history(runs[0]) == [1, 2, 3, 4]
    assert offline_history(runs[1]) == [5, 6]  # W&B keeps steps 3 and 4 as first logged
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    invocation(0, range(1, 2))  # a fresh run (no checkpoint to resume) is a new W&B run
    assert (tmp_path / "wandb_run_id").read_text().strip() != run_id

    # Killed after logging step 4, none of its steps having left the process (its .wandb file
    # held only its header: W&B disabled stands for that), resumed from its checkpoint at step 2:
    # the resumed run sends steps 1 and 2 again from metrics.jsonl, then every step it runs.
    killed = tmp_path / "killed"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    dead = RunLogger(True, killed, 10, 0, 1, 1.0, "test", None, {})
    for step in range(1, 5):
        dead.write_eval(step, {"eval/loss": float(step)})
    monkeypatch.setenv("WANDB_MODE", "offline")  # no `close`: what a SIGKILL leaves
    resumed = RunLogger(True, killed, 10, 2, 1, 1.0, "test", None, {})
    for step in range(3, 7):
        resumed.write_eval(step, {"eval/loss": float(step)})
    resumed.close()
    assert offline_history(next((killed / "wandb").glob("offline-run-*"))) == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]


# --- 7. messages that pointed the wrong way ------------------------------------------------------

def test_finetune_data_not_prepared_says_prepare(tmp_path):
    from finetune.pairs import data_overrides
    from finetune.tasks import get_task

    with pytest.raises(JanusError, match=f"run `janus-finetune prepare --task multi30k_ende "
                                         f"--output {tmp_path}` first"):
        data_overrides(get_task("multi30k_ende"), tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"x" * 1_000_000 + b"\n"])
def test_tokenizer_without_a_usable_line_says_why(tmp_path, content):
    from janus_pretrain.tokenizer import train_tokenizer

    text = tmp_path / "corpus.txt"
    text.write_bytes(content)
    with pytest.raises(JanusError, match=f"tokenizer: {text}: no line to train on"):
        train_tokenizer([text], tmp_path / "tok.model", 100)


def test_data_prepare_on_an_empty_file_says_empty(tmp_path):
    from janus_pretrain.data.prepare import plan_tasks

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(JanusError, match=f"data: {empty}: empty, nothing to prepare"):
        plan_tasks([str(empty)], tmp_path / "out", 1, "text")


def test_prepare_max_pairs_zero_is_refused_before_writing(tmp_path):
    from finetune.pairs import prepare_pairs
    from finetune.tasks import get_task

    with pytest.raises(JanusError, match="--max-pairs must be at least 1, not 0"):
        prepare_pairs(get_task("multi30k_ende"), tmp_path / "out", max_pairs=0)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_in_data_prepare_is_one_line_and_removes_what_it_wrote(
        tmp_path, tokenizer_path, monkeypatch, capsys):
    """ENOSPC writing a shard: one line naming the output; the files the prepare wrote are
    gone, the user's own are not."""
    import errno

    from janus_pretrain import cli
    from janus_pretrain.data import shards

    def fills_the_disk(self, kind, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "_write", fills_the_disk)
    (tmp_path / "in.txt").write_text("a first document\na second one\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "prepare", "--input", str(tmp_path / "in.txt"), "--tokenizer",
                  str(tokenizer_path), "--output", str(out), "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: data: no space left on the device to write {out}: " + err.split(f"{out}: ")[-1]
        .splitlines()[0]]
    assert [p.name for p in out.iterdir() if p.is_file()] == ["notes.txt"]


def test_a_stop_signal_during_select_asks_for_a_requeue(tmp_path, monkeypatch, capsys):
    """SIGTERM while `select` runs after fine-tuning: exit 75 with its line (it was a silent
    143). The test's own handler stands for the default action, which would end pytest."""
    import janus_pretrain.train.loop as loop
    from janus_pretrain.parallel import state
    from janus_pretrain.train.loop import TrainResult
    from finetune import cli

    unhandled = []
    previous = signal.signal(signal.SIGTERM, lambda *a: unhandled.append(1))
    monkeypatch.setattr(state, "shutdown", lambda: None)
    monkeypatch.setattr(loop, "train", lambda cfg, resume, task_eval: TrainResult(0, 0, 7, "ckpt"))
    monkeypatch.setattr(cli, "_select", lambda *a: os.kill(os.getpid(), signal.SIGTERM) or
                        time.sleep(5))
    for side in ("source", "target"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "meta.json").write_text("{}")
    try:
        with pytest.raises(SystemExit) as stopped:  # overrides on both sides of an option
            cli.main(["train", "--task", "multi30k_ende", "--data", str(tmp_path),
                      "train.steps=7", "--config", "configs/finetune/janus.yaml",
                      f"train.output_dir={tmp_path / 'run'}"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 75 and unhandled == []
    assert "select: stopped by SIGTERM; exit status 75 asks for a requeue" in capsys.readouterr().out
