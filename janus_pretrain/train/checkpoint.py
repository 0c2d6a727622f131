"""Atomic, verified, resumable checkpoints around DeepSpeed's own save/load.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/   DeepSpeed's files (model, optimizer, scheduler; ZeRO shards),
                     rng_rank<r>.pt per rank, janus.json (step, loader position, config),
                     tokenizer.model, and the marker COMPLETE written last: it lists the sha256
                     of every other file
    latest           the name of the newest complete checkpoint (for people and tools)

Everything is written into `.tmp-step_*` first and fsync'd; only when every rank has finished
does rank 0 write COMPLETE, rename the directory and then replace `latest`, so a crash at any
point leaves the previous checkpoint intact. Resuming takes the newest directory that has its
COMPLETE marker (not `latest`, which a crash between rename and update could leave one behind),
warns about those without one, and verifies the checksums before DeepSpeed reads a byte.

Test hook: with JANUS_TEST_KILL_IN_SAVE=<step>, rank 0 SIGKILLs itself while saving that step,
after DeepSpeed's files and before janus.json and the marker (tests/test_fault_tolerance.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import Tokenizer, load_tokenizer

MARKER = "COMPLETE"
KILL_IN_SAVE = "JANUS_TEST_KILL_IN_SAVE"
TAG = re.compile(r"step_(\d{8})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; with `sync`, also flush it to disk (fsync works on a read-only fd)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the marker, relative and sorted (the same on every rank)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MARKER)


def _share(items: list, rank: int, world: int) -> list:
    """This rank's slice of a list that every rank holds in the same order."""
    return items[rank::world]


def _gather(local: list) -> list:
    """Concatenate every rank's list (a collective)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _warn(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def save(engine, root: Path, step: int, client_state: dict, tokenizer: Tokenizer,
         keep: int) -> Path:
    """Collective: every rank calls it. Keeps the newest `keep` checkpoints; returns the new one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    if rank == 0:
        if os.environ.get(KILL_IN_SAVE) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "janus.json").write_text(json.dumps({"step": step, **client_state}, indent=2))
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    dist.barrier()
    # Each rank hashes (and fsyncs) its share of the files; rank 0 writes the manifest.
    files = _files(tmp)
    sums = dict(_gather([(f, _sha256(tmp / f, sync=True)) for f in _share(files, rank, world)]))
    final = root / tag
    if rank == 0:
        _write_atomic(tmp / MARKER, json.dumps({"step": step, "sha256": sums}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag)
        _prune(root, keep)
    dist.barrier()
    return final


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Directories that are or were meant to become checkpoints, newest step first."""
    found = [(int(m.group(1)), p) for p in root.glob("*step_*")
             if p.is_dir() and (m := TAG.fullmatch(p.name.removeprefix(".tmp-")))]
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first."""
    if not root.is_dir():
        return []
    return [p for p in _checkpoint_dirs(root) if not p.name.startswith(".") and (p / MARKER).is_file()]


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
        names = sorted(manifest)
    except (ValueError, KeyError, TypeError, AttributeError):
        return [MARKER]
    mine = [n for n in _share(names, dist.get_rank(), dist.get_world_size())
            if not (path / n).is_file() or _sha256(path / n) != manifest[n]]
    return sorted(_gather(mine))


def find_resumable(root: Path, fallback: bool) -> Optional[Path]:
    """Collective: the newest complete checkpoint whose files pass their checksums, or None when
    there is no checkpoint. A corrupt one is an error unless `fallback` allows the previous one."""
    if not root.is_dir():
        return None
    for path in _checkpoint_dirs(root):
        if not (path / MARKER).is_file():
            _warn(f"checkpoint: ignoring {path}: no {MARKER} marker (its save was interrupted)")
    candidates = complete(root)
    for path in candidates:
        bad = verify(path)
        if not bad:
            return path
        problem = f"checkpoint: {path / bad[0]} is missing or corrupt (sha256 differs from {MARKER})"
        if not fallback:
            raise JanusError(f"{problem}; set train.resume_fallback=true to resume from the "
                             f"previous complete checkpoint instead")
        _warn(f"{problem}; falling back to the previous complete checkpoint")
    if candidates:
        raise JanusError(f"checkpoint: no intact checkpoint left under {root}")
    return None


def check_tokenizer(checkpoint: Path, tokenizer: Tokenizer) -> None:
    """A checkpoint's embedding rows only mean something with the tokenizer it was trained with:
    the same pieces (`Tokenizer.identity`), whatever the bytes of the file."""
    saved = load_tokenizer(checkpoint / "tokenizer.model")
    if saved.identity != tokenizer.identity:
        raise JanusError(f"checkpoint: {checkpoint} was trained with {saved.path} "
                         f"(vocab {saved.vocab_size}), a different tokenizer from "
                         f"{tokenizer.path} (vocab {tokenizer.vocab_size})")


def load(engine, path: Path, tokenizer: Tokenizer) -> dict:
    """Collective: restore engine state and this rank's RNG; returns janus.json's contents."""
    check_tokenizer(path, tokenizer)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise JanusError(f"checkpoint: DeepSpeed could not load {path}")
    if dist.get_rank() == 0:
        print(f"checkpoint: resuming from {path}", flush=True)
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "janus.json").read_text())
