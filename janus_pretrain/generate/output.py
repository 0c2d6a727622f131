"""`generate --output`: the hypothesis file, which a refusal or a failure never touches.

Lines go to a temporary file beside the target (same directory, so the final rename is atomic)
and replace the target when the run ends. A run that fails before its first chunk of lines is
written (no checkpoint, a bad option, a mode never trained, a corrupt file) removes the temporary
file and leaves the target byte-identical; an interrupted run (Ctrl-C, an error later on) still
renames what it finished, so its lines are kept. A full disk removes the temporary file and is
one line. A target that is not a regular file (/dev/null, a pipe) is written in place, opened
only when the first lines are ready.
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from janus_pretrain import disk_space
from janus_pretrain.errors import JanusError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Output:
    """A context manager: `write` chunks of lines; on exit the file replaces `--output`."""

    def __init__(self, path: str):
        self.path = path
        self.target: Optional[Path] = None  # None: stdout
        self.tmp: Optional[Path] = None
        self.file = sys.stdout if path == "-" else None
        self.written = 0  # bytes handed to the file
        if path == "-":
            return
        target = Path(path).resolve()  # a symlink: write the file it points to
        problem = None
        if target.is_dir():
            problem = "it is a directory"
        elif target.exists() and not os.access(target, os.W_OK):
            problem = "Permission denied"
        if problem is None and (not target.exists() or target.is_file()):
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                           suffix=".partial")
            except OSError as e:
                problem = e.strerror
            else:
                os.close(fd)
                self.tmp = Path(tmp)
        if problem is not None:
            raise JanusError(f"generate: cannot write --output {path}: {problem}")
        self.target = target

    def __enter__(self) -> "Output":
        return self

    def write(self, lines: Iterable[str]) -> None:
        """Write and flush lines (each ending in a newline)."""
        text = "".join(lines)
        needed = self.written + len(text.encode("utf-8"))
        with self._full_disk_is_one_line(needed):
            if self.file is None:
                self.file = open(self.tmp or self.target, "w", encoding="utf-8")
            self.file.write(text)
            self.file.flush()
        self.written = needed

    def __exit__(self, kind, error, trace) -> None:
        if self.target is None:
            return
        if kind is not None and self.file is None:  # failed before a line was ready
            self._discard()
            return
        if self.tmp is None:  # written in place
            if self.file is not None:
                self.file.close()
            return
        try:
            with self._full_disk_is_one_line(self.written):
                if self.file is None:  # no source lines: an empty output
                    self.file = open(self.tmp, "w", encoding="utf-8")
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                mode = (stat.S_IMODE(self.target.stat().st_mode) if self.target.exists()
                        else 0o666 & ~_umask())
                os.chmod(self.tmp, mode)
                os.replace(self.tmp, self.target)
        except OSError:  # not a full disk (that is a JanusError): no temporary file left behind
            self._discard()
            raise

    def _full_disk_is_one_line(self, needed: int):
        """More than `needed` bytes: the lines still to come are not known yet."""
        return disk_space.one_line("generate", self.path if self.target is not None else "stdout",
                                   lambda: (needed, True), self._discard)

    def _discard(self) -> None:
        if self.file is not None and self.file is not sys.stdout:
            try:
                self.file.close()
            except OSError:
                pass  # a full disk again, flushing what is being thrown away
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        self.target = self.tmp = None  # nothing left for __exit__ to publish
