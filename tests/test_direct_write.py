"""Spool files written past the page cache: the same bytes, whatever their size, and the
page cache where a file system refuses direct I/O."""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
from pathlib import Path

import pytest

from node.store import direct_write
from node.store.direct_write import BLOCK, write_new

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 527_000, (4 << 20) + 3 * BLOCK + 7]


@pytest.mark.parametrize("size", SIZES)
def test_a_new_file_holds_exactly_the_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "instance.dcm"
    write_new(path, data)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("size", [BLOCK - 1, 527_000, (4 << 20) + 3 * BLOCK + 7])
def test_parts_are_written_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """An instance arrives as its file meta and the PDVs that carried it, of any sizes, and
    is written from them as they are: block boundaries fall inside parts and between
    them, in the direct steps (a paced step is smaller than the file) and in the tail."""
    monkeypatch.setattr(direct_write, "PACED_STEP", 64 * BLOCK)
    data = os.urandom(size)
    cuts = sorted({0, size, 132, 350, BLOCK + 1, 2 * BLOCK, 131_066, 262_132, size - 5})
    cuts = [cut for cut in cuts if 0 <= cut <= size]
    parts = [memoryview(data)[start:end] for start, end in itertools.pairwise(cuts)]
    assert b"".join(parts) == data
    path = tmp_path / "instance.dcm"
    write_new(path, [bytes(parts[0]), *parts[1:]], pace=lambda: None)
    assert path.read_bytes() == data


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        write_new(path, os.urandom(3 * BLOCK))
    assert path.read_bytes() == b"kept"


@pytest.mark.parametrize("size", [0, BLOCK - 1, 527_000])
def test_replace_writes_over_a_longer_file_exactly(tmp_path: Path, size: int) -> None:
    """The filer writes a spool file in place; one a failed attempt left (longer, or other
    bytes) is written over and cut to the new length."""
    path = tmp_path / "instance.dcm"
    path.write_bytes(os.urandom(2 << 20))
    data = os.urandom(size)
    write_new(path, data, replace=True)
    assert path.read_bytes() == data


def test_a_file_is_opened_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tail after the whole blocks goes through the same descriptor, O_DIRECT cleared:
    opening the file again would look its name up again, in a folder other filing threads
    are creating files in."""
    real_open, opened = os.open, []

    def counted(path: str, flags: int, *args: int) -> int:
        opened.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_write, "_refused", set())
    monkeypatch.setattr(os, "open", counted)
    data = os.urandom(527_000)
    write_new(tmp_path / "instance.dcm", data)
    assert (tmp_path / "instance.dcm").read_bytes() == data
    assert len(opened) == 1


def test_a_file_system_without_direct_io_gets_the_bytes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT (EINVAL at open, as some do) gets the file all
    the same through the page cache, and is not asked again for the next file."""
    real_open, direct_opens = os.open, []

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            direct_opens.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_write, "_refused", set())
    monkeypatch.setattr(os, "open", refusing_open)
    for name in ("first", "second"):
        data = os.urandom(527_000)
        write_new(tmp_path / name, data)
        assert (tmp_path / name).read_bytes() == data
    assert len(direct_opens) == 1


def test_a_device_refusing_the_block_size_gets_the_bytes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose blocks are larger than 4 KiB accepts O_DIRECT at open and refuses the
    write (EINVAL): the file is written through the page cache instead, whole and exact,
    rather than failing (the filer would retry it forever)."""
    real_pwritev, refused = os.pwritev, []

    def refusing_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_write, "_refused", set())
    monkeypatch.setattr(os, "pwritev", refusing_pwritev)
    data = os.urandom(527_000)
    write_new(tmp_path / "instance.dcm", data)
    assert refused, "the direct write was tried"
    assert (tmp_path / "instance.dcm").read_bytes() == data
    assert os.stat(tmp_path).st_dev in direct_write._refused


def test_a_paced_write_asks_before_each_step_and_writes_no_more_than_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filer's spool files share the disk with the journal's flushes: before each
    direct write of at most ``PACED_STEP`` bytes, ``pace`` is asked (and may wait)."""
    real_pwritev, events = os.pwritev, []

    def logged_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            events.append(("write", sum(len(buffer) for buffer in buffers)))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", logged_pwritev)
    data = os.urandom(3 * direct_write.PACED_STEP + 5 * BLOCK + 7)
    write_new(tmp_path / "instance.dcm", data, pace=lambda: events.append(("pace", 0)))
    assert (tmp_path / "instance.dcm").read_bytes() == data
    steps = [size for kind, size in events if kind == "write"]
    assert steps == [direct_write.PACED_STEP] * 3 + [5 * BLOCK]
    assert [kind for kind, _ in events] == ["pace", "write"] * 4


@pytest.mark.parametrize("size", [BLOCK, 527_000, (4 << 20) + 3 * BLOCK + 7])
def test_a_page_aligned_map_is_written_from_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The filer writes a payload from its journal segment's map: its whole blocks go to
    the disk from the map itself (never through the thread's buffer), its tail through the
    cache, paced or not."""
    import mmap

    data = os.urandom(size)
    segment = tmp_path / "segment"
    segment.write_bytes(os.urandom(BLOCK) + data + os.urandom(99))

    def no_buffer() -> mmap.mmap:
        raise AssertionError("copied through the thread's buffer")

    monkeypatch.setattr(direct_write, "_buffer", no_buffer)
    monkeypatch.setattr(direct_write, "PACED_STEP", 64 * BLOCK)
    with segment.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)[BLOCK : BLOCK + size]
    write_new(tmp_path / "a.dcm", view, aligned=True)
    write_new(tmp_path / "b.dcm", view, aligned=True, pace=lambda: None)
    view.release()
    mapped.close()
    assert (tmp_path / "a.dcm").read_bytes() == data
    assert (tmp_path / "b.dcm").read_bytes() == data
