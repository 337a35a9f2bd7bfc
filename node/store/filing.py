"""Filing journalled instances: their spool files written, their catalogue rows committed.

:mod:`node.store.write_ahead` decides what to file and when; this module files it, either
in the listener's own process (:class:`Filer`) or in a process of its own
(:class:`FilingProcess`), which reads each instance back from its journal segment.

Why a process of its own: the filer's work (writing half a megabyte per instance, a
catalogue insert, Python around both) ran on the same interpreter lock as the association
threads. On one association, storescu sending 300 slices, the cycles that overlapped a
filing batch took 3.2 ms on average against 1.14 ms for those that did not, a third of the
series' time. In another process the filer takes none of the listener's interpreter lock,
and runs at a lower priority (``FILING_NICE``): its work waits for a processor the
receivers leave, not the other way round. Nothing about durability changes: the journal
still answers for each instance, and a segment is retired only after the listener's
process has synced the file system and the catalogue behind what the filer reported
filed (:meth:`node.store.write_ahead.WriteAhead._retire`).

The filing process serves one batch at a time over a socket pair: the listener's process
sends the batch (headers, paths and where each payload is in the journal), the filing
process files it and answers with the paths filed, or why not. If it dies, the batch stays
in the journal; it is started again and the batch sent again (filing one record twice
finds its row and leaves it).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.catalogue.instance_lookups import KNOWN_ANY
from node.store.buffers import Parts, joined, sha256_of
from node.store.direct_write import BLOCK, write_new
from node.store.header import InstanceHeader
from node.store.journal import Segment
from node.store.spool import Spool, StoredFile, file_sha256, write_durably

try:  # built by setup.py where there is a C compiler; else the pool of Python threads
    from node.store import _filing  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised where the module is not built
    _filing = None

if TYPE_CHECKING:
    from node.store.ingest import Ingestor

log = logging.getLogger(__name__)

FILING_THREADS = 4  # write spool files in parallel (a write releases the GIL)
FILING_NICE = 10  # the filing process's niceness: the receivers first
START_SECONDS = 60.0  # longest wait for a new filing process to say it is ready
# Commits behind the journal need not wait for the disk; the write-ahead's catalogue
# barrier makes them durable before the journal lets go of their records.
_RELAXED = ("sqlite", "postgresql")


@dataclass
class Pending:
    """An instance in the journal, waiting to be filed."""

    header: InstanceHeader
    payload: Parts | None  # the Part 10 bytes as received; None: read back from ``source``
    size: int
    relative_path: str
    calling_ae: str | None
    segment: Segment | None  # None: recovered from a segment of an earlier run
    source: tuple[str, int] | None = None  # (the segment's path, the payload's offset)
    sha256: str | None = None  # computed (:func:`_digest`) only to compare it with a row

    def bytes(self, segments: Segments | None = None) -> Parts:
        """The payload, read back from the journal where it is not held (from its
        segment's map in ``segments``, where given)."""
        if self.payload is None and segments is not None:
            return (segments.view(self),)
        if self.payload is None:
            assert self.source is not None
            path, offset = self.source
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, self.size, offset)
            finally:
                os.close(fd)
            if len(data) != self.size:
                raise OSError(f"a journal record of {self.size} bytes is cut short in {path}")
            return (data,)
        return self.payload


class Segments:
    """The journal segments a batch's payloads are read from, each mapped once.

    Reading a payload back into a string of its own, then copying it into the direct
    writer's aligned buffer, moved each instance through memory twice in the filing
    process. From a map of its segment, a payload that starts on a page boundary (one the
    listener wrote as it arrived) goes from the page cache to the disk with no copy at
    all. A map lives as long as the views of it: the batch's. The pages of a payload
    written are let go of the map at once (:meth:`done`): the page cache keeps them, and
    the filing process's resident size stays what it was."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, item: Pending) -> memoryview:
        """``item``'s payload, as a view of its segment's map."""
        assert item.source is not None
        path, offset = item.source
        mapped = self._maps.get(path)
        if mapped is None:
            with open(path, "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            mapped = self._maps.setdefault(path, mapped)
        if offset + item.size > len(mapped):
            raise OSError(f"a journal record of {item.size} bytes is cut short in {path}")
        return memoryview(mapped)[offset : offset + item.size]

    def done(self, item: Pending) -> None:
        """Let go of the pages of ``item``'s payload in its map (they stay cached)."""
        assert item.source is not None
        path, offset = item.source
        mapped = self._maps.get(path)
        if mapped is not None:
            start = offset // mmap.PAGESIZE * mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED, start, offset + item.size - start)


