"""Shared fixtures: a small real corpus (enwiki lines from ../shared/data), a tokenizer trained
on it, and shards prepared from it, built once per test session."""
from __future__ import annotations

import concurrent.futures.thread
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# The property tests draw the same examples on every run, so that a run fails for a change and
# never for a new random draw (a fresh draw once found `model=\n` printed on two lines, after the
# code had passed many runs); HYPOTHESIS_PROFILE=explore draws new examples to look for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ENWIKI = SHARED_DATA / "pretrain" / "enwiki" / "train.txt"
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first 3000 non-empty paragraphs of the enwiki training text."""
    if not ENWIKI.is_file():
        pytest.fail(f"test data missing: {ENWIKI} (see ../shared/data/README.md)")
    lines = []
    with open(ENWIKI, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            if len(lines) == 3000:
                break
    path = tmp_path_factory.mktemp("corpus") / "enwiki_3k.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(corpus_file, tmp_path_factory) -> Path:
    from janus_pretrain.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer([corpus_file], out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def shards_dir(corpus_file, tokenizer_path, tmp_path_factory) -> Path:
    from janus_pretrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare([str(corpus_file)], str(tokenizer_path), out, num_workers=2)
    return out


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed (gloo, world of one) and megatron-core's groups for in-process model tests."""
    from janus_pretrain.parallel import state

    with rendezvous_env_restored():
        topo = state.initialize(1)
    yield topo
    state.shutdown()


@contextlib.contextmanager
def rendezvous_env_restored():
    """state.initialize exports RANK, MASTER_PORT, ...: keep them from leaking into the
    environment of processes that later tests start (they would bind the same port)."""
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_overrides(shards_dir: Path, tokenizer_path: Path, output: Path) -> list[str]:
    return [
        "model=tiny", f"data.train={shards_dir}", f"data.tokenizer={tokenizer_path}",
        "data.max_source_len=64", "data.max_target_len=64", "data.micro_batch_size=4",
        "optim.lr=1e-3", "optim.warmup_steps=2", "train.log_interval=1",
        "train.save_interval=1000", f"train.output_dir={output}",
    ]


@pytest.fixture(scope="session")
def launch_training(shards_dir, tokenizer_path):
    """Run `janus-pretrain train` as one process, or `nproc` under torchrun (gloo, a free port).

    Returns the CompletedProcess; every process started is killed on timeout."""
    from janus_pretrain.parallel.state import free_port

    def run(output: Path, nproc: int = 1, extra: tuple[str, ...] = (), resume: bool = False,
            timeout: int = 300, base: bool = True) -> subprocess.CompletedProcess:
        args = _train_overrides(shards_dir, tokenizer_path, output) if base else []
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                         f"--master_port={free_port()}"]
        cmd = [*launcher, "-m", "janus_pretrain.cli", "train",
               "--config", str(REPO / "configs" / "pretrain" / "demo.yaml"),
               *(["--resume"] if resume else []), *args, *extra]
        return run_killable(cmd, timeout, "training")

    return run


