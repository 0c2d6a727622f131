"""Training checkpoints: save, find and resume around DeepSpeed's own save/load (files.py).

Every rank copies its state to host memory and writes it into a staging directory (atomic.py),
hashing and fsyncing its own files, in a background thread or before `save` returns
(background.py); when every rank has reported its files, rank 0 publishes the directory with its
marker, then replaces `latest` and prunes old checkpoints. Resuming takes the newest directory
that has its marker (not `latest`, which a crash between rename and update could leave one
behind), warns about those without one, and verifies the checksums before DeepSpeed reads a byte.

Test hooks: with JANUS_TEST_KILL_IN_SAVE=<step>, rank 0 SIGKILLs itself while saving that step,
after DeepSpeed's files and before janus.json and the marker (tests/test_fault_tolerance.py);
with JANUS_TEST_KILL_AFTER_SAVE=<step>, the last rank SIGKILLs itself after saving that step
(complete, with train.async_save=false), in a run that did not resume (tests/test_slurm.py: a
rank lost mid-run).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_pretrain import disk_space
from janus_pretrain.checkpoint import atomic, background, finite, unpickle
from janus_pretrain.checkpoint.files import (CHECKPOINTS, CORRUPT_SUFFIX, LATEST, MARKER, META,
                                              STEP, TMP_PREFIX, rng_file, step_name)
from janus_pretrain.config import resume_difference
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import Tokenizer, load_tokenizer

KILL_IN_SAVE = "JANUS_TEST_KILL_IN_SAVE"
KILL_AFTER_SAVE = "JANUS_TEST_KILL_AFTER_SAVE"


def _share(items: list, rank: int, world: int) -> list:
    """This rank's slice of a list that every rank holds in the same order."""
    return items[rank::world]


def _gather(local: list) -> list:
    """Concatenate every rank's list (a collective)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


# What np.random.get_state() pickles as, beyond plain values: allowed in RNG files.
_NUMPY_STATE = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.empty(0).__reduce__()[0]]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def save(engine, root: Path, step: int, client_state: dict, tokenizer: Tokenizer,
         keep: int, writer: Optional[background.Writer] = None, inline: bool = True) -> Path:
    """Collective: every rank calls it. Keeps the newest `keep` checkpoints; returns the new one.

    Training waits only while the state is copied to host memory; `writer` writes, hashes and
    publishes it: in its thread unless `inline` (then the checkpoint is complete once rank 0's
    writer is done), else before this returns (background.py)."""
    from janus_pretrain.checkpoint import relayout  # DeepSpeed: training only, not decoding

    writer = writer or background.Writer(background=False)
    writer.wait()  # at most one save in flight
    rank, world = dist.get_rank(), dist.get_world_size()
    final = root / step_name(step)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    if rank == 0:
        atomic.staging(final)
    dist.barrier()
    rng = rng_state()
    with background.host_snapshot(engine, writer.buffers) as states:
        engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    zipfile = getattr(engine.checkpoint_engine, "zipfile_serialization", False)
    healthy = finite.weights_finite(engine.module)  # collective; never `best` when False
    texts = {}
    if rank == 0:
        meta = {"step": step, **client_state, finite.RECORD: healthy,
                "layout": relayout.of_engine(engine).as_dict()}
        texts = {META: json.dumps(meta, indent=2).encode(),
                 tokenizer.filename: tokenizer.model_bytes()}

    def write() -> None:
        try:
            torch.save(rng, tmp / rng_file(rank))
            background.save_states(states, zipfile)
            if rank == 0 and os.environ.get(KILL_IN_SAVE) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            for name, data in texts.items():
                (tmp / name).write_bytes(data)
            mine = [rng_file(rank), *texts, *(str(Path(p).relative_to(tmp)) for p in states)]
            sums = {name: atomic.sha256(tmp / name, sync=True) for name in mine}
        except BaseException as e:
            background.report_failed(tmp, rank, e)
            raise
        background.report_written(tmp, rank, sums)
        if rank == 0:
            sums = background.gather_written(tmp, world)
            # What no rank wrote itself (DeepSpeed's recovery script) is hashed here.
            sums.update({f: atomic.sha256(tmp / f, sync=True) for f in atomic.files(tmp)
                         if f not in sums})
            atomic.publish(tmp, final, sums, step=step)
            atomic.write_text(root / LATEST, final.name)
            _prune(root, keep)

    if writer.run(write, inline):
        dist.barrier()
    return final


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Step directories that are or were meant to become checkpoints, newest step first."""
    found = [(int(m.group(1)), p) for p in root.glob("*step_*")
             if p.is_dir() and (m := STEP.fullmatch(p.name.removeprefix(TMP_PREFIX)))]
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def complete(root: Path) -> list[Path]:
    """Complete step directories under `root`, newest first."""
    if not root.is_dir():
        return []
    return [p for p in _checkpoint_dirs(root) if not p.name.startswith(".") and (p / MARKER).is_file()]


