"""An epoch's plan (which examples form each global micro-batch) as two flat arrays, and a disk
cache of plans so that one process builds each and the others map it.

`EpochPlan`: batch g is `order[offsets[g]:offsets[g + 1]]`. Flat arrays rather than a list of
per-batch arrays: a plan of 1e9 examples is 4-8 bytes per example in one file that every rank
of a node maps (the page cache holds it once), as Megatron's gpt_dataset.py caches its
document/sample/shuffle indexes as .npy files built by one rank.

`PlanCache`: plans under `<directory>/<key hash>/` (order.npy, offsets.npy, key.json), the key
naming everything a plan depends on (seed, epoch, the corpus's identity, the batching settings,
the data-parallel size). A process that finds no plan takes an exclusive flock on
`<key hash>.lock` and looks again: the first builds and renames the plan into place whole, the
others (ranks of the node, their collation workers, other nodes where the filesystem has
flock) wait on the lock and then map what it built. The kernel drops a dead builder's lock, so a
killed run leaves nothing to clean; where flock is not supported, each process builds for
itself. A builder removes the same run's plans two epochs old.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


class EpochPlan:
    """`plan[g]` is global micro-batch g's example indices as int64; `len(plan)` batches."""

    def __init__(self, order: np.ndarray, offsets: np.ndarray):
        self.order = order
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self):
        return (self[g] for g in range(len(self)))

    def __getitem__(self, g: int) -> np.ndarray:
        if not 0 <= g < len(self):
            raise IndexError(f"batch {g} of {len(self)}")
        return np.asarray(self.order[self.offsets[g]:self.offsets[g + 1]], dtype=np.int64)

    @classmethod
    def from_batches(cls, batches: list[np.ndarray]) -> "EpochPlan":
        sizes = [len(b) for b in batches]
        return cls(np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]
                                  + [np.zeros(0, np.int64)]),
                   np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64))

    def take(self, batches: np.ndarray) -> "EpochPlan":
        """The plan made of batches `batches` (indices into this plan), in that order."""
        offsets = np.asarray(self.offsets)
        sizes = np.diff(offsets)[batches]
        new = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        source = np.repeat(offsets[batches] - new[:-1], sizes) + np.arange(new[-1])
        return EpochPlan(np.asarray(self.order)[source], new)

    def save(self, directory: Path) -> None:
        order = np.asarray(self.order)
        if len(order) and order.max() < 2**32:  # half the bytes for any corpus below 4e9 examples
            order = order.astype(np.uint32)
        np.save(directory / "order.npy", order)
        np.save(directory / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))

    @classmethod
    def load(cls, directory: Path) -> "EpochPlan":
        return cls(np.load(directory / "order.npy", mmap_mode="r"),
                   np.load(directory / "offsets.npy", mmap_mode="r"))


class PlanCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.built = 0  # plans this process built (the others it mapped)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.directory / digest

    def get(self, key: dict, build: Callable[[], EpochPlan]) -> EpochPlan:
        path = self.path(key)
        if (path / "offsets.npy").is_file():
            return EpochPlan.load(path)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "a")
        except OSError:  # a read-only place: the plan stays in this process's memory
            return self._build(path, key, build)
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released by close, or by the kernel at death
            except OSError:  # no flock on this filesystem: build unless another has
                pass
            if (path / "offsets.npy").is_file():
                return EpochPlan.load(path)
            return self._build(path, key, build)

    def _build(self, path: Path, key: dict, build: Callable[[], EpochPlan]) -> EpochPlan:
        plan = build()
        self.built += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=".tmp-"))
        except OSError:  # a read-only place: the plan stays in this process's memory
            return plan
        try:
            plan.save(tmp)
            (tmp / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
            os.replace(tmp, path)  # fails when another node's builder got there first: the same plan
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._drop_older(key)
        return plan

    def _drop_older(self, key: dict) -> None:
        """Remove this run's plans of epochs before key's previous one (ranks are at most one
        epoch apart): a plan of 1e9 examples is 4 GB, one per epoch."""
        for other in self.directory.iterdir():
            try:
                old = json.loads((other / "key.json").read_text())
            except (OSError, ValueError):
                continue
            if ({k: v for k, v in old.items() if k != "epoch"}
                    == {k: v for k, v in key.items() if k != "epoch"}
                    and old.get("epoch", key["epoch"]) < key["epoch"] - 1):
                shutil.rmtree(other, ignore_errors=True)
                other.with_suffix(".lock").unlink(missing_ok=True)
