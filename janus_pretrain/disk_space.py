"""A full disk as one line: the path that could not be written and the space it needed.

Writers (checkpoint saves, `generate --output`, `data prepare`) catch the failed write, remove
what they had written, and raise `full(path, needed)`. torch's C++ writer reports a full disk as
"basic_ios::clear: iostream error" with no errno, so `is_full` also asks the file system.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

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
    if number in (errno.ENOSPC, errno.EDQUOT):
        return True
    return number is None and isinstance(error, (OSError, RuntimeError)) and \
        free_bytes(path) < max(needed, 1)


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def full(what: str, path: str | Path, needed: int) -> JanusError:
    """The one-line error: `what` (the command), the path and the space it needed."""
    return JanusError(f"{what}: no space left on the device to write {path}: it needs about "
                      f"{size(needed)}, {size(free_bytes(path))} are free (free some space or "
                      f"write elsewhere)")