class Filer:
    """Writes the spool files of journal records and commits their catalogue rows."""

    def __init__(self, ingestor: Ingestor, pace: Callable[[], None] | None = None) -> None:
        self.ingestor = ingestor
        self._pace = pace
        self._pool = ThreadPoolExecutor(FILING_THREADS, thread_name_prefix="journal-filing")

    def close(self) -> None:
        self._pool.shutdown()

    def file(self, batch: list[Pending], durably: bool = False) -> list[str]:
        """Write the spool files of ``batch`` and commit the catalogue rows of those not
        catalogued yet; the relative paths, in order. A record already catalogued (filed
        before a crash) gets its file back if it lost it; one whose row now holds other
        bytes (replaced since) is left as it is."""
        ingestor = self.ingestor
        with ingestor.catalogue.engine.connect() as connection:
            rows = connection.execute(
                KNOWN_ANY, {"uids": [i.header.sop_instance_uid for i in batch]}
            )
            known = {uid: sha256 for uid, _, sha256, _ in rows}
        segments = Segments()

        def place(item: Pending) -> None:
            """Write one record's file unless it need not be. A new instance's is written
            as it is: its digest is computed when first needed (:mod:`node.store.ingest`),
            not here. One already catalogued (filed before a crash) is compared with its
            file: the same bytes are left, a file cut short is written again. A row
            without a digest was filed from the journal, from this very record (a
            duplicate or a replacement goes the other path, and sets the digest)."""
            uid = item.header.sop_instance_uid
            path = ingestor.spool.absolute(item.relative_path)
            if uid not in known:
                self._write(path, item, segments, durably)
                return
            digest, before = _digest(item), known[uid]
            if (before is None or before == digest) and file_sha256(path) != digest:
                self._write(path, item, segments, durably)

        rest = batch
        if _filing is not None and self._pace is None and not durably:
            # New instances read from the journal in one compiled call; the rest as before.
            fresh = [i.payload is None and i.header.sop_instance_uid not in known for i in batch]
            self._write_new([i for i, is_new in zip(batch, fresh, strict=True) if is_new], segments)
            rest = [i for i, is_new in zip(batch, fresh, strict=True) if not is_new]
        for _ in self._pool.map(place, rest):  # writing releases the interpreter
            pass
        new: dict[str | None, list[tuple[InstanceHeader, StoredFile]]] = defaultdict(list)
        for item in batch:
            if item.header.sop_instance_uid not in known:
                stored = StoredFile(item.relative_path, item.size, None)
                new[item.calling_ae].append((item.header, stored))
        if new:
            with ingestor._catalogue_lock, ingestor.catalogue.engine.connect() as connection:
                relaxed = not durably and connection.dialect.name in _RELAXED
                if relaxed and connection.dialect.name == "sqlite":
                    connection.exec_driver_sql("PRAGMA synchronous=NORMAL")
                    connection.commit()
                try:
                    with connection.begin():
                        if relaxed and connection.dialect.name == "postgresql":
                            connection.exec_driver_sql("SET LOCAL synchronous_commit = off")
                        for ae, instances in new.items():
                            ingestor._add_instances(connection, list(instances), ae)
                finally:
                    if relaxed and connection.dialect.name == "sqlite":
                        connection.exec_driver_sql("PRAGMA synchronous=FULL")
                        connection.commit()
        return [item.relative_path for item in batch]

    def _write_new(self, batch: list[Pending], segments: Segments) -> None:
        """Write the spool files of new instances read from the journal in one compiled
        call (:mod:`node.store._filing`), as :meth:`_write` writes one; OSError for the
        first that failed (each that failed is removed)."""
        if not batch:
            return
        spool = self.ingestor.spool
        paths = [spool.absolute(item.relative_path) for item in batch]
        for folder in {path.parent for path in paths}:
            spool._ensure_dir(folder)
        jobs = [(str(path), segments.view(item)) for path, item in zip(paths, batch, strict=True)]
        # Each payload's pages let go of its map once written (see Segments.done).
        errors = _filing.write_files(jobs, FILING_THREADS, True)
        for path, error in zip(paths, errors, strict=True):
            if error:
                raise OSError(error, os.strerror(error), str(path))

    def _write(self, path: Path, item: Pending, segments: Segments, durably: bool) -> None:
        self.ingestor.spool._ensure_dir(path.parent)
        try:
            payload = item.bytes(segments)
            if durably:
                write_durably(path, joined(payload))
                return
            # A payload read from its segment's map at a page boundary is written from there.
            source = item.source if item.payload is None else None
            aligned = source is not None and source[1] % BLOCK == 0
            # Written in place, under its own name: no reader looks for it before its row
            # is committed, and one a crash cuts short is written again from the journal
            # (durably, renamed into place) before anyone reads. A temporary name and a
            # rename would lock the series' folder twice more per file (four filing threads
            # spun on that lock).
            try:
                write_new(path, payload, pace=self._pace, replace=True, aligned=aligned)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        finally:
            if item.payload is None:
                segments.done(item)


