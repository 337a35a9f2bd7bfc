"""The ingest journal: a kill -9 at each point of its write path loses nothing that got
Success, and catalogues nothing twice.

A child process ingests a series through an :class:`Ingestor` with a journal and prints
each SOP Instance UID that got Success; it kills itself with SIGKILL at one point of the
path (a record half written, a record synced but not filed, one answered by the journal
itself but not yet entered for filing, a file filed without its row,
a spool file written in part and never renamed, rows committed with their segment still
there), filing in a process of its own (as the node does) or in its own. A fresh ingestor
on the same folders then files what the journal holds, and every instance that got
Success must be catalogued once, with its exact bytes in the spool, its series counted
once per instance, and nothing left behind in the spool.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from benchmarks.ingest import timed_send, write_series
from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance, Series
from node.core.settings import DicomSettings
from node.core.status import OUT_OF_RESOURCES, SUCCESS
from node.dimse.allow_list import SourcePolicy
from node.dimse.listener import start_listener
from node.store.ingest import Ingestor
from node.store.journal import JOURNAL_DIR, Journal, JournalError, Reservation, Segment
from node.store.spool import Spool
from tests.support.peers import free_port, wait_for

SLICES = 12
CRASH_AT = 7  # the instance during (or after) which the child dies

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from node.catalogue.db import Catalogue
    from node.store import direct_write, filing, journal as journal_module, write_ahead
    from node.store.ingest import Ingestor
    from node.store.journal import JOURNAL_DIR, Journal, Segment
    from node.store.spool import Spool

    root, url, point, crash_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    answers = None  # ("answered") the sockets the journal's answers go through

    def told():  # print the answers the journal sent: the names of the instances
        try:
            print(answers[1].recv(1 << 16).decode(), end="", flush=True)
        except BlockingIOError:
            pass
    separate = point.endswith("-by-process")  # filed by a process of its own, as the node does
    point = point.removesuffix("-by-process")
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point.endswith("-in-python"):  # the journal's writes and flushes made in Python
        point = point.removesuffix("-in-python")
        journal_module._flush = None
    compiled = journal_module._flush is not None

    if point == "mid-write" and compiled:  # the crash_at-th record cut short, yet flushed
        original_commit = journal_module.Journal._commit_compiled
        def half(self, segment, writes, answer=None):
            calls["n"] += 1
            if calls["n"] == crash_at:
                offset, parts = writes[0]
                original_commit(self, segment, [(offset, parts[:2])])  # head, meta
                die()
            original_commit(self, segment, writes, answer)
        journal_module.Journal._commit_compiled = half
    elif point == "mid-write":  # the crash_at-th record is cut short: no Success for it
        original = journal_module.Journal._write
        def half(fd, parts, offset):
            calls["n"] += 1
            if calls["n"] == crash_at:
                original(fd, parts[:2], offset)  # head, meta
                die()
            original(fd, parts, offset)
        journal_module.Journal._write = staticmethod(half)
    elif point in ("synced", "streamed"):  # records synced; nothing filed; no answer
        write_ahead.WriteAhead._run = lambda self: None
        name = "_commit_compiled" if compiled else "_sync"
        original_sync = getattr(journal_module.Journal, name)
        def sync(self, *args):
            original_sync(self, *args)
            calls["n"] += 1
            if calls["n"] == crash_at:
                die()
        setattr(journal_module.Journal, name, sync)
    elif point == "answered":  # the journal sends each Success; dead just after one
        import socket
        answers = socket.socketpair()
        answers[1].setblocking(False)
        original_answered = journal_module.Journal._commit_compiled
        def answered(self, segment, writes, answer=None):
            original_answered(self, segment, writes, answer)
            calls["n"] += 1
            if calls["n"] == crash_at:  # answered, not yet entered for filing
                told()
                die()
        journal_module.Journal._commit_compiled = answered
    elif point == "mid-filing":  # files written, their rows never committed
        original_write = filing.Filer._write
        def write(self, path, *rest):
            original_write(self, path, *rest)
            calls["n"] += 1
            if calls["n"] == crash_at:
                die()
        filing.Filer._write = write
    elif point == "mid-file":  # a spool file's whole blocks written in place, its tail not
        original_direct = direct_write._write_direct
        def direct(fd, view, *pace):
            original_direct(fd, view, *pace)
            calls["n"] += 1
            if calls["n"] == crash_at:
                die()
        direct_write._write_direct = direct
    elif point == "zero-fill":  # a spare segment half zero-filled: never used, removed
        original_chunk = journal_module.Journal._zero_chunk
        def chunk(fd, zeros, offset, direct):
            original_chunk(fd, zeros, offset, direct)
            if offset >= 1 << 20:
                die()
        journal_module.Journal._zero_chunk = staticmethod(chunk)
    elif point == "reused":  # a spare renamed to the next number, before its first record
        original_take = journal_module.Journal._take_spare
        def take(self):
            segment = original_take(self)
            if segment is not None:
                die()
            return segment
        journal_module.Journal._take_spare = take
    elif point == "filed":  # rows committed (relaxed), segment not yet retired
        original_materialised = journal_module.Journal.materialised
        def materialised(self, segment, paths):
            calls["n"] += len(paths)
            if calls["n"] >= crash_at:
                die()
            original_materialised(self, segment, paths)
        journal_module.Journal.materialised = materialised

    spool = Spool(root / "spool", root / "quarantine")
    ingestor = Ingestor(
        spool,
        Catalogue(url),
        journal=Journal(spool.root / JOURNAL_DIR, 1 << 22),
        filing_process=separate,
    )
    for number, path in enumerate(sorted((root / "series").iterdir()), 1):
        data = path.read_bytes()
        if point in ("mid-arrival", "streamed"):  # written to the journal as it arrives
            reserved = ingestor.reserve(len(data))
            reserved.feed(data[: len(data) // 2])
            if point == "mid-arrival" and number == crash_at:  # its last bytes never come
                die()
            try:
                outcome = ingestor.ingest(data, "CRASHER", reserved=reserved)
            finally:
                reserved.release()
        elif answers is not None:
            answer = journal_module.Answer(answers[0].fileno(), f"{path.name}\\n".encode())
            outcome = ingestor.ingest(data, "CRASHER", answer=answer)
            assert answer.sent and outcome.status == 0
        else:
            outcome = ingestor.ingest(data, "CRASHER")
        if answers is not None:
            told()
        elif outcome.status == 0:
            print(path.name, flush=True)
        if point in ("mid-filing", "mid-file", "filed"):
            ingestor.settle()
        if point in ("zero-fill", "reused"):  # a quiet moment: a spare made as it fills
            import time
            ingestor.write_ahead.journal.prepare_spares(1)
            time.sleep(0.2)
    ingestor.close()
    """
)


