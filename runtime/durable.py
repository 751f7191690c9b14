"""File-system steps that survive a power cut, not only a crash.

A rename is atomic for other processes at once, but only durable once the data it points at and
the directory holding it reached the disk: files are fsynced before their folder, the folder before
its rename, and the parent after it. Also the one atomic swap of two folders (Linux
``renameat2(RENAME_EXCHANGE)``) and the test for "the disk is full" behind torch's own errors.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["disk_full", "exchange", "fsync_dir", "replace_file", "write_synced"]

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a new file, then flush and fsync it before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically and durably: a synced temporary file renamed over it, then the
    parent synced so the rename itself survives."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, lambda f: f.write(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@functools.cache
def _renameat2() -> Callable | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one atomic step. False where the OS or the file system cannot
    (not Linux, an old libc, NFS and others): the caller then needs another way."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a full disk or quota. torch reports a failed write as a
    RuntimeError of its own; the OSError behind it is in the exception's context."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    return False
