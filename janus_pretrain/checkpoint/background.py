"""Saves off the critical path: the state snapshotted to host memory, written by a thread.

A save stalls training only while DeepSpeed's state dicts are copied to host memory
(`host_snapshot`: its checkpoint engine keeps a copy, in buffers reused from save to save,
instead of writing). A `Writer` thread then
writes them, hashes and fsyncs every file, and the ranks meet through files instead of
collectives, which a thread beside the training's own would interleave with them: each rank
leaves `.written-RRRRR` (the sha256 of its files) in the staging directory, and rank 0, once every
rank's is there, writes the marker and renames the directory into place (atomic.publish). So
COMPLETE is still written last, a kill at any point leaves the previous checkpoint the newest
complete one, and at most one save is in flight (the next waits for this rank's writer first).
As in Megatron's async checkpoints and torchtitan's async_mode, only the copy is synchronous.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from janus_pretrain.checkpoint import atomic
from janus_pretrain.errors import JanusError

WRITTEN = ".written-"  # + rank: a rank's files are on disk; their sums inside
FAILED = ".failed-"    # + rank: a rank's writer failed; the reason inside


def copy_to_host(item, buffers: dict, key: tuple):
    """`item` (tensors in nested dicts, lists, tuples) with every tensor copied into a host
    buffer of `buffers`, reused from the previous save where the same key has the same shape:
    fresh host memory for every save would fault every page in again, which costs as much as
    the copy (pinned when CUDA is present, so the device-to-host copies run at full speed)."""
    if torch.is_tensor(item):
        buf = buffers.get(key)
        if buf is None or buf.shape != item.shape or buf.dtype != item.dtype:
            buf = torch.empty(item.shape, dtype=item.dtype, device="cpu",
                              pin_memory=torch.cuda.is_available())
            buffers[key] = buf
        return buf.copy_(item.detach())
    if isinstance(item, dict):
        return type(item)((k, copy_to_host(v, buffers, (*key, k))) for k, v in item.items())
    if isinstance(item, (list, tuple)):
        return type(item)(copy_to_host(v, buffers, (*key, i)) for i, v in enumerate(item))
    return item


class _HostCopies:
    """A DeepSpeed checkpoint engine that keeps a host copy of each state dict it is asked to
    save ({path: state}); loading and everything else is the wrapped engine's."""

    def __init__(self, inner, buffers: dict):
        self.inner, self.buffers = inner, buffers
        self.copies: dict[str, object] = {}

    def save(self, state_dict, path: str) -> None:
        self.copies[path] = copy_to_host(state_dict, self.buffers, (Path(path).name,))

    def preserves_storage_sharing(self) -> bool:
        return False  # save() copies each tensor already: DeepSpeed need not clone first

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextmanager
def checkpoint_engine(engine, wrapped):
    """Within the block, DeepSpeed saves and loads through `wrapped` (which wraps the engine's
    own checkpoint engine, its `inner`); the yield is `wrapped`."""
    engine.checkpoint_engine = wrapped
    try:
        yield wrapped
    finally:
        engine.checkpoint_engine = wrapped.inner


@contextmanager
def host_snapshot(engine, buffers: dict) -> Iterator[dict[str, object]]:
    """Within the block, engine.save_checkpoint fills the yielded {path: state} with host copies
    (in `buffers`, see `copy_to_host`) of what it would have written, and writes nothing but
    directories (and its recovery script)."""
    with checkpoint_engine(engine, _HostCopies(engine.checkpoint_engine, buffers)) as copies:
        yield copies.copies


def save_states(states: dict[str, object], zipfile: bool) -> None:
    """Write host copies as DeepSpeed's torch engine would (`zipfile`: its serialization)."""
    for path, state in states.items():
        torch.save(state, path, _use_new_zipfile_serialization=zipfile)


def report_written(tmp: Path, rank: int, sums: dict[str, str]) -> None:
    atomic.write_text(tmp / f"{WRITTEN}{rank:05d}", json.dumps(sums))


def report_failed(tmp: Path, rank: int, error: BaseException) -> None:
    atomic.write_text(tmp / f"{FAILED}{rank:05d}", f"{type(error).__name__}: {error}")


def gather_written(tmp: Path, world: int, poll: float = 0.05) -> dict[str, str]:
    """Rank 0's writer: wait until every rank has reported its files, then remove the reports
    and return all their sums; a rank's reported failure is raised."""
    reports = [tmp / f"{WRITTEN}{r:05d}" for r in range(world)]
    while not all(p.is_file() for p in reports):
        failed = sorted(tmp.glob(f"{FAILED}*"))
        if failed:
            raise JanusError(f"checkpoint: saving {tmp.name} failed on rank "
                             f"{int(failed[0].name[len(FAILED):])}: {failed[0].read_text()}")
        time.sleep(poll)
    sums = {}
    for path in reports:
        sums.update(json.loads(path.read_text()))
        path.unlink()
    return sums


class Writer:
    """Runs one save job at a time: in a daemon thread (`background`), else inline. A job's
    error is raised by the next `wait` (the next save, or the end of the run)."""

    def __init__(self, background: bool):
        self.background = background
        # The host copies of the save in flight, reused by the next (`copy_to_host`): one more
        # copy of the rank's state in host memory for the run's life.
        self.buffers: dict = {}
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def run(self, job: Callable[[], None], inline: bool = False) -> bool:
        """Start `job` once the previous one is done; returns whether it ran inline (done)."""
        self.wait()
        if inline or not self.background:
            job()
            return True
        self._thread = threading.Thread(target=self._run, args=(job,), name="janus-checkpoint",
                                        daemon=True)
        self._thread.start()
        return False

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until this rank's job in flight (if any) is done; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