def newer_than(root: Path, checkpoint: Path) -> list[Path]:
    """Step directories under `root` (complete or not) of a later step than `checkpoint`."""
    dirs = _checkpoint_dirs(root)
    return dirs[:dirs.index(checkpoint)] if checkpoint in dirs else dirs


def warn_incomplete(paths: list[Path]) -> None:
    """One line for each of `paths` without its marker: a save that was interrupted, never
    skipped without a word."""
    for path in paths:
        if not (path / MARKER).is_file():
            _warn(f"checkpoint: ignoring {path}: no {MARKER} marker (its save was interrupted)")


def _prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and interrupted saves. The marker
    goes first, so a crash half way through leaves an ignored directory, never a bad "complete" one."""
    doomed = complete(root)[keep:]
    doomed += [p for p in _checkpoint_dirs(root) if not (p / MARKER).is_file()]
    for path in doomed:
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)


def verify(path: Path) -> list[str]:
    """Collective: the files of checkpoint `path` that are missing or fail their sha256."""
    try:
        manifest = json.loads((path / MARKER).read_text())["sha256"]
        names = sorted(manifest) if isinstance(manifest, dict) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        names = None
    if names is None:  # a marker that does not parse: a corrupt checkpoint, never unchecked
        return [MARKER]
    mine = [n for n in _share(names, dist.get_rank(), dist.get_world_size())
            if not (path / n).is_file() or atomic.sha256(path / n) != manifest[n]]
    return sorted(_gather(mine))


def set_aside(path: Path) -> Path:
    """Collective: rename a checkpoint that failed verification to `<name>.corrupt` (rank 0),
    a name no step directory matches, so resuming, decoding and pruning never choose it again
    and the user still has its files."""
    aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}")
    n = 1
    while aside.exists():  # the same step corrupt twice (saved again after a fallback)
        aside, n = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}"), n + 1
    if dist.get_rank() == 0:
        os.replace(path, aside)
        atomic.fsync_dir(path.parent)
    dist.barrier()
    return aside


def find_resumable(root: Path, fallback: bool) -> Optional[Path]:
    """Collective: the newest complete checkpoint whose files pass their checksums, or None when
    there is no checkpoint. A corrupt one is an error unless `fallback` allows the previous one;
    then it is set aside (`set_aside`), so the next resume does not meet it again."""
    if not root.is_dir():
        return None
    warn_incomplete(_checkpoint_dirs(root))
    candidates = complete(root)
    for path in candidates:
        bad = verify(path)
        if not bad:
            return path
        problem = (f"checkpoint: {path / MARKER} is corrupt (not a manifest of sha256 sums)"
                   if bad == [MARKER] else
                   f"checkpoint: {path / bad[0]} is missing or corrupt (sha256 differs from {MARKER})")
        if not fallback:
            raise JanusError(f"{problem}; set train.resume_fallback=true to resume from the "
                             f"previous complete checkpoint instead")
        aside = set_aside(path)
        _warn(f"{problem}; set aside as {aside.name}, falling back to the previous complete "
              f"checkpoint")
    if candidates:
        raise JanusError(f"checkpoint: no intact checkpoint left under {root}")
    return None


def check_tokenizer(checkpoint: Path, tokenizer: Tokenizer) -> None:
    """A checkpoint's embedding rows only mean something with the tokenizer it was trained with:
    the same pieces (`Tokenizer.identity`), whatever the bytes of the file."""
    require_same_tokenizer(load_tokenizer(checkpoint), tokenizer, checkpoint)


def require_same_tokenizer(saved: Tokenizer, tokenizer: Tokenizer, origin: Path) -> None:
    if saved.identity != tokenizer.identity:
        raise JanusError(f"checkpoint: {origin} was trained with {saved.path} "
                         f"(vocab {saved.vocab_size}), a different tokenizer from "
                         f"{tokenizer.path} (vocab {tokenizer.vocab_size})")


def read_meta(checkpoint: Path) -> dict:
    """janus.json of a step (or model-only) directory: step, loader position, layout, run config."""
    path = checkpoint / META
    if not path.is_file():
        raise JanusError(f"checkpoint: {checkpoint} is not a janus-pretrain checkpoint (no {META})")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise JanusError(f"checkpoint: {path} is corrupt ({e})") from None


def load(engine, path: Path, tokenizer: Tokenizer) -> dict:
    """Collective: restore engine state and this rank's RNG; returns janus.json's contents.
    A checkpoint written at another (TP, DP, ZeRO) layout goes through relayout.py."""
    from janus_pretrain.checkpoint import relayout, slices  # DeepSpeed: training only

    check_tokenizer(path, tokenizer)
    meta = read_meta(path)
    written, here = relayout.recorded(meta), relayout.of_engine(engine)
    if written not in (None, here):
        relayout.load(engine, path, written)
        if dist.get_rank() == 0:
            print(f"checkpoint: resuming from {path}, written at {written}, at {here}", flush=True)
        saved = meta["config"]
        batch = (saved["data"]["micro_batch_size"] * saved["train"]["grad_accum"]
                 * written.data_parallel)
        if batch != engine.train_batch_size():
            _warn(f"checkpoint: the global batch (data.micro_batch_size x train.grad_accum x DP) "
                  f"changes from {batch} to {engine.train_batch_size()}")
        return meta
    loaded = slices.load_own_files(engine, path)
    if loaded is None:
        raise JanusError(f"checkpoint: DeepSpeed could not load {path}")
    if dist.get_rank() == 0:
        print(f"checkpoint: resuming from {path}", flush=True)
    rng = path / rng_file(dist.get_rank())
    if rng.is_file():
        set_rng_state(read_rng_file(rng))
    return meta


def check_resumed_config(checkpoint: Path, saved: dict, run: dict) -> None:
    """A resume continues one run: a changed model shape or objective is one line naming the
    first key that differs (not DeepSpeed's size-mismatch traceback, or a silently different
    run)."""
    changed = resume_difference(saved, run)
    if changed is not None:
        key, old, new = changed
        raise JanusError(f"checkpoint: {checkpoint} was trained with {key}={old}, this run has "
                         f"{key}={new}: resume with the saved value, or start a new "
                         f"train.output_dir from its weights (train.init_from={checkpoint})")


def warn_changed_data(checkpoint: Path, saved: dict, run: dict) -> None:
    """Other training data (with the same tokenizer) is allowed on resume, said in one line."""
    before, now = saved.get("data", {}).get("train"), run["data"]["train"]
    if before is not None and before != now:
        _warn(f"checkpoint: {checkpoint} was trained on data.train={before}, this run reads "
              f"{now}: the loader continues at its saved epoch and batch index in the new data")


def read_rng_file(path: Path) -> dict:
    """An RNG file: tensors, plain values and the arrays of numpy's state."""
    return unpickle.load(path, "an RNG state", _NUMPY_STATE)


