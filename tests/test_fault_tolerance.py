"""Faults injected on purpose: a crash while a checkpoint is written, corrupted checkpoint files,
losses and gradients forced to NaN, corrupt shards, undecodable corpora and configs that cannot
work. Each must end in a resumable state or in one clear error line, never in silently wrong
training. (SIGTERM mid-run on two ranks is in test_distributed.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics, rendezvous_env_restored
from hypothesis import example, given, settings
from hypothesis import strategies as st

from janus_pretrain.config import load_config
from janus_pretrain.data.shards import ShardedCorpus, token_dtype, verify_corpus, write_shard
from janus_pretrain.errors import JanusError
from janus_pretrain.checkpoint import store as checkpoint

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def assert_one_line(error: JanusError, *needles) -> None:
    msg = str(error)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)


# --- signals ------------------------------------------------------------------------------------

def test_stop_request_flags_signals_and_a_second_ctrl_c_kills():
    from janus_pretrain.train.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    # Not necessarily Python's default_int_handler: a shell starts background jobs with SIGINT ignored.
    before_int = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1  # the first one is reported
    assert signal.getsignal(signal.SIGTERM) is before
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next Ctrl-C ends the process
    assert signal.getsignal(signal.SIGINT) is before_int


# --- checkpoints --------------------------------------------------------------------------------

def test_kill_while_saving_resumes_from_previous_checkpoint(launch_training, tmp_path,
                                                            single_process, capsys, monkeypatch):
    """The save of step 3 is a background one (train.async_save, not the run's last step): the
    kill lands in its writer thread, after DeepSpeed's files and before janus.json and COMPLETE,
    while training goes on; step 2 stays the newest complete checkpoint."""
    out = tmp_path / "run"
    common = ("train.steps=4", "train.save_interval=1")
    monkeypatch.setenv(checkpoint.KILL_IN_SAVE, "3")
    crashed = launch_training(out, extra=common)
    monkeypatch.delenv(checkpoint.KILL_IN_SAVE)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / ".tmp-step_00000003").is_dir()
    assert not (root / ".tmp-step_00000003" / checkpoint.MARKER).exists()

    resumed = launch_training(out, extra=common, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ignoring {root / '.tmp-step_00000003'}: no COMPLETE marker" in resumed.stderr
    assert f"resuming from {root / 'step_00000002'}" in resumed.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]  # each logged once
    assert not (root / ".tmp-step_00000003").exists()
    assert [p.name for p in checkpoint.complete(root)] == [
        "step_00000004", "step_00000003", "step_00000002"]

    # A flipped byte in the newest checkpoint: an error that names the file, unless the run
    # asks to fall back, which then takes the previous checkpoint and says why.
    model = root / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(JanusError) as info:
        checkpoint.find_resumable(root, fallback=False)
    assert_one_line(info.value, model, "train.resume_fallback")
    capsys.readouterr()
    assert checkpoint.find_resumable(root, fallback=True) == root / "step_00000003"
    assert f"{model} is missing or corrupt" in capsys.readouterr().err
    (root / "step_00000003" / "janus.json").unlink()
    (root / "step_00000002" / checkpoint.MARKER).unlink()
    with pytest.raises(JanusError, match="no intact checkpoint"):
        checkpoint.find_resumable(root, fallback=True)


# --- numerical faults ---------------------------------------------------------------------------

class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def saved_state(step_dir: Path) -> list[torch.Tensor]:
    """Weights and optimizer state of a checkpoint, as a flat list of tensors."""
    states = [torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)]
    states[0] = {"module": states[0]["module"], "optimizer": states[0]["optimizer"]}
    states += [torch.load(p, weights_only=False)["optimizer_state_dict"]
               for p in sorted(step_dir.glob("zero_pp_rank_*_optim_states.pt"))]
    found = []

    def walk(x):
        if torch.is_tensor(x):
            found.append(x)
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)

    walk(states)
    return found


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("zero,precision", [("zero0", "fp32"), ("zero2", "fp32"), ("zero1", "bf16"),
                                            ("zero0", "bf16")])
def test_nonfinite_steps_are_skipped_then_stop(zero, precision, shards_dir, tokenizer_path,
                                               tmp_path, single_process, monkeypatch):
    from janus_pretrain.objectives.janus import JanusObjective
    from janus_pretrain.train.loop import train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    nan_loss, nan_grad = {2}, {4, 5}  # optimizer steps (one micro-batch each)
    calls = []
    original = JanusObjective.loss

    def poisoned(self, outputs, prep, step=None):
        total, terms = original(self, outputs, prep, step)
        calls.append(1)
        if len(calls) in nan_loss:
            total = total * float("nan")
        if len(calls) in nan_grad:
            total = NaNGradient.apply(total)
        return total, terms

    monkeypatch.setattr(JanusObjective, "loss", poisoned)
    out = tmp_path / "run"
    cfg = load_config(DEMO, [
        "model=tiny", f"data.train={shards_dir}", f"data.tokenizer={tokenizer_path}",
        "data.max_source_len=64", "data.max_target_len=64", "data.micro_batch_size=4",
        "optim.lr=1e-3", "optim.warmup_steps=2", "train.log_interval=1", "train.save_interval=1",
        "train.keep_checkpoints=10", "train.steps=8", "train.max_bad_steps=2",
        f"train.output_dir={out}", f"parallel.deepspeed_config=configs/deepspeed/{zero}.json",
        f"parallel.precision={precision}"])
    with pytest.raises(JanusError) as info, rendezvous_env_restored():
        train(cfg)
    assert_one_line(info.value, "2 steps in a row (up to step 5)", "step_00000005")

    root = out / "checkpoints"
    state = {step: saved_state(root / f"step_{step:08d}") for step in range(1, 6)}
    assert same(state[1], state[2])  # step 2 (NaN loss) changed nothing
    assert not same(state[2], state[3])  # step 3 trained
    assert same(state[3], state[4]) and same(state[3], state[5])  # NaN gradients: nothing either
    metrics = {m["step"]: m for m in read_metrics(out)}
    assert [metrics[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert metrics[2]["train/lr"] == metrics[1]["train/lr"]  # the LR schedule held
    assert np.isfinite(metrics[3]["train/loss"]) and np.isfinite(metrics[1]["train/loss"])


# --- corrupt shards (property-based) ------------------------------------------------------------

VOCAB = 1000
docs_strategy = st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=12), min_size=1, max_size=12)


def write_corpus(directory: Path, docs: list[list[int]]) -> None:
    entry = write_shard(directory / "shard_00000", docs, token_dtype(VOCAB))
    (directory / "meta.json").write_text(json.dumps({"shards": [entry], "vocab_size": VOCAB}))


@st.composite
def corruptions(draw):
    """(docs, a function that corrupts the written corpus in a way the reader must detect)."""
    docs = draw(docs_strategy)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    kind = draw(st.sampled_from(["truncate", "append", "header", "offset", "id", "meta"]))
    name = draw(st.sampled_from(["shard_00000.idx", "shard_00000.bin"]))
    if kind == "truncate":
        size = 16 + 8 * len(offsets) if name.endswith(".idx") else 2 * int(offsets[-1])
        if size == 0:
            name, size = "shard_00000.idx", 16 + 8 * len(offsets)
        cut = draw(st.integers(1, size))
        return docs, lambda p: (p / name).write_bytes((p / name).read_bytes()[:-cut])
    if kind == "append":
        junk = draw(st.binary(min_size=1, max_size=24))
        return docs, lambda p: (p / name).write_bytes((p / name).read_bytes() + junk)
    if kind == "header":
        pos, xor = draw(st.integers(0, 15)), draw(st.integers(1, 255))
        return docs, lambda p: _xor_byte(p / "shard_00000.idx", pos, xor)
    if kind == "offset" and len(offsets) > 2:
        i = draw(st.integers(0, len(offsets) - 2))  # every offset but the total
        low, high = (offsets[i - 1] if i else 0), offsets[i + 1]
        value = draw(st.one_of(st.integers(-2**40, low - 1), st.integers(high + 1, 2**40)) if i
                     else st.integers(1, 2**40))

        def move(p):
            data = bytearray((p / "shard_00000.idx").read_bytes())
            data[16 + 8 * i:24 + 8 * i] = np.int64(value).tobytes()
            (p / "shard_00000.idx").write_bytes(bytes(data))
        return docs, move
    if kind == "id" and offsets[-1]:
        pos, value = draw(st.integers(0, int(offsets[-1]) - 1)), draw(st.integers(VOCAB, 65535))

        def bad_id(p):
            data = bytearray((p / "shard_00000.bin").read_bytes())
            data[2 * pos:2 * pos + 2] = np.uint16(value).tobytes()
            (p / "shard_00000.bin").write_bytes(bytes(data))
        return docs, bad_id
    field = draw(st.sampled_from(["documents", "tokens", "max_id", "name", "vocab_size"]))

    def bad_meta(p):
        meta = json.loads((p / "meta.json").read_text())
        target = meta if field == "vocab_size" else meta["shards"][0]
        target[field] = draw(st.one_of(st.integers(-5, 10**6), st.text(max_size=5), st.none())
                             .filter(lambda v: v != target[field] and not (
                                 field == "vocab_size" and isinstance(v, int)
                                 and v > max(max(d, default=-1) for d in docs))))
        (p / "meta.json").write_text(json.dumps(meta))
    return docs, bad_meta


def _xor_byte(path: Path, pos: int, xor: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= xor
    path.write_bytes(bytes(data))


@settings(max_examples=150, deadline=None)
@given(corruptions())
def test_corrupt_shards_are_rejected_naming_the_file(tmp_path_factory, case):
    docs, corrupt = case
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(directory, docs)
    corrupt(directory)
    with pytest.raises(JanusError) as info:
        verify_corpus(directory)
    assert_one_line(info.value, directory)
    try:  # what training opens and reads: meta.json, the indexes, the documents it takes
        corpus = ShardedCorpus(directory)
        read = [corpus[i].tolist() for i in range(len(corpus))]
    except JanusError as e:
        assert_one_line(e, directory)
    else:  # what only verify finds is harmless to training (a recorded max_id lowered, say)
        assert read == docs


@settings(max_examples=50, deadline=None)
@given(docs_strategy)
def test_intact_shards_read_back_exactly(tmp_path_factory, docs):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(directory, docs)
    corpus = ShardedCorpus(directory)
    assert [corpus[i].tolist() for i in range(len(corpus))] == docs
    assert corpus.shards[0].max_id == max((max(d) for d in docs if d), default=-1)


def test_prepare_skips_and_counts_empty_and_non_utf8_lines(tmp_path, tokenizer_path):
    from janus_pretrain.data.prepare import prepare
    from janus_pretrain.tokenizer import load_tokenizer

    good = ["The first paragraph.", "Ünïcödé is fine: naïve café.", "The last one."]
    raw = (good[0].encode() + b"\n\n   \n" + b"caf\xe9 in latin-1\n" + good[1].encode() + b"\n"
           + b"\xff\xfe\x00broken\n\t\n" + good[2].encode() + b"\n")
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(raw)
    meta = prepare([str(corpus)], str(tokenizer_path), tmp_path / "shards", num_workers=1)
    assert meta["skipped"] == {"empty": 3, "invalid_utf8": 2}
    shards = ShardedCorpus(tmp_path / "shards")
    assert [shards[i].tolist() for i in range(len(shards))] == load_tokenizer(tokenizer_path).encode(good)


# --- configs that cannot work (property-based, and before any process group) ---------------------

KEYS = ["model.hidden_size", "model.num_heads", "model.dropout", "model.max_positions",
        "data.micro_batch_size", "data.max_target_len", "train.steps", "train.grad_accum",
        "train.keep_checkpoints", "train.max_bad_steps", "train.resume_fallback",
        "train.exit_after", "optim.lr", "optim.decay", "parallel.tensor_parallel",
        "parallel.precision", "objective.masking", "objective.weights.ce_ar", "model",
        "modle.hidden_size", "train", "data..train"]
VALUES = st.one_of(st.integers(-3, 5000).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["true", "null", "[1, 2]", "{a: 1}", "", "tiny", "bf16", "'"]),
                   st.text(max_size=8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
@example([("model.num_heads", "0")])  # found by hypothesis: a ZeroDivisionError
@example([("model.hidden_size", "'")])  # found by hypothesis: YAML's traceback
@example([("model", "\n")])  # found by hypothesis: the preset's name printed raw, on two lines
def test_config_overrides_load_or_fail_in_one_line(pairs):
    try:
        cfg = load_config(DEMO, [f"{k}={v}" for k, v in pairs])
    except JanusError as e:
        assert_one_line(e)
        assert str(e).startswith("config:"), str(e)
    else:
        assert cfg.model.hidden_size % cfg.model.num_heads == 0
        assert cfg.model.num_heads % cfg.parallel.tensor_parallel == 0


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.text(max_size=60).map(str.encode)))
def test_config_files_load_or_fail_in_one_line(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_bytes(content)
    try:
        load_config(path, ["data.train=x", "data.tokenizer=y"])
    except JanusError as e:
        assert_one_line(e)


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.text(max_size=4)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["stage", "zero_optimization", "bf16", "x"]), inner,
                               max_size=3), max_leaves=6)


@settings(max_examples=100, deadline=None)
@given(st.one_of(JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.binary(max_size=30)))
def test_deepspeed_json_is_checked(tmp_path_factory, content):
    from janus_pretrain.train.deepspeed_json import ZERO_STAGES, read_deepspeed_json

    path = tmp_path_factory.mktemp("ds") / "ds.json"
    path.write_bytes(content)
    cfg = load_config(DEMO, [f"parallel.deepspeed_config={path}"])
    try:
        base = read_deepspeed_json(cfg)
    except JanusError as e:
        assert_one_line(e, "parallel.deepspeed_config")
    else:
        assert base.get("zero_optimization", {}).get("stage", 0) in ZERO_STAGES


@pytest.mark.parametrize("override,key", [
    ("parallel.deepspeed_config={ds}", "zero_optimization.stage"),
    ("parallel.tensor_parallel=3", "parallel.tensor_parallel"),
])
def test_bad_config_fails_before_any_process_group(tmp_path, override, key):
    ds = tmp_path / "zero7.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    from janus_pretrain.parallel.state import free_port

    # Rank 0 of 2 with no rank 1: starting a process group here would wait until the timeout.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "janus_pretrain", "train", "--config", str(DEMO),
         override.format(ds=ds), f"train.output_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config:") and key in lines[0], proc.stderr
