"""Atomic, resumable checkpoints around DeepSpeed's own save/load.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/   DeepSpeed's files (model, optimizer, scheduler; ZeRO shards),
                     rng_rank<r>.pt per rank, janus.json (step, loader position, config),
                     tokenizer.model, and the marker COMPLETE written last
    latest           the name of the newest complete checkpoint

Everything is written into `.tmp-step_*` first; only when every rank has finished does rank 0
rename it and then replace `latest`, so a crash at any point leaves the previous checkpoint
as `latest`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import Tokenizer, load_tokenizer

MARKER = "COMPLETE"


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


def save(engine, root: Path, step: int, client_state: dict, tokenizer: Tokenizer) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    dist.barrier()
    final = root / tag
    if rank == 0:
        (tmp / "janus.json").write_text(json.dumps({"step": step, **client_state}, indent=2))
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        _write_atomic(tmp / MARKER, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag)
    dist.barrier()
    return final


def latest(root: Path) -> Optional[Path]:
    """The directory `latest` points to, or None when there is no checkpoint yet."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / MARKER).is_file():
        raise JanusError(f"checkpoint: {path} is incomplete (no {MARKER} marker)")
    return path


def check_tokenizer(checkpoint: Path, tokenizer: Tokenizer) -> None:
    """A checkpoint's embedding rows only mean something with the tokenizer it was trained with."""
    saved = load_tokenizer(checkpoint / "tokenizer.model")
    if saved.vocab_size != tokenizer.vocab_size or (
            saved.path.read_bytes() != tokenizer.path.read_bytes()):
        raise JanusError(f"checkpoint: {checkpoint} was trained with another tokenizer "
                         f"(vocab {saved.vocab_size}) than {tokenizer.path} "
                         f"(vocab {tokenizer.vocab_size})")


def load(engine, path: Path, tokenizer: Tokenizer) -> dict:
    """Collective: restore engine state and this rank's RNG; returns janus.json's contents."""
    check_tokenizer(path, tokenizer)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise JanusError(f"checkpoint: DeepSpeed could not load {path}")
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "janus.json").read_text())
