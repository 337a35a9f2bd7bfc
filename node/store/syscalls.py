"""The two Linux calls the journal needs that Python's ``os`` lacks, through libc.

``syncfs`` flushes a whole file system at once (every file filed from a journal segment
and their folders, in one call); ``sync_file_range`` writes a range of one file out and
waits for it, or only starts it. Where libc has neither (not Linux), callers fall back to
per-file fsyncs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

# sync_file_range flags: wait for writes already under way, start the range's, wait for them
_WRITE_AND_WAIT = 1 | 2 | 4
_START_WRITE = 2


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def _check(result: int) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def syncfs(folder: Any) -> bool:
    """Flush the whole file system that holds ``folder``; False where ``syncfs`` is not
    available."""
    libc = _libc()
    if libc is None or not hasattr(libc, "syncfs"):
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check(libc.syncfs(fd))
    finally:
        os.close(fd)
    return True


def write_out(fd: int, offset: int, length: int) -> None:
    """Write ``length`` bytes of a file from ``offset`` to disk and wait for them, where
    ``sync_file_range`` is available (elsewhere a later fsync does it all)."""
    _sync_file_range(fd, offset, length, _WRITE_AND_WAIT)


def start_write_out(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of a file from ``offset`` to disk without waiting
    for them (a later fdatasync finds them written, or on their way)."""
    _sync_file_range(fd, offset, length, _START_WRITE)


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    libc = _libc()
    if libc is None or not hasattr(libc, "sync_file_range"):
        return
    start, size = ctypes.c_int64(offset), ctypes.c_int64(length)
    _check(libc.sync_file_range(fd, start, size, flags))