class Checkpointer:
    """Owns one run's checkpoints: refuses to overwrite a finished run, resumes, and decides
    when to save: every `save_interval` steps, about every `interval_minutes`, and at the last
    step of an invocation. With `async_save`, a save stalls the step only for its host copy
    (background.py); the last step's save and those of validated steps (`sync_every`, which
    copies them to best) are complete when `after_step` returns."""

    ESTIMATE_STEPS = 10  # steps timed before the first time-based save is planned

    def __init__(self, engine, output_dir: Path, tokenizer: Tokenizer, save_interval: int,
                 keep: int, interval_minutes: Optional[float] = None, async_save: bool = False,
                 sync_every: Optional[int] = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.root = output_dir / CHECKPOINTS
        self.save_interval, self.keep = save_interval, keep
        self.interval_minutes, self.sync_every = interval_minutes, sync_every
        self.writer = background.Writer(background=async_save)
        self.last: Optional[Path] = None
        self.resumed = False
        self._clock: Optional[tuple[int, float]] = None  # (step, time) the step time is timed from
        self._estimate_at = self._due_step = None

    def start(self, resume: bool, fallback: bool, config: Optional[dict] = None
              ) -> Optional[dict]:
        """Collective: janus.json of the checkpoint resumed from, or None for a fresh run.
        `config` (config.to_dict) is the run's, checked against the checkpoint's first."""
        if not resume:
            if complete(self.root):
                raise JanusError(f"train: {self.root.parent} already holds checkpoints: pass "
                                 f"--resume to continue, or choose another train.output_dir")
            return None
        found = find_resumable(self.root, fallback)
        if found is None:
            return None
        saved = read_meta(found).get("config", {})
        if config is not None:
            check_resumed_config(found, saved, config)
        meta = load(self.engine, found, self.tokenizer)
        if config is not None:
            warn_changed_data(found, saved, config)
        self.last, self.resumed = found, True  # the run's checkpoint until this one saves one
        return meta

    def after_step(self, step: int, done: bool, client_state) -> None:
        """Collective; `client_state()` builds what janus.json holds besides the step."""
        due = step % self.save_interval == 0 or done or step == self._due_step
        if due:
            inline = done or bool(self.sync_every and step % self.sync_every == 0)
            # A full disk (ENOSPC, or torch's errno-less "iostream error" with less free than
            # a checkpoint takes): the partial save is removed, so it holds no space, and the
            # error is one line. The previous checkpoints are intact.
            partial = self.root / f"{TMP_PREFIX}{step_name(step)}"
            with disk_space.one_line("checkpoint", self.root / step_name(step),
                                     lambda: self._space_needed(partial),
                                     lambda: shutil.rmtree(partial, ignore_errors=True)):
                self.last = save(self.engine, self.root, step, client_state(), self.tokenizer,
                                 self.keep, self.writer, inline)
            if (os.environ.get(KILL_AFTER_SAVE) == str(step) and not self.resumed
                    and dist.get_rank() == dist.get_world_size() - 1):
                os.kill(os.getpid(), signal.SIGKILL)
        if self.interval_minutes is not None:
            if self._clock is None:
                self._clock = (step, time.monotonic())
                self._estimate_at = step + self.ESTIMATE_STEPS
            elif due or step == self._estimate_at:
                self._due_step = self._next_timed_save(step)

    def _space_needed(self, partial: Path) -> tuple[int, bool]:
        """What a checkpoint takes: the newest one's size, or more than the partial one's."""
        previous = complete(self.root)
        return disk_space.bytes_under(previous[0] if previous else partial), not previous

    def _next_timed_save(self, step: int) -> int:
        """Collective (at a step every rank knows): the step of the next time-based save, from
        rank 0's mean step time since the last estimate, so that every rank agrees on it."""
        first, then = self._clock
        now = time.monotonic()
        seconds = (now - then) / (step - first)
        due = [step + max(1, round(self.interval_minutes * 60 / seconds))]
        dist.broadcast_object_list(due, src=0)
        self._clock = (step, now)
        return due[0]
