"""Opening model files safely: regular files only, checked before they are opened.

Opening a FIFO blocks until someone writes to it, opening some devices has side effects, and /proc
entries pose as regular files; a model path can come from anyone who can name one, so every model
file is stat()ed first, opened without blocking, and checked again on the open descriptor.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from tandem.errors import ModelFileError, ModelNotFoundError

# Kernel file systems whose "regular files" are views of live state, never model files (devices are
# refused as such wherever they are; /dev/shm may well hold a model).
_SPECIAL_ROOTS = (Path("/proc"), Path("/sys"))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def is_special(path: str | Path) -> bool:
    """Whether path, links resolved, lies in /proc or /sys."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(root) for root in _SPECIAL_ROOTS)


def stat_regular(path: str | Path) -> os.stat_result:
    """os.stat of a regular model file; ModelFileError (ModelNotFoundError if absent) otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"no such file or directory: {path}") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror})") from None
    if is_special(path):
        raise ModelFileError(path, "is a /proc or /sys entry, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(path, f"is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading, never blocking: stat first, O_NONBLOCK, and fstat what opened."""
    stat_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ModelFileError(path, f"cannot be opened ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the stat and the open
            raise ModelFileError(path, f"is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: str | Path) -> str:
    with open_regular(path) as f:
        return f.read().decode("utf-8", errors="replace")
