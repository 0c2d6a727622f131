"""One training at a time per run directory: an exclusive file lock held for the run's life.

The "already holds checkpoints" guard (checkpoint/store.py) sees finished checkpoints only, so
two jobs started into one `train.output_dir` (a requeued job and its still-running original, or a
copy-pasted command) would both pass it and write the same checkpoints. Rank 0 takes a
`fcntl.flock` on `<output_dir>/.lock` (the kernel drops it when the process dies, so a crash
never leaves a stale lock) and writes its pid and host there for the refusal to name; the other
ranks learn the outcome from rank 0, so every rank fails alike, whatever the failure (a file
system without flock raises on rank 0 only). flock works on local disks and on NFS (Linux
emulates it with NFS byte-range locks); Lustre mounted without -o flock refuses it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator, TextIO

import torch.distributed as dist

from janus_pretrain.errors import JanusError

LOCK_FILE = ".lock"


def lock_run_directory(directory: Path) -> TextIO:
    """Take the lock (this process); the open file holds it until closed or the process ends."""
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise JanusError(f"train: cannot create {path}: {e.strerror} (train.output_dir)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise JanusError(f"train: {directory} is in use by another training ({holder}): wait "
                         f"for it to end, or choose another train.output_dir") from None
    except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: a file system without flock
        f.close()
        raise JanusError(f"train: cannot lock {path} ({e.strerror}): its file system does not "
                         f"support flock (Lustre needs -o flock); put train.output_dir on one "
                         f"that does") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


@contextlib.contextmanager
def hold(directory: Path, is_main: bool) -> Iterator[None]:
    """Collective: rank 0 holds the lock for the block; every rank raises if it is taken."""
    lock, refusal = None, [None]
    if is_main:
        try:
            lock = lock_run_directory(directory)
        except JanusError as e:
            refusal = [str(e)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise JanusError(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.close()
