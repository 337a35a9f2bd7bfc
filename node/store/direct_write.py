"""Writing a new file's bytes past the page cache (``O_DIRECT``), where the file system allows.

The journal's filer writes every received instance a second time, into its spool file.
Through the page cache that copy cost the node about 1 ms of kernel time per 512 KiB slice
under load (1.70 against 0.57 ms with direct I/O), more than the rest of the filing
together: each write fills newly allocated cache pages. With direct I/O the bytes go from
one reused, page-aligned buffer per thread straight to the disk; only the last part of a
page is written through the cache (direct I/O moves whole blocks). Durability is
unchanged: the filer syncs the file system before a journal segment is let go, which
flushes the disk's own cache too.

A writer sharing the disk with latency-bound writes (the filer, with the journal's flushes)
passes ``pace``: called before each step of at most ``PACED_STEP`` bytes, it may wait for
a quiet moment, so that a flush queues behind no more than the steps already under way.

Where the file system refuses direct I/O (tmpfs before Linux 6.6, some network file
systems), or the device's blocks are larger than 4 KiB, files are written through the page
cache as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable

from node.store.buffers import Buffer, Parts, pwrite_parts, size_of, slice_of

BLOCK = 4096  # a multiple of every logical block size direct I/O asks offsets and lengths in
_BUFFER_BYTES = 4 << 20
PACED_STEP = 1 << 20  # a paced write goes to the disk at most this much at a time
_local = threading.local()
_refused: set[int] = set()  # devices whose file system refused O_DIRECT


def _buffer() -> mmap.mmap:
    """This thread's page-aligned buffer (an anonymous map is aligned)."""
    buffer: mmap.mmap | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = mmap.mmap(-1, _BUFFER_BYTES)
    return buffer


def write_new(
    path: str | os.PathLike[str],
    data: Buffer | Parts,
    mode: int = 0o600,
    pace: Callable[[], None] | None = None,
    replace: bool = False,
    aligned: bool = False,
) -> None:
    """Create ``path`` holding ``data`` (bytes, or parts written one after the other); not
    synced. It must not exist, unless ``replace``: then a file there is truncated and
    written over. ``pace`` is called before each direct write of whole blocks (see the
    module's docstring). ``aligned`` says that ``data`` is one buffer starting on a page
    boundary (a slice of a mapped file at a multiple of 4 KiB): its blocks then go to the
    disk from where they are, not copied into this thread's buffer first."""
    parts: Parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    size = size_of(parts)
    whole = size // BLOCK * BLOCK
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = -1
    direct = hasattr(os, "O_DIRECT") and whole > 0
    if direct:
        fd = _open_direct(path, flags, mode)
        direct = fd >= 0
    if not direct:
        fd = os.open(path, flags, mode)
        whole = 0
    try:
        if direct:
            try:
                _write_direct(fd, parts, whole, pace, aligned and len(parts) == 1)
            except OSError as exc:  # blocks larger than BLOCK: the whole file through the cache
                if exc.errno != errno.EINVAL:
                    raise
                _refused.add(_device(path))
                whole = 0
            # The tail, less than a block, through the cache: the same descriptor, its
            # O_DIRECT cleared (opening the file again would look its name up again).
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        pwrite_parts(fd, slice_of(parts, whole, size), whole)
    finally:
        os.close(fd)


def _write_direct(
    fd: int,
    parts: Parts,
    length: int,
    pace: Callable[[], None] | None = None,
    in_place: bool = False,
) -> None:
    """Write the first ``length`` bytes of ``parts`` (whole blocks) from offset 0, through
    this thread's aligned buffer, or, ``in_place``, from the one part itself (page-aligned:
    see :func:`write_new`)."""
    step = _BUFFER_BYTES if pace is None else PACED_STEP
    if in_place:
        source = memoryview(parts[0]).cast("B")
        for start in range(0, length, step):
            if pace is not None:
                pace()
            pwrite_parts(fd, [source[start : min(start + step, length)]], start)
        return
    buffer = _buffer()
    aligned = memoryview(buffer)
    for start in range(0, length, step):
        size = min(step, length - start)
        filled = 0
        for view in slice_of(parts, start, start + size):
            buffer[filled : filled + len(view)] = view
            filled += len(view)
        if pace is not None:
            pace()
        pwrite_parts(fd, [aligned[:size]], start)


def _open_direct(path: str | os.PathLike[str], flags: int, mode: int) -> int:
    """The file opened for direct I/O (``flags`` beside), or -1 where its file system
    refuses it."""
    if _refused and _device(path) in _refused:  # looked up only once one has refused
        return -1
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused.add(_device(path))
        if flags & os.O_EXCL:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # created before the flag was refused, on some kernels
        return -1


def _device(path: str | os.PathLike[str]) -> int:
    return os.stat(os.path.dirname(os.fspath(path)) or ".").st_dev
