"""Durable, all-or-nothing directory writes: the one way a checkpoint reaches the disk.

A directory is filled under a temporary name, every file is fsync'd and hashed, the marker
(layout.MARKER, listing those hashes) is written last, and only then is the directory renamed
into place. A crash at any point leaves either the previous directory or none, never half of one.
Training checkpoints (store.py, several ranks) and model-only checkpoints (averaged, best) share it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from janus_pretrain.checkpoint.files import MARKER, TMP_PREFIX
from janus_pretrain.errors import JanusError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; with `sync`, also flush it to disk (fsync works on a read-only fd)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def check_files(directory: Path, paths: list[Path]) -> None:
    """Before reading `paths` of a published `directory`: each file the marker lists must still
    have its sha256 (a copy cut short or a damaged disk), else one error naming the file."""
    marker = directory / MARKER
    if not marker.is_file():
        return  # no manifest to check against (not a published directory)
    try:
        manifest = json.loads(marker.read_text())["sha256"]
        if not isinstance(manifest, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        # Never "nothing to check": its files cannot be trusted either.
        raise JanusError(f"checkpoint: {marker} is corrupt (not the manifest of sha256 sums "
                         f"written with the checkpoint), so {directory} cannot be verified: use "
                         f"another checkpoint") from None
    for path in paths:
        expected = manifest.get(str(path.relative_to(directory)))
        if expected is not None and sha256(path) != expected:
            raise JanusError(f"checkpoint: {path} is corrupt (its sha256 differs from the one "
                             f"{directory / MARKER} recorded when it was written)")


def files(directory: Path) -> list[str]:
    """Every file under `directory` but the marker, relative and sorted (the same on every rank)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MARKER)


def staging(final: Path) -> Path:
    """A fresh, empty temporary directory beside `final` to fill before `publish`."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path, sums: dict[str, str], **manifest) -> Path:
    """Write the marker (with `sums`, {relative name: sha256} of every synced file, and `manifest`)
    into `tmp`, then rename `tmp` to `final`, replacing an older `final`."""
    write_text(tmp / MARKER, json.dumps({**manifest, "sha256": sums}, indent=1))
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        # Renamed aside, not deleted, until the new one is in place: the only moment without
        # `final` is between two renames.
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def publish_local(tmp: Path, final: Path, **manifest) -> Path:
    """`publish` for a directory written by one process: hash and sync every file here."""
    return publish(tmp, final, {f: sha256(tmp / f, sync=True) for f in files(tmp)}, **manifest)