def _digest(item: Pending) -> str:
    """The catalogue's SHA-256 of an instance in the journal, computed once."""
    if item.sha256 is None:
        item.sha256 = sha256_of(item.bytes())
    return item.sha256


# -- a process of its own -----------------------------------------------------------------


class FilingFailed(Exception):
    """The filing process could not file a batch (it says why), or is gone."""


class FilingProcess:
    """The filer in a process of its own, started with the node and again after it dies."""

    def __init__(self, catalogue_url: str, spool: Spool, duplicate_policy: str) -> None:
        self._config = {
            "url": catalogue_url,
            "spool": str(spool.root),
            "quarantine": str(spool.quarantine_root),
            "policy": duplicate_policy,
        }
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None

    def start(self) -> None:
        """Start the filing process now, in the background, so that the first batch does
        not wait for it to import what it needs (a second or two)."""

        def start() -> None:
            with self._lock:
                try:
                    self._ready()
                except FilingFailed as exc:  # the first batch tries again, or is filed here
                    log.warning("%s", exc)

        threading.Thread(target=start, name="filing-start", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def file(self, batch: list[Pending]) -> list[str]:
        """File ``batch`` (records whose payload is in the journal) in the filing process;
        the relative paths, in order. :class:`FilingFailed` if it cannot."""
        # All but the bytes (read back from the journal there) and this process's segment.
        jobs = [replace(item, payload=None, segment=None) for item in batch]
        assert all(job.source is not None for job in jobs)
        with self._lock:
            # Twice at most: a process killed a moment ago may not be reaped yet (its
            # threads still exiting), so it looked alive and took the batch to its grave;
            # the next try starts a new one, once the old is gone.
            for tries_left in (1, 0):
                connection = self._ready()
                try:
                    connection.send(jobs)
                    answer = connection.recv()
                    break
                except (EOFError, OSError) as exc:
                    self._stop()
                    if not tries_left:
                        raise FilingFailed(f"the filing process is gone: {exc}") from None
                    log.warning("the filing process is gone (%s): starting another", exc)
        if answer[0] != "filed":
            raise FilingFailed(answer[1])
        paths: list[str] = answer[1]
        return paths

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                with contextlib.suppress(OSError):
                    self._connection.send(None)
            self._stop()

    def _ready(self) -> Connection:
        """The connection to a running filing process, started here if there is none."""
        if self._connection is not None and self._process is not None:
            if self._process.poll() is None:
                return self._connection
            self._stop()
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "node.store.filing", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        self._connection = Connection(ours.detach())
        try:
            self._connection.send(self._config)
            if not self._connection.poll(START_SECONDS) or self._connection.recv() != "ready":
                raise FilingFailed("the filing process did not start")
        except (EOFError, OSError) as exc:
            self._stop()
            raise FilingFailed(f"the filing process did not start: {exc}") from None
        except FilingFailed:
            self._stop()
            raise
        return self._connection

    def _stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _serve(connection: Connection) -> None:
    """The filing process: file each batch the listener's process sends, until it closes."""
    from node.catalogue.db import Catalogue
    from node.store.ingest import Ingestor

    config: dict[str, Any] = connection.recv()
    spool = Spool(Path(config["spool"]), Path(config["quarantine"]))
    ingestor = Ingestor(spool, Catalogue(config["url"]), duplicate_policy=config["policy"])
    filer = Filer(ingestor)
    connection.send("ready")
    while True:
        try:
            batch: list[Pending] | None = connection.recv()
        except EOFError:  # the listener's process is gone
            break
        if batch is None:
            break
        try:
            answer: tuple[str, Any] = ("filed", filer.file(batch))
        except Exception as exc:  # the listener logs it and sends the batch again later
            answer = ("failed", f"{type(exc).__name__}: {exc}")
        try:
            connection.send(answer)
        except OSError:  # the listener's process is gone: what it sent is in its journal
            break
    filer.close()
    ingestor.catalogue.dispose()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(OSError):  # not allowed here: it files at the listener's priority
        os.nice(FILING_NICE)
    _serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":  # started by FilingProcess
    main()
