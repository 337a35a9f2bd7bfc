"""Filing behind the journal: in a process of its own (as the node runs), each instance
lands in the spool and the catalogue exactly as received, read back from the journal; a
filing process that dies is replaced and loses nothing; and instances wait to be filed
while their sender's stream goes on, then are filed once it pauses, once the backlog
reaches its bound, or at once when something waits for them."""

from __future__ import annotations

import os
import signal
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from benchmarks.ingest import write_series
from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance, Series
from node.core.status import SUCCESS
from node.store import write_ahead
from node.store.ingest import Ingestor
from node.store.journal import JOURNAL_DIR, Journal
from node.store.spool import Spool
from tests.support.peers import wait_for

SLICES = 8


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("filing") / "series"
    write_series(folder, SLICES)
    return [path.read_bytes() for path in sorted(folder.iterdir())]


def _ingestor(root: Path, separate: bool) -> Ingestor:
    url = f"sqlite:///{root / 'catalogue.sqlite'}"
    upgrade(url)
    spool = Spool(root / "spool", root / "quarantine")
    journal = Journal(spool.root / JOURNAL_DIR, 1 << 22)
    return Ingestor(spool, Catalogue(url), journal=journal, filing_process=separate)


def _catalogued(ingestor: Ingestor) -> dict[str, str]:
    with ingestor.catalogue.session() as session:
        return {row.sop_instance_uid: row.path for row in session.scalars(select(Instance))}


def _check_stored(ingestor: Ingestor, sent: list[bytes]) -> None:
    rows = _catalogued(ingestor)
    assert len(rows) == len(sent)
    for data in sent:
        uid = dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert ingestor.spool.absolute(rows[uid]).read_bytes() == data
    with ingestor.catalogue.session() as session:
        assert session.scalar(select(func.sum(Series.instance_count))) == len(sent)


def test_a_filing_process_files_each_instance_as_received(
    series: list[bytes], tmp_path: Path
) -> None:
    ingestor = _ingestor(tmp_path, separate=True)
    try:
        for data in series:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
        assert ingestor.settle(30)
        pid = ingestor.write_ahead.filing_pid if ingestor.write_ahead else None
        assert pid is not None and pid != os.getpid()
        _check_stored(ingestor, series)
    finally:
        ingestor.close()
    assert not Path(f"/proc/{pid}").exists() or _gone(pid), "closing stops the process"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_a_filing_process_that_dies_is_replaced_and_nothing_is_lost(
    series: list[bytes], tmp_path: Path
) -> None:
    ingestor = _ingestor(tmp_path, separate=True)
    try:
        for data in series[:3]:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
        assert ingestor.settle(30)
        assert ingestor.write_ahead is not None
        first = ingestor.write_ahead.filing_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _gone(first), 10, "the filing process did not die")
        for data in series[3:]:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
        assert ingestor.settle(60)
        _check_stored(ingestor, series)
        assert ingestor.write_ahead.filing_pid not in (None, first), "a new process files"
    finally:
        ingestor.close()


@pytest.mark.parametrize("separate", [False, True], ids=["here", "own-process"])
def test_instances_wait_while_they_keep_arriving_and_are_filed_when_the_stream_pauses(
    series: list[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    separate: bool,
) -> None:
    """Filing beside a stream slows it (every journal flush also carries the spool files
    written since the last): the instances of one are filed once it pauses."""
    monkeypatch.setattr(write_ahead, "FILING_QUIET", 1.0)
    ingestor = _ingestor(tmp_path, separate)
    try:
        for data in series:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
            time.sleep(0.05)  # a stream: each well within FILING_QUIET of the one before
            assert _catalogued(ingestor) == {}, "nothing is filed while the stream goes on"
        wait_for(lambda: len(_catalogued(ingestor)) == len(series) or None, 30, "filed")
        _check_stored(ingestor, series)
    finally:
        ingestor.close()


def test_a_backlog_at_its_bound_is_filed_while_the_stream_goes_on(
    series: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(write_ahead, "FILING_QUIET", 30.0)
    ingestor = _ingestor(tmp_path, separate=False)
    try:
        assert ingestor.write_ahead is not None
        ingestor.write_ahead._backlog = 3 * len(series[0])  # three instances' worth
        for data in series:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
        filed = wait_for(lambda: len(_catalogued(ingestor)) or None, 20, "anything filed")
        assert filed >= 3
    finally:
        ingestor.close()


def test_what_someone_waits_for_is_filed_at_once(
    series: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An association's end and an N-service request wait for what came before them: the
    filer does not wait for the stream to pause then."""
    monkeypatch.setattr(write_ahead, "FILING_QUIET", 30.0)
    ingestor = _ingestor(tmp_path, separate=True)
    try:
        for data in series:
            assert ingestor.ingest(data, "SCU").status == SUCCESS
        started = time.monotonic()
        assert ingestor.settle(60)
        assert time.monotonic() - started < 25, "settled without waiting for the quiet"
        _check_stored(ingestor, series)
    finally:
        ingestor.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_records_are_filed_from_their_segment_as_they_are(
    series: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """The filing process reads records from their segment's map: one the listener wrote as
    it arrived (its payload on a page boundary) and one appended after its last byte (its
    payload anywhere), both filed as the same bytes and catalogued, by the compiled batch
    writer or, where it is not built, by the pool of threads, which writes an aligned
    payload from the map itself, never through its thread's buffer."""
    from node.store import direct_write, filing
    from node.store.filing import Filer, Pending
    from node.store.header import read_header

    if compiled and filing._filing is None:
        pytest.skip("the compiled batch writer is not built here")
    if not compiled:
        monkeypatch.setattr(filing, "_filing", None)
    ingestor = _ingestor(tmp_path, separate=False)
    journal = Journal(tmp_path / "journal", 16 << 20)
    assert list(journal.recover()) == []
    jobs = []
    for number, data in enumerate(series[:4]):
        header = read_header(data)
        relative = ingestor.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        meta = write_ahead.header_meta(header, relative, "SCU")
        if number % 2:
            entry = journal.append(meta, [data])
            assert entry.payload_at % 4096, "an appended payload is not on a page boundary"
        else:
            room = journal.reserve(len(data) + 8192)
            assert room is not None
            room.feed(data[: len(data) // 2])
            entry = journal.commit(room, meta, [data])
            assert entry.payload_at % 4096 == 0
        source = (str(entry.segment.path), entry.payload_at)
        jobs.append(Pending(header, None, len(data), relative, "SCU", None, source))
    copied: list[int] = []
    original = direct_write._buffer

    def buffer() -> object:
        copied.append(1)
        return original()

    monkeypatch.setattr(direct_write, "_buffer", buffer)
    filer = Filer(ingestor)
    try:
        assert filer.file(jobs) == [job.relative_path for job in jobs]
        _check_stored(ingestor, series[:4])
    finally:
        filer.close()
        ingestor.close()
        journal.close()
    assert len(copied) == (0 if compiled else 2), "only the appended payloads copied"
