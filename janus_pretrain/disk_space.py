"""A full disk as one line: the path that could not be written and the space it needed.

Writers (checkpoint saves, `generate --output`, `data prepare`) write inside `one_line`, which
on a full disk removes what they had written and raises one JanusError naming the path and the
space. torch's C++ writer reports a full disk as "basic_ios::clear: iostream error" with no
errno, and `datasets` as its own OSError("Not enough disk space. Needed: ..."), so `is_full`
also asks the file system.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Callable

from janus_pretrain.errors import JanusError


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the file system holding `path` or its nearest ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_full(error: BaseException, path: str | Path, needed: int = 0) -> bool:
    """Whether `error`, raised while writing under `path`, means the disk is full: ENOSPC
    (or EDQUOT, a full quota), or an errno-less failure with less than `needed` bytes free."""
    number = getattr(error, "errno", None)
    if number in (errno.ENOSPC, errno.EDQUOT) or "Not enough disk space" in str(error):
        return True
    return number is None and isinstance(error, (OSError, RuntimeError)) and \
        free_bytes(path) < max(needed, 1)


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def full(what: str, path: str | Path, needed: int, at_least: bool = False) -> JanusError:
    """The one-line error: `what` (the command), the path and the space it needed (`at_least`:
    only what was written before the disk filled is known)."""
    free = size(free_bytes(path))
    need = (f"it needs {'more than' if at_least else 'about'} {size(needed)}, {free} are free"
            if needed else f"only {free} are free")
    return JanusError(f"{what}: no space left on the device to write {path}: {need} (free some "
                      f"space or write elsewhere)")


def bytes_under(path: Path) -> int:
    """The size of a file, or of every file under a directory (0 when there is none)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def one_line(what: str, path: str | Path, needed: Callable[[], tuple[int, bool]],
             cleanup: Callable[[], None]):
    """Run a write of `path`; if the disk fills, `cleanup()` (remove the partial files) and
    raise `full`. `needed()` -> (bytes, whether only a lower bound is known), asked before the
    cleanup."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        size_needed, at_least = needed()
        if not is_full(e, path, size_needed):
            raise
        cleanup()
        raise full(what, path, size_needed, at_least) from None
