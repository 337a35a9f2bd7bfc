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


def _compiled() -> object:
    from node.store import filing

    if filing._filing is None:
        pytest.skip("the compiled batch writer is not built here")
    return filing._filing


@pytest.mark.parametrize("aligned", [True, False], ids=["from-a-map", "anywhere"])
def test_a_compiled_batch_writes_each_file_exactly(tmp_path: Path, aligned: bool) -> None:
    """The filing process's batch writer: every file holds exactly its bytes, whatever
    their size and wherever they lie in memory (a page-aligned map, or a copy through the
    thread's buffer), written over a longer file where one was there; one it cannot create
    is reported by its errno and the others are written all the same."""
    import mmap

    writer = _compiled()
    blobs = [os.urandom(size) for size in SIZES]
    source = tmp_path / "segment"
    offsets, position, layout = [], 0, bytearray()
    for blob in blobs:
        position += -position % BLOCK if aligned else 1 + position % 3  # page, or anywhere
        layout += bytes(position - len(layout))
        offsets.append(position)
        layout += blob
        position += len(blob)
    source.write_bytes(bytes(layout))
    with source.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    views = [
        memoryview(mapped)[at : at + len(blob)] for at, blob in zip(offsets, blobs, strict=True)
    ]
    (tmp_path / "0.dcm").write_bytes(os.urandom(5 << 20))  # longer: cut to the new length
    jobs = [(str(tmp_path / f"{index}.dcm"), view) for index, view in enumerate(views)]
    jobs.insert(2, (str(tmp_path / "missing" / "x.dcm"), views[0]))
    errors = writer.write_files(jobs, 4)
    assert errors[2] == errno.ENOENT
    assert errors[:2] + errors[3:] == [0] * len(blobs)
    for index, blob in enumerate(blobs):
        path = tmp_path / f"{index}.dcm"
        assert path.read_bytes() == blob
        assert index == 0 or path.stat().st_mode & 0o777 == 0o600  # made here: the owner's only
    for view in views:
        view.release()
    mapped.close()


def test_a_compiled_batch_writes_through_the_cache_where_direct_io_is_refused(
    tmp_path: Path,
) -> None:
    """On a file system that refuses O_DIRECT (tmpfs before Linux 6.6) the batch writer
    writes each file through the page cache; one with a single thread, as many files as
    there are threads, or none at all, the same."""
    writer = _compiled()
    shm = Path("/dev/shm")
    folder = shm / f"curia-filing-{os.getpid()}" if shm.is_dir() else tmp_path
    folder.mkdir(exist_ok=True)
    try:
        blobs = [os.urandom(size) for size in (BLOCK + 5, 527_000)]
        for threads in (1, 2, 16):
            jobs = [(str(folder / f"{threads}-{i}.dcm"), blob) for i, blob in enumerate(blobs)]
            assert writer.write_files(jobs, threads) == [0, 0]
            for (path, _), blob in zip(jobs, blobs, strict=True):
                assert Path(path).read_bytes() == blob
        assert writer.write_files([], 4) == []
    finally:
        if folder != tmp_path:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()


def test_a_file_the_compiled_batch_cannot_finish_is_removed(tmp_path: Path) -> None:
    """A file whose bytes cannot all be read (here: a map whose file was cut short under
    it) is reported by its errno and removed, never left half written under its name."""
    import mmap

    writer = _compiled()
    source = tmp_path / "segment"
    source.write_bytes(os.urandom(4 * BLOCK))
    with source.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        file.truncate(BLOCK)
    view = memoryview(mapped)[: 3 * BLOCK]
    try:
        errors = writer.write_files([(str(tmp_path / "cut.dcm"), view)], 1)
    finally:
        view.release()
        mapped.close()
    assert errors[0] != 0
    assert not (tmp_path / "cut.dcm").exists()


def test_the_compiled_batch_writer_is_built_where_a_compiler_is() -> None:
    from node.store import filing

    assert filing._filing is not None, "setup.py builds node.store._filing"


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of its maps of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.parametrize("release", [True, False])
def test_a_compiled_batch_from_maps_lets_go_of_their_pages(tmp_path: Path, release: bool) -> None:
    """The filing process writes a batch of payloads from their journal segment's map: each
    payload's pages are let go of the map once written, so that a batch (hundreds of MB
    after a burst) never counts as the process's resident memory; the page cache keeps them."""
    import mmap

    writer = _compiled()
    source = tmp_path / "segment"
    data = os.urandom(8 << 20)
    source.write_bytes(data)
    with source.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    half = len(data) // 2
    views = [memoryview(mapped)[:half], memoryview(mapped)[half + 7 :]]  # aligned, and not
    jobs = [(str(tmp_path / f"{i}.dcm"), view) for i, view in enumerate(views)]
    try:
        assert writer.write_files(jobs, 2, release) == [0, 0]
        resident = _resident_kib(source)
    finally:
        for view in views:
            view.release()
        mapped.close()
    assert (tmp_path / "0.dcm").read_bytes() == data[:half]
    assert (tmp_path / "1.dcm").read_bytes() == data[half + 7 :]
    if release:
        assert resident == 0
    else:
        assert resident > 1024, "the map's pages count until let go (what the test measures)"