@pytest.fixture(scope="session")
def trained_run(launch_training, tmp_path_factory):
    """A run directory holding a 2-step checkpoint of the demo objective (both modes)."""
    run = tmp_path_factory.mktemp("generate") / "run"
    result = launch_training(run, nproc=1, extra=("train.steps=2",
                                                  "parallel.deepspeed_config=configs/deepspeed/zero0.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def child_env() -> dict:
    """The environment for a child job: one thread, W&B offline, and neither this process's
    rendezvous (`single_process` exports RANK, MASTER_PORT, ...) nor its W&B service."""
    # WANDB_SERVICE: an in-process W&B test leaves this process's wandb-core in the environment;
    # a child sharing it finds a SIGKILLed sibling's run ID still "in use" there on resume.
    env = {k: v for k, v in os.environ.items() if k not in (*DIST_VARS, "WANDB_SERVICE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def run_killable(cmd: list, timeout: int, what: str):
    """Run `cmd` from the repository root in its own process group; on timeout kill the whole
    group and fail the test."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def multi30k_slice(data_root: Path, train: int, valid: int, test: int) -> Path:
    """The first lines of the shipped Multi30k splits under a data root of a test's own (so that
    `janus-finetune` steps stay small); returns the data root."""
    root = data_root / "nmt" / "multi30k"
    root.mkdir(parents=True)
    for stem, n in (("train", train), ("val", valid), ("test_2016_flickr", test)):
        for lang in ("en", "de"):
            lines = (SHARED_DATA / "nmt" / "multi30k" / f"{stem}.{lang}").read_text(
                encoding="utf-8").splitlines()[:n]
            (root / f"{stem}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_root


def read_metrics(output: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def write_checkpoint(target, source_dir, model, poison: bool = False):
    """`model`'s weights as a model-only checkpoint at `target` (NaN in one weight if `poison`)."""
    from janus_pretrain.checkpoint import weights

    tensors = {k: v.clone() for k, v in weights.model_tensors(model).items()}
    if poison:
        next(v for v in tensors.values() if v.is_floating_point())[0] = float("nan")
    return weights.write_model_checkpoint(source_dir, [tensors], target)


@pytest.fixture
def tiny_model_source(tmp_path, tokenizer_path, single_process):
    """(a directory holding a tiny config's janus.json and the tokenizer, a random tiny model)."""
    import json

    import torch

    from janus_pretrain.config import load_config, to_dict
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD, load_tokenizer

    cfg = load_config(REPO / "configs" / "pretrain" / "demo.yaml",
                      ["model=tiny", "data.max_source_len=32", "data.max_target_len=32"])
    tok = load_tokenizer(tokenizer_path)
    source = tmp_path / "source"
    source.mkdir()
    (source / "janus.json").write_text(json.dumps({"config": to_dict(cfg)}))
    (source / tok.filename).write_bytes(tok.model_bytes())
    torch.manual_seed(0)
    return source, JanusModel(cfg.model, tok.vocab_size, PAD)


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # one flipped byte: torch would load it, with one wrong weight
        path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) +
                         data[len(data) // 2 + 1:])


LEFTOVER_GRACE_S = 30  # what a test left behind may take to end by itself
LEFTOVERS = pytest.StashKey[str]()


def pytest_sessionfinish(session, exitstatus):
    """A test that leaves a process or a non-daemon thread behind fails the session, and the
    processes are killed: at exit, Python joins both and would wait forever on one that does not
    end (a collating worker ignores SIGTERM), so CI would time out instead of failing. What is
    still ending gets LEFTOVER_GRACE_S; the report is printed last (pytest_unconfigure), where
    the tail of a CI log shows it."""
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    for thread in _non_daemon_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    children, threads = multiprocessing.active_children(), _non_daemon_threads()
    if not (children or threads):
        return
    frames = sys._current_frames()
    report = ["tests left behind (the session fails):"]
    for child in children:
        report.append(f"  process {child.name} pid {child.pid}: {_cmdline(child.pid)}")
        child.kill()
        child.join()
    for thread in threads:
        frame = frames.get(thread.ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        report.append(f"  thread {thread.name!r} ({type(thread).__module__}."
                      f"{type(thread).__qualname__}), at:\n{stack}")
    session.config.stash[LEFTOVERS] = "\n".join(report)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    report = config.stash.get(LEFTOVERS, None)
    if report:
        sys.stderr.write(f"\n{report}\n")


def _non_daemon_threads() -> list[threading.Thread]:
    """Threads that Python's exit would join forever. A ThreadPoolExecutor's workers are not
    among them: concurrent.futures' own exit hook wakes and joins them first (torch.compile
    leaves one such pool when its cache is cold, as on CI's fresh machine)."""
    pool_workers = set(concurrent.futures.thread._threads_queues)
    return [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()
            and t not in pool_workers]


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace")
