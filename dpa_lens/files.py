"""Writing files a user keeps: every write goes through `write_atomic`, so that a failure never leaves a
fragment where a good file was.

The content is written to a temporary file in the destination's folder, flushed and synced to disk,
then renamed over the destination (an atomic step on one file system); on any failure the temporary
file is removed and the earlier file, if any, is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpa_lens.errors import InputError


def destination(path: str | os.PathLike, what: str) -> Path:
    """``path`` with ``~`` expanded, or `InputError` when it cannot be written as a file (``what``: for the message)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"cannot save {what} to {path}: it is a folder; pass a file name in it")
    if not path.parent.is_dir():
        raise InputError(f"cannot save {what} to {path}: the folder {path.parent} does not exist")
    return path


def check_writable(path: str | os.PathLike, what: str = "the file") -> Path:
    """`destination`, and its folder writable by this process: checked before long work whose result it keeps."""
    path = destination(path, what)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot save {what} to {path}: the folder {path.parent} is not writable; pass a file name in one that is")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Any], Any], *, what: str = "the file", by_name: bool = False) -> Path:
    """Write a file through ``write(handle)`` (a binary handle) so that ``path`` holds either its earlier
    content or the whole new one, never a part. Returns the path written.

    ``by_name``: ``write`` gets the temporary file's name (a ``str``) instead, for writers that are faster through
    their own file than through a Python handle (pyarrow's Parquet writer: about 10 % faster on a 20 MiB shard); it
    writes the whole content and closes its file before returning."""
    path = destination(path, what).resolve()  # through a symbolic link: the file it points to is replaced
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot save {what} to {path}: {err.strerror or err}") from None
    try:
        os.fchmod(fd, _mode(path))  # mkstemp makes the file private: give it the mode a plain write would
        with os.fdopen(fd, "wb") as handle:
            write(tmp if by_name else handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _mode(path: Path) -> int:
    """The earlier file's permissions, or what the umask gives a new file."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str = "the file") -> Path:
    """`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), what=what)