def _run_child(root: Path, url: str, point: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), url, point, str(CRASH_AT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == -9, f"the child was to die by SIGKILL: {proc.stderr[-2000:]}"
    return proc.stdout.split()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("journal") / "series"
    write_series(folder, SLICES)
    return folder


def _check(root: Path, url: str, series: Path, succeeded: list[str]) -> Ingestor:
    spool = Spool(root / "spool", root / "quarantine")
    ingestor = Ingestor(spool, Catalogue(url), journal=Journal(spool.root / JOURNAL_DIR))
    # What the replay left, read at once: once idle for a second, the node's filer starts
    # zero-filling a new spare of its own (a .tmp until it is made).
    assert not list((spool.root / JOURNAL_DIR).glob("*.journal")), "replayed segments go"
    assert not list((spool.root / JOURNAL_DIR).glob("*.tmp")), "a half-made spare goes"
    with ingestor.catalogue.session() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        counted = session.scalar(select(func.sum(Series.instance_count))) or 0
        assert counted == len(rows), "each catalogued instance is counted once in its series"
    for name in succeeded:
        data = (series / name).read_bytes()
        sop = dcmread(series / name, stop_before_pixels=True).SOPInstanceUID
        assert sop in rows, f"{name} got Success and is missing after kill -9"
        stored = spool.absolute(rows[sop].path).read_bytes()
        assert stored == data, f"{name} is not stored exactly as sent"
        # filed from the journal, a row has no digest until one is needed
        assert rows[sop].sha256 in (None, hashlib.sha256(stored).hexdigest())
    for sop, row in rows.items():
        assert spool.absolute(row.path).is_file(), f"catalogued {sop} has no file"
    assert not list(spool.root.glob("*/*/.*.tmp")), "a spool file cut short goes"
    return ingestor


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    "point",
    [
        "mid-write",
        "synced",
        "answered",
        "mid-arrival",
        "streamed",
        "mid-write-in-python",
        "synced-in-python",
        "streamed-in-python",
        "mid-filing",
        "mid-file",
        "filed",
        "streamed-by-process",
        "filed-by-process",
        "zero-fill",
        "reused",
    ],
)
def test_kill_9_in_the_journal_path_loses_nothing_that_got_success(
    point: str, backend: str, series: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from node.store import journal as journal_module

    if point == "answered" and journal_module._flush is None:
        pytest.skip("the journal answers a sender itself only where it is compiled")
    url = (
        f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    upgrade(url)
    (tmp_path / "series").symlink_to(series)
    succeeded = _run_child(tmp_path, url, point)
    cut = point.removesuffix("-in-python")
    expected = CRASH_AT - 1 if cut in ("mid-write", "synced", "mid-arrival", "streamed") else None
    if cut == "answered":
        expected = CRASH_AT  # answered by the journal the moment it was durable
    if expected is not None:
        assert len(succeeded) == expected, "no Success for the instance the crash cut short"
    ingestor = _check(tmp_path, url, series, succeeded)
    try:
        # The sender resends everything: each stored once, every one Success.
        for path in sorted(series.iterdir()):
            assert ingestor.ingest(path.read_bytes(), "CRASHER").status == SUCCESS
        ingestor.settle()
        with ingestor.catalogue.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == SLICES
            assert session.scalars(select(Series)).one().instance_count == SLICES
    finally:
        ingestor.close()
        ingestor.catalogue.dispose()


def test_a_cut_short_record_costs_only_itself(series: Path, tmp_path: Path) -> None:
    """Records after a torn one (written by other associations, synced, answered) are
    still found: recovery reads every 4 KiB boundary, not up to the first bad record."""
    journal = Journal(tmp_path / "j", 1 << 22)
    assert list(journal.recover()) == []
    payloads = [p.read_bytes() for p in sorted(series.iterdir())[:3]]
    for index, data in enumerate(payloads):
        journal.append({"n": index}, [data])
    [segment] = journal.close()
    # Tear the first record's payload: its checksum no longer holds.
    os.pwrite(segment.fd, b"\xff" * 64, 8192)
    os.close(segment.fd)
    found = list(Journal(tmp_path / "j").recover())
    assert [r.meta["n"] for r in found] == [1, 2]
    assert [r.payload for r in found] == payloads[1:]


def test_records_written_as_they_arrive_are_read_back_and_one_never_finished_is_not(
    series: Path, tmp_path: Path
) -> None:
    """A record written as its instance arrives has its head written last: one whose last
    bytes never came (the sender never got Success) leaves pages without a head, which
    recovery skips, and the records around it are read back whole. One that outgrows its
    room is appended after its last byte instead, and the room it leaves is never read."""
    journal = Journal(tmp_path / "j", 64 << 20)  # one segment: no spare is made before 8 MiB
    assert list(journal.recover()) == []
    first, second, third = (p.read_bytes() for p in sorted(series.iterdir())[:3])
    cut = journal.reserve(len(first) + 4096)
    assert cut is not None
    cut.feed(first[:200_000])
    cut.feed(first[200_000:300_000])
    assert cut.placed == 300_000 // 4096 * 4096, "whole pages only, from both fragments"
    whole = journal.reserve(len(second) + 4096)
    assert whole is not None
    whole.feed(second)
    journal.commit(whole, {"n": "whole"}, [second])
    small = journal.reserve(4096)
    assert small is not None
    small.feed(third)  # past its room: nothing placed
    assert small.placed == 0
    journal.commit(small, {"n": "appended"}, [third])
    journal.append({"n": "after"}, [first])
    [segment] = journal.close()
    assert segment.outstanding == 4, "the room of the record never finished is still held"
    cut.release()
    assert segment.outstanding == 3
    os.close(segment.fd)
    found = list(Journal(tmp_path / "j").recover())
    assert [(r.meta["n"], r.payload) for r in found] == [
        ("whole", second),
        ("appended", third),
        ("after", first),
    ]


def test_room_given_back_while_it_is_the_segments_last(tmp_path: Path) -> None:
    """Unused room is taken back while no record follows it, so one association's records
    lie end to end; a record committed smaller than its room ends where it ends."""
    journal = Journal(tmp_path / "j", 64 << 20)  # one segment: no spare is made before 8 MiB
    assert list(journal.recover()) == []
    payload = os.urandom(100_000)
    room = journal.reserve(1 << 20)
    assert room is not None
    segment = room.segment
    journal.commit(room, {"n": 1}, [payload])
    used = segment.end
    assert used < 1 << 18, "the end of the room came back"
    unused = journal.reserve(1 << 20)
    assert unused is not None
    unused.release()
    assert segment.end == used, "released while last: all of it came back"
    kept, after = journal.reserve(1 << 20), journal.reserve(1 << 20)
    assert kept is not None and after is not None
    kept.release()
    assert segment.end > used + (2 << 20), "a room with a record after it stays taken"
    journal.commit(after, {"n": 2}, [payload])
    journal.close()
    os.close(segment.fd)
    assert [r.meta["n"] for r in Journal(tmp_path / "j").recover()] == [1, 2]


def test_a_segment_still_being_written_to_is_not_let_go_at_shutdown(
    series: Path, tmp_path: Path
) -> None:
    """A receiver may still be writing an instance into the journal while the node shuts
    down: its segment's descriptor stays open (closed, it could be another file's by the
    time the receiver writes), and the next start finds nothing to replay from it."""
    data = sorted(series.iterdir())[0].read_bytes()
    ingestor = _journalled(tmp_path)
    room = ingestor.reserve(len(data))
    assert room is not None
    room.feed(data[:100_000])
    ingestor.close()
    os.fstat(room.segment.fd)  # still open
    room.feed(data[100_000:])
    assert room.placed == len(data) // 4096 * 4096 and not room.overflowed
    room.release()
    again = _journalled(tmp_path)
    try:
        with again.catalogue.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 0
    finally:
        again.close()


def test_one_instance_at_a_time_is_written_as_it_arrives(series: Path, tmp_path: Path) -> None:
    """While one association writes an instance into the journal as it arrives, another
    gets no room: its instance is journalled after its last byte, as usual, and still
    answered Success. Once the first is committed, room is given again."""
    first, second = (path.read_bytes() for path in sorted(series.iterdir())[:2])
    ingestor = _journalled(tmp_path)
    try:
        room = ingestor.reserve(len(first))
        assert room is not None
        room.feed(first)
        assert ingestor.reserve(len(second)) is None
        assert ingestor.ingest(second, "OTHER").status == SUCCESS
        assert ingestor.ingest(first, "FIRST", reserved=room).status == SUCCESS
        again = ingestor.reserve(len(second))
        assert again is not None
        again.release()
    finally:
        ingestor.close()


def test_no_room_in_the_journal_leaves_the_instance_to_be_refused_as_usual(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal that cannot make a segment (the disk is full) gives no room: the C-STORE
    then takes its usual way, which answers Out of Resources, instead of failing in the
    middle of its PDVs."""
    ingestor = _journalled(tmp_path)

    def full(self: Journal) -> Segment:
        raise JournalError(errno.ENOSPC, "cannot create a journal segment: no space")

    monkeypatch.setattr(Journal, "_create", full)
    try:
        data = sorted(series.iterdir())[0].read_bytes()
        assert ingestor.reserve(len(data)) is None
        assert ingestor.ingest(data, "CRASHER").status == OUT_OF_RESOURCES
    finally:
        ingestor.close()


def _journalled(root: Path, policy: str = "keep_first", segment: int = 1 << 22) -> Ingestor:
    url = f"sqlite:///{root / 'catalogue.sqlite'}"
    upgrade(url)
    spool = Spool(root / "spool", root / "quarantine")
    journal = Journal(spool.root / JOURNAL_DIR, segment)
    return Ingestor(spool, Catalogue(url), duplicate_policy=policy, journal=journal)


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_duplicates_behind_the_journal_follow_the_policy(
    policy: str, series: Path, tmp_path: Path
) -> None:
    from pydicom.dataset import Dataset

    from node.catalogue.models import AuditEvent

    ingestor = _journalled(tmp_path, policy)
    try:
        first = sorted(series.iterdir())[0]
        data = first.read_bytes()
        assert ingestor.ingest(data, "A").status == SUCCESS
        assert ingestor.settle()
        with ingestor.catalogue.session() as session:
            assert session.scalars(select(Instance.sha256)).one() is None, "filed unhashed"
        again = ingestor.ingest(data, "A")  # compared with the file, whose digest is kept
        assert again.status == SUCCESS and again.duplicate
        digest = hashlib.sha256(data).hexdigest()
        with ingestor.catalogue.session() as session:
            assert session.scalars(select(Instance.sha256)).one() == digest
        ds: Dataset = dcmread(first)
        ds.InstanceNumber = 999
        changed_path = tmp_path / "changed.dcm"
        ds.save_as(changed_path, enforce_file_format=True)
        changed = changed_path.read_bytes()
        assert ingestor.ingest(changed, "A").status == SUCCESS
        assert ingestor.settle()
        with ingestor.catalogue.session() as session:
            [row] = session.scalars(select(Instance)).all()
            stored = ingestor.spool.absolute(row.path).read_bytes()
            assert stored == (changed if policy == "replace" else data)
            assert session.scalars(select(Series)).one().instance_count == 1
            events = session.scalars(select(AuditEvent)).all()
            assert [e.action for e in events] == [
                "duplicate-differs-replaced"
                if policy == "replace"
                else "duplicate-differs-kept-first"
            ]
            received = hashlib.sha256(changed).hexdigest()
            assert events[0].details == {"before": digest, "received": received}
            assert row.sha256 == (received if policy == "replace" else digest)
    finally:
        ingestor.close()


def test_a_look_ahead_spares_the_lookup_and_goes_stale_once_its_uid_is_taken(
    series: Path, tmp_path: Path
) -> None:
    """A C-STORE's UID is looked up as its command arrives. That answer is used after the
    last byte only while nothing of the UID's lock was journalled or catalogued since:
    another association that stored the UID meanwhile makes it a duplicate again."""
    from sqlalchemy import event

    ingestor = _journalled(tmp_path)
    statements: list[str] = []
    event.listen(
        ingestor.catalogue.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    try:
        first, second = sorted(series.iterdir())[:2]
        uid = dcmread(first, stop_before_pixels=True).SOPInstanceUID
        ahead = ingestor.look_ahead(uid)
        assert ahead is not None, "a UID the node has not met is new"
        statements.clear()
        outcome = ingestor.ingest(first.read_bytes(), "A", expected_sop_uid=uid, ahead=ahead)
        assert outcome.status == SUCCESS and not outcome.duplicate
        assert not [s for s in statements if "FROM instances" in s], "not looked up again"
        assert ingestor.look_ahead(uid) is None, "journalled: not new"

        other = dcmread(second, stop_before_pixels=True).SOPInstanceUID
        ahead = ingestor.look_ahead(other)
        assert ahead is not None
        data = second.read_bytes()
        assert ingestor.ingest(data, "B", expected_sop_uid=other).status == SUCCESS
        late = ingestor.ingest(data, "C", expected_sop_uid=other, ahead=ahead)
        assert late.status == SUCCESS and late.duplicate, "its look-ahead went stale"
        assert ingestor.settle()
        with ingestor.catalogue.session() as session:
            assert len(session.scalars(select(Instance)).all()) == 2
            assert session.scalars(select(Series)).one().instance_count == 2
    finally:
        ingestor.close()


def _slow_disk(
    monkeypatch: pytest.MonkeyPatch, flushing: str, pause: float, started: Callable[[], object]
) -> Callable[[], int]:
    """Flushes that take ``pause`` seconds longer than the disk's, made by the compiled
    flusher (``flushing="compiled"``) or in Python; ``started`` is called as each begins
    (in Python only). Returns a count of the flushes made so far."""
    from node.store import journal as journal_module

    if flushing == "compiled":
        if journal_module._flush is None:
            pytest.skip("the compiled flusher is not built")
        made: list[Any] = []

        def slow(fd: int) -> Any:
            made.append(journal_module._flush.Flusher(fd, journal_module.FLUSHES_AT_ONCE, pause))
            return made[-1]

        monkeypatch.setattr(journal_module, "_flusher", slow)
        return lambda: sum(flusher.flushes for flusher in made)
    monkeypatch.setattr(journal_module, "_flush", None)
    flushes: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        flushes.append(fd)
        started()
        time.sleep(pause)
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", counted)
    return lambda: len(flushes)


@pytest.mark.parametrize("flushing", ["compiled", "python"])
def test_concurrent_associations_share_a_flush_and_full_segments_go(
    flushing: str, series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from node.store import journal as journal_module

    # A slow disk: appends of other threads pile up behind each flush. Two flushes at a
    # time, so that the series' slices are many more than run at once.
    monkeypatch.setattr(journal_module, "FLUSHES_AT_ONCE", 2)
    flushes = _slow_disk(monkeypatch, flushing, 0.02, lambda: None)
    ingestor = _journalled(tmp_path, segment=1 << 22)  # several instances per segment
    payloads = [p.read_bytes() for p in sorted(series.iterdir())]
    outcomes: list[int] = []

    def send(part: list[bytes]) -> None:
        for data in part:
            outcomes.append(ingestor.ingest(data, "A").status)

    senders = 4 * journal_module.FLUSHES_AT_ONCE  # more than flushes run at once
    threads = [threading.Thread(target=send, args=(payloads[i::senders],)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [SUCCESS] * SLICES
    assert 0 < flushes() < SLICES, "one flush covers several associations' instances"
    assert ingestor.settle()
    wait_for(
        lambda: len(list((ingestor.spool.root / JOURNAL_DIR).glob("*.journal"))) == 1,
        10,
        "full segments, filed and synced, are removed while the node runs (once quiet)",
    )
    ingestor.close()
    assert not list((ingestor.spool.root / JOURNAL_DIR).glob("*.journal"))
    with ingestor.catalogue.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == SLICES


def test_a_c_store_is_journalled_with_the_checksum_of_its_bytes(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener keeps each C-STORE's CRC-32 as its PDVs arrive (file meta first); the
    journal record carries that checksum, so it must be the checksum of exactly the bytes
    recorded: recovery after a crash keeps only records whose checksum holds. A new
    instance is written to the journal as it arrives: its first pages are in place before
    its last byte."""
    appended: list[tuple[int | None, int]] = []
    placed_early: list[int] = []
    real = Journal.commit

    def spy(
        self: Journal,
        reservation: Reservation,
        meta: dict[str, object],
        payload: list[bytes | memoryview],
        crc32: int | None = None,
        answer: Any = None,
    ) -> Segment:
        appended.append((crc32, zlib.crc32(b"".join(payload))))
        placed_early.append(reservation.placed)
        return real(self, reservation, meta, payload, crc32, answer)

    monkeypatch.setattr(Journal, "commit", spy)
    ingestor = _journalled(tmp_path)
    port = free_port()
    server = start_listener(
        DicomSettings(host="127.0.0.1", port=port, max_pdu=16384),  # several PDVs each
        ingestor,
        SourcePolicy(ingestor.catalogue, accept_any=True),
    )
    try:
        timed_send(port, [series])
    finally:
        server.shutdown()
        ingestor.close()
    assert len(appended) == SLICES
    assert all(given == actual for given, actual in appended), appended
    assert all(placed >= 16384 for placed in placed_early), placed_early
    with ingestor.catalogue.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == SLICES


def _fill(journal: Journal, payloads: list[bytes], tag: str) -> list[Segment]:
    """Append ``payloads`` (tagged), waiting between appends until a spare is ready once
    the first segment is a quarter full; the segments they went to."""
    segments = []
    for index, data in enumerate(payloads):
        segment = journal.append({"tag": tag, "n": index}, [data]).segment
        if segment not in segments:
            segments.append(segment)
        if index == 2:  # a quiet moment: the node's filer asks for a spare
            journal.prepare_spares(1)
            wait_for(lambda: journal.spares > 0, 10, "a spare segment is zero-filled")
    return segments


def test_a_reused_segment_never_replays_its_earlier_records(series: Path, tmp_path: Path) -> None:
    """A merely allocated segment is left for a zero-filled spare as soon as one is ready;
    a prepared segment, once retired, is kept as a spare (across restarts too) and reused
    under a higher number: after a crash only the records of its new life are read back,
    never the instances it held before (filed long ago)."""
    folder = tmp_path / "j"
    payloads = [p.read_bytes() for p in sorted(series.iterdir())]
    journal = Journal(folder, 1 << 22)
    assert list(journal.recover()) == []
    first, *_, last = _fill(journal, payloads[:6], "old")
    assert not first.prepared and last.prepared, "left for the zero-filled spare"
    for segment in journal.close():  # all filed and synced: retired
        journal.forget(segment)
    kept = last.path.with_suffix(".spare").name
    assert kept in {p.name for p in folder.iterdir()}
    assert {p.suffix for p in folder.iterdir()} == {".spare"}
    for fresh in folder.glob("*.spare"):  # a fresh spare made meanwhile: reuse the old one
        if fresh.name != kept:
            fresh.unlink()

    journal = Journal(folder, 1 << 22)
    assert list(journal.recover()) == [] and journal.spares == 1
    reused = journal.append({"tag": "new", "n": 0}, [payloads[6]]).segment
    assert reused.prepared and reused.number > last.number
    for segment in journal.close():  # a crash: nothing filed, nothing retired (and the
        os.close(segment.fd)  # spare it began zero-filling is stopped, not left running)
    found = list(Journal(folder, 1 << 22).recover())
    assert [(r.meta["tag"], r.payload) for r in found] == [("new", payloads[6])]


def test_records_of_the_earlier_format_are_still_read(tmp_path: Path) -> None:
    """A journal left by the previous version (records checked by SHA-256) is filed at
    the first start of this one."""
    import json
    import zlib

    from node.store import journal as journal_module

    folder = tmp_path / "j"
    folder.mkdir()
    payload = os.urandom(10_000)
    meta = json.dumps({"n": 1}).encode()
    head = journal_module._HEAD_V1.pack(
        b"CJR1", 1, len(meta), len(payload), hashlib.sha256(payload).digest()
    )
    check = journal_module._HEAD_CRC.pack(zlib.crc32(meta, zlib.crc32(head)))
    record = head + check + meta + payload
    (folder / "000000000001.journal").write_bytes(record + bytes(8192 - len(record) % 4096))
    [found] = list(Journal(folder).recover())
    assert found.meta == {"n": 1} and found.payload == payload


def test_a_busy_journal_reuses_its_retired_segments_and_zero_fills_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load, a drained segment becomes the journal's next spare, so that no spare
    is ever zero-filled (a whole segment of writes beside the instances arriving): the
    journal appends to merely allocated segments until its filled ones come back."""
    from node.store import journal as journal_module
    from node.store import write_ahead

    monkeypatch.setattr(write_ahead, "RETIRE_BYTES", 1 << 40)  # never by size: by spares
    monkeypatch.setattr(write_ahead, "IDLE_SECONDS", 3600.0)  # nor in a quiet moment
    fills: list[float] = []
    real_fill = journal_module.Journal._zero_fill

    def counted(self: Journal) -> None:
        fills.append(time.monotonic())
        real_fill(self)

    monkeypatch.setattr(journal_module.Journal, "_zero_fill", counted)
    many = tmp_path / "many"
    write_series(many, 80)  # about 11 segments of 4 MiB
    ingestor = _journalled(tmp_path, segment=1 << 22)
    journal = ingestor.write_ahead.journal  # type: ignore[union-attr]
    payloads = [p.read_bytes() for p in sorted(many.iterdir())]
    reused = []
    for index, data in enumerate(payloads):
        segment = journal._current
        assert ingestor.ingest(data, "A").status == SUCCESS
        assert ingestor.settle()  # a filer that keeps up, and retires what drained
        if index >= len(payloads) // 2 and segment is not None and segment.prepared:
            reused.append(segment.number)
    assert fills == [], "a spare was zero-filled while instances arrived"
    assert len(set(reused)) >= 2, "filled segments, drained, served again as spares"
    ingestor.close()


def test_a_burst_is_kept_as_spares_and_the_next_one_appends_to_them_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every segment a burst filled is kept as a spare (across a restart), up to what the
    filer lets a burst fill before it files, and the next burst appends to those alone:
    no segment made anew, none of its cached pages freed and taken again."""
    from node.store import journal as journal_module
    from node.store import write_ahead

    segment_bytes = 1 << 22
    assert journal_module.SPARE_SEGMENTS * journal_module.SEGMENT_BYTES >= (
        write_ahead.FILING_BACKLOG_BYTES
    ), "a burst the filer lets wait fits in the spares"
    folder = tmp_path / "j"
    payload = os.urandom(128_000)  # 32 records (128 KiB each, aligned) fill a 4 MiB segment
    journal = Journal(folder, segment_bytes)
    assert list(journal.recover()) == []
    for n in range(12 * 32):  # a burst of 12 segments, more than the 4 kept before
        journal.append({"n": n}, [payload])
    burst = journal.close()
    assert len(burst) == 12
    for segment in burst:  # filed and synced: retired
        journal.forget(segment)

    made: list[int] = []
    real_create = journal_module.Journal._create

    def counted(self: Journal) -> Segment:
        made.append(1)
        return real_create(self)

    monkeypatch.setattr(journal_module.Journal, "_create", counted)
    journal = Journal(folder, segment_bytes)
    assert list(journal.recover()) == [] and journal.spares == 12
    for n in range(10 * 32):
        assert journal.append({"n": n}, [payload]).segment.prepared
    assert made == [], "the next burst made a segment anew"
    for segment in journal.close():
        journal.forget(segment)


@pytest.mark.parametrize("flushing", ["compiled", "python"])
def test_a_writer_waits_for_the_flush_in_flight_and_no_longer(
    flushing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait_quiet`` (the filer's pace) returns at once with no flush in flight, when the
    flush ends, or at its time-out, whichever comes first."""
    import threading

    started = threading.Event()
    _slow_disk(monkeypatch, flushing, 1.0, started.set)
    journal = Journal(tmp_path / "j", 1 << 22)
    assert list(journal.recover()) == []
    began = time.monotonic()
    journal.wait_quiet(5.0)
    assert time.monotonic() - began < 0.5, "nothing in flight: no wait"
    append = threading.Thread(target=journal.append, args=({"n": 0}, [b"x" * 5000]))
    began = time.monotonic()
    append.start()
    if flushing == "python":
        assert started.wait(10)
    else:  # the compiled flusher's flush begins once the record is written
        wait_for(lambda: journal._current is not None, 10, "no segment")
        segment = journal._current
        assert segment is not None
        wait_for(lambda: segment.flusher.flushing, 10, "no flush began")
    journal.wait_quiet(0.2)
    assert 0.15 < time.monotonic() - began < 0.9, "a flush in flight: waited, up to the time-out"
    journal.wait_quiet(5.0)
    assert 0.9 < time.monotonic() - began < 3.0, "returned when the flush ended"
    append.join(10)
    for segment in journal.close():
        os.close(segment.fd)


@pytest.mark.parametrize("behind", [False, True])
def test_the_filer_paces_each_spool_file_between_journal_flushes(
    behind: bool, series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every direct write of a spool file the filer makes behind the journal first asks the
    journal for a quiet moment; not once the filer has fallen behind (``PACE_BELOW``)."""
    from node.store import direct_write, write_ahead

    asked: list[int] = []
    real_wait = Journal.wait_quiet

    def counted(self: Journal, timeout: float) -> None:
        asked.append(1)
        real_wait(self, timeout)

    monkeypatch.setattr(Journal, "wait_quiet", counted)
    monkeypatch.setattr(direct_write, "_refused", set())
    if behind:
        monkeypatch.setattr(write_ahead, "PACE_BELOW", 0)
    ingestor = _journalled(tmp_path)
    payloads = [p.read_bytes() for p in sorted(series.iterdir())]
    for data in payloads:
        assert ingestor.ingest(data, "A").status == SUCCESS
    assert ingestor.settle()
    steps = sum(
        -(-(len(d) // direct_write.BLOCK * direct_write.BLOCK) // direct_write.PACED_STEP)
        for d in payloads
    )
    assert len(asked) == (0 if behind else steps)
    ingestor.close()


def test_the_filer_writes_each_spool_file_in_place_under_its_own_name(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind the journal, a spool file is created once under its final name: no temporary
    name and no rename, each of which locks the series' folder (the filing threads spun on
    that lock). Its bytes are exact once filed."""
    real_open, real_replace = os.open, os.replace
    created: list[str] = []
    renamed: list[str] = []

    def logged_open(path: str, flags: int, *args: int) -> int:
        spooled = str(tmp_path / "spool") in str(path) and JOURNAL_DIR not in str(path)
        if flags & os.O_CREAT and spooled:
            created.append(str(path))
        return real_open(path, flags, *args)

    def logged_replace(source: str, target: str) -> None:
        if str(tmp_path / "spool") in str(target) and JOURNAL_DIR not in str(target):
            renamed.append(str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "open", logged_open)
    monkeypatch.setattr(os, "replace", logged_replace)
    ingestor = _journalled(tmp_path)
    try:
        payloads = [p.read_bytes() for p in sorted(series.iterdir())]
        for data in payloads:
            assert ingestor.ingest(data, "A").status == SUCCESS
        assert ingestor.settle()
        with ingestor.catalogue.session() as session:
            rows = list(session.scalars(select(Instance)))
        paths = {str(ingestor.spool.absolute(row.path)) for row in rows}
        assert sorted(created) == sorted(paths), "each file created once, under its name"
        assert renamed == []
        assert sorted(ingestor.spool.absolute(r.path).read_bytes() for r in rows) == sorted(
            payloads
        )
    finally:
        ingestor.close()


def test_a_record_is_catalogued_promptly_without_anyone_waiting_for_it(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filer is woken by the record that starts a batch, not by every record: readers
    (QIDO, completion) still see an instance promptly after its Success, with nobody in
    settle() to hurry the filer, whether it was idle or gathering a batch."""
    from node.store import write_ahead

    monkeypatch.setattr(write_ahead, "IDLE_SECONDS", 60.0)  # a missed wake-up would show
    ingestor = _journalled(tmp_path)
    try:
        payloads = [p.read_bytes() for p in sorted(series.iterdir())]

        def catalogued() -> int:
            with ingestor.catalogue.session() as session:
                return session.scalar(select(func.count()).select_from(Instance)) or 0

        assert ingestor.ingest(payloads[0], "A").status == SUCCESS  # the filer was idle
        wait_for(lambda: catalogued() == 1, 10, "the first record was not filed")
        for data in payloads[1:]:  # fewer than a batch: filed after FILING_DELAY
            assert ingestor.ingest(data, "A").status == SUCCESS
        wait_for(lambda: catalogued() == len(payloads), 10, "the batch was not filed")
    finally:
        ingestor.close()


def test_a_record_naming_a_path_of_its_own_is_never_filed(
    series: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery reads every 4 KiB boundary of a segment, so also what lies between records:
    bytes a sender chose, left by a record cut short or by the segment's earlier use. A
    record found there that names a path other than the spool's own for its UIDs (outside
    the spool), or lacks what the node writes, is skipped; the node starts, and the records
    beside it are filed."""
    from node.store.header import read_header
    from node.store.write_ahead import header_meta

    url = f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    upgrade(url)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    journal = Journal(spool.root / JOURNAL_DIR, 1 << 22)
    assert list(journal.recover()) == []
    first, second = (p.read_bytes() for p in sorted(series.iterdir())[:2])
    evil_header, good_header = read_header(first), read_header(second)
    evil = header_meta(evil_header, "../escaped.dcm", "EVIL")
    good = header_meta(
        good_header,
        spool.relative_path(
            good_header.study_instance_uid,
            good_header.series_instance_uid,
            good_header.sop_instance_uid,
        ),
        "A",
    )
    for meta in (evil, {"sop": evil_header.sop_instance_uid}, good):
        journal.append(meta, [first if meta is not good else second])
    for segment in journal.close():  # a crash: nothing filed
        os.close(segment.fd)

    ingestor = Ingestor(spool, Catalogue(url), journal=Journal(spool.root / JOURNAL_DIR, 1 << 22))
    ingestor.close()
    assert not (tmp_path / "escaped.dcm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".dcm"] == []
    with ingestor.catalogue.session() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [
            good_header.sop_instance_uid
        ]
    assert sum("not one of ours" in r.getMessage() for r in caplog.records) == 2


def test_a_record_hidden_in_an_instance_is_never_read_back(tmp_path: Path) -> None:
    """A sender's instance may hold bytes that look like a journal record at 4 KiB
    boundaries, claiming any segment number. Recovery scans past a record cut short, and
    over what a reused segment held before: neither ever reads such bytes back."""
    import json

    from node.store import journal as journal_module

    def forged(number: int) -> bytes:
        meta, payload = json.dumps({"forged": number}).encode(), b"forged payload"
        head = journal_module._HEAD.pack(
            b"CJR2", number, len(meta), len(payload), zlib.crc32(payload)
        )
        record = head + journal_module._HEAD_CRC.pack(zlib.crc32(meta, zlib.crc32(head)))
        record += meta + payload
        return record + bytes(4096 - len(record))

    def recovered() -> list[dict[str, object]]:
        return [record.meta for record in Journal(folder, 1 << 22).recover()]

    folder = tmp_path / "j"
    journal = Journal(folder, 1 << 22)
    assert list(journal.recover()) == []
    carrier_meta = {"carrier": 1}
    lead = 4096 - journal_module.HEAD_BYTES - len(json.dumps(carrier_meta, separators=(",", ":")))
    carrier = b"".join(forged(number) for number in range(1, 5))  # on 4 KiB boundaries
    journal.append(carrier_meta, [bytes(lead), carrier])
    [segment] = journal.close()
    os.close(segment.fd)
    assert recovered() == [carrier_meta]

    # Cut short by a crash: its last byte never reached the disk.
    with segment.path.open("r+b") as fp:
        fp.seek(4096 + len(carrier) - 1)
        fp.write(b"\xff")
    assert recovered() == []

    # Retired and kept as a spare, then reused under the next number.
    segment.path.rename(segment.path.with_suffix(".spare"))
    journal = Journal(folder, 1 << 22)
    assert list(journal.recover()) == [] and journal.spares == 1
    reused = journal.append({"new": 1}, [b"y"]).segment
    assert reused.prepared and reused.number == segment.number + 1
    for left in journal.close():
        os.close(left.fd)
    assert recovered() == [{"new": 1}]


def test_the_journal_checksum_is_zlib_crc32_piece_by_piece() -> None:
    """Records written before the faster CRC-32 must stay readable: the same values, also
    when it is carried from fragment to fragment as PDVs arrive."""
    from node.store.checksum import crc32

    data = os.urandom(300_001)
    pieces = [data[:1], data[1:70_000], data[70_000:]]
    carried = 0
    for piece in pieces:
        carried = crc32(memoryview(piece), carried)
    assert carried == zlib.crc32(data) == crc32(data)
    assert crc32(b"") == zlib.crc32(b"") and crc32(b"x", 7) == zlib.crc32(b"x", 7)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_the_compiled_flusher_is_built_where_a_compiler_is() -> None:
    from node.store import journal as journal_module

    assert journal_module._flush is not None, "setup.py builds node.store._flush"


def test_the_compiled_flusher_sends_an_answer_only_once_its_record_is_flushed(
    tmp_path: Path,
) -> None:
    """commit(writes, socket, answer): the answer goes out after the flush, never when the
    write or the flush failed; a send that fails says so (UNSENT) with the record durable."""
    import socket

    from node.store import journal as journal_module

    flush = journal_module._flush
    if flush is None:
        pytest.skip("the compiled flusher is not built")
    fd = os.open(tmp_path / "segment", os.O_RDWR | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_WRONLY)  # takes writes; refuses fdatasync (EINVAL)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    try:
        flusher = flush.Flusher(fd)
        assert flusher.commit([(0, [b"one"])], ours.fileno(), b"Success") == (flush.OK, 0)
        assert theirs.recv(64) == b"Success"
        assert flusher.flushes == 1
        assert flush.Flusher(null).commit([(0, [b"two"])], ours.fileno(), b"Success")[0] == (
            flush.FLUSH_FAILED
        )
        with pytest.raises(BlockingIOError):
            theirs.recv(64)  # nothing said of a record that is not durable
        theirs.close()
        status, error = flusher.commit([(8, [b"three"])], ours.fileno(), b"Success")
        assert (status, error) == (flush.UNSENT, errno.EPIPE)
        assert os.pread(fd, 5, 8) == b"three", "written and flushed all the same"
    finally:
        ours.close()
        theirs.close()
        os.close(fd)
        os.close(null)


@pytest.mark.parametrize("flushing", ["compiled", "python"])
def test_a_record_the_disk_refuses_is_an_error_and_one_unflushed_stays_counted(
    flushing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk refuses raises, and the record is not counted as waiting to be
    filed (it was never written whole); a flush that fails raises too, and its record
    stays counted (it may be on disk: its segment is not let go before a restart reads
    it). The same whether the journal writes in C or in Python."""
    from node.store import journal as journal_module

    if flushing == "compiled" and journal_module._flush is None:
        pytest.skip("the compiled flusher is not built")
    if flushing == "python":
        monkeypatch.setattr(journal_module, "_flush", None)
    journal = Journal(tmp_path / "j", 1 << 22)
    assert list(journal.recover()) == []
    journal.append({"n": 0}, [b"x" * 5000])
    segment = journal._current
    assert segment is not None and segment.outstanding == 1
    read_only = os.open(segment.path, os.O_RDONLY)
    null = os.open(os.devnull, os.O_WRONLY)  # takes writes; refuses fdatasync (EINVAL)
    writable = segment.fd

    def write_to(fd: int) -> None:  # the segment's writes go to fd from now on
        if flushing == "compiled":
            segment.flusher = journal_module._flush.Flusher(fd)
        else:
            segment.fd = fd

    try:
        write_to(read_only)
        with pytest.raises(JournalError, match="cannot write to the journal"):
            journal.append({"n": 1}, [b"y" * 5000])
        assert segment.outstanding == 1, "a record never written is not waited for"
        write_to(null)
        with pytest.raises(JournalError, match="cannot flush the journal"):
            journal.append({"n": 2}, [b"z" * 5000])
        assert segment.outstanding == 2, "a record written but not flushed stays counted"
    finally:
        segment.fd = writable
        os.close(read_only)
        os.close(null)
    for left in journal.close():
        os.close(left.fd)


@pytest.mark.parametrize("flushing", ["compiled", "python"])
def test_an_answer_the_journal_sent_is_waited_for_by_settle_before_it_is_counted(
    flushing: str, series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled journal sends a sender's Success the moment its record is durable, and
    the instance is entered for filing after: a settle() begun in between (the end of an
    association, a storage commitment request) waits for that instance, rather than
    finding nothing to wait for and letting completion count its series short. Where the
    journal is not compiled, nothing is sent: the caller answers, as before."""
    import socket
    import threading

    from node.store import journal as journal_module
    from node.store.journal import Answer

    if flushing == "compiled" and journal_module._flush is None:
        pytest.skip("the compiled flusher is not built")
    if flushing == "python":
        monkeypatch.setattr(journal_module, "_flush", None)
    durable, go_on = threading.Event(), threading.Event()
    original = journal_module.Journal._durable

    def held(self: Journal, segment: Segment, writes: Any, answer: Any = None) -> None:
        original(self, segment, writes, answer)
        durable.set()
        assert go_on.wait(10)

    monkeypatch.setattr(journal_module.Journal, "_durable", held)
    ingestor = _journalled(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        data = sorted(series.iterdir())[0].read_bytes()
        answer = Answer(ours.fileno(), b"Success")
        outcomes: list[int] = []
        sender = threading.Thread(
            target=lambda: outcomes.append(ingestor.ingest(data, "A", answer=answer).status)
        )
        sender.start()
        assert durable.wait(10)
        if flushing == "python":
            go_on.set()
            sender.join(10)
            assert outcomes == [SUCCESS] and not answer.sent, "the caller answers"
            return
        theirs.settimeout(5)
        assert theirs.recv(16) == b"Success", "answered once durable, before anything else"
        assert answer.sent
        assert not ingestor.settle(timeout=0.3), "settle() waits for the answered instance"
        go_on.set()
        sender.join(10)
        assert outcomes == [SUCCESS]
        assert ingestor.settle(timeout=10)
        with ingestor.catalogue.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 1
    finally:
        go_on.set()
        ours.close()
        theirs.close()
        ingestor.close()
