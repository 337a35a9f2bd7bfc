"""Instances made durable in the journal first, filed into spool and catalogue behind it.

The listener's answer waits for one thing only: the journal record holding the instance's
bytes and its catalogue record is on disk (:mod:`node.store.journal`, one ``fdatasync``
shared by every association waiting at that moment). A thread behind it then writes the
spool files (in place, under their own names, not yet fsynced) and commits the catalogue
rows of the records waiting, in one transaction, once the senders pause
(:meth:`WriteAhead._gather`), in a process of its own where the node runs
(:mod:`node.store.filing`); a journal segment is retired only once all its files are
fsynced. Until then, a crash at any point is repaired at start-up, before anything
reads the spool or the catalogue: every record left in the journal is filed again, and one
already filed is recognised by its SOP Instance UID (its file is compared with the record's
bytes, and written again if it differs), so it is never catalogued twice.

The filer does not hash what it files: an instance's row gets its SHA-256 when something
first needs it (:meth:`node.store.ingest.Ingestor._digest_known`, when its UID arrives
again). Hashing every instance as it was filed cost 0.3-0.45 ms of processor time each, on
the processors the senders and the listener share.

Readers (QIDO/WADO, completion, routing) see an instance once its row is committed: at the
end of its sender's stream (or of a second or two of it); the end of an association, and
every N-service request, wait until what was received before them is filed
(:meth:`WriteAhead.settle`), so completion never counts a series short. Only new SOP
Instance UIDs take this path: a duplicate, whatever the policy, goes the file-per-instance
way of :mod:`node.store.ingest` (after anything of its UID still in the journal is filed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.instance_lookups import INSTANCES as _INSTANCES
from node.catalogue.instance_lookups import UidLookup
from node.core.status import OUT_OF_RESOURCES, SUCCESS
from node.core.uids import validate_uid
from node.store.buffers import Parts, size_of
from node.store.filing import Filer, FilingFailed, FilingProcess, Pending
from node.store.header import InstanceHeader
from node.store.journal import (
    SEGMENT_BYTES,
    SPARE_SEGMENTS,
    Answer,
    Journal,
    JournalError,
    Record,
    Reservation,
    Segment,
)
from node.store.spool import (
    Spool,
    fsync_dir,
    leftovers_beside,
)
from node.store.syscalls import syncfs

if TYPE_CHECKING:
    from node.store.ingest import Ingestor, IngestOutcome

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 128 << 20  # received, in the journal, not yet filed: held in memory
MAX_JOURNALLED_BYTES = 4 << 30  # the same, filed by a process of its own: only on disk
BACKLOG_WAIT_SECONDS = 30.0  # longest wait for room in the backlog before refusing
# Records are filed once none has arrived for FILING_QUIET seconds (see WriteAhead._gather),
# or once this many bytes of them wait: at most MAX_PENDING_BYTES * 3/4 held in memory,
# FILING_BACKLOG_BYTES in the journal alone (about 4,000 CT slices: ten senders' burst of a
# few seconds), or MAX_WAITING records.
FILING_QUIET = 0.05
FILING_BACKLOG_BYTES = SPARE_SEGMENTS * SEGMENT_BYTES  # 2 GiB: what the journal's spares hold
FILING_BATCH = 64  # a record that makes this many waiting wakes the filer to look
MAX_FILED_AT_ONCE = 500  # records filed in one catalogue transaction
MAX_WAITING = 16 * MAX_FILED_AT_ONCE  # records waiting, whatever their size
RETIRE_BYTES = 512 << 20  # journal segments kept, while busy, before their files are synced
SPARES_LOW = 3  # ... unless the journal has fewer spares than this: then at once
SPARES_READY = 2  # zero-filled journal segments made while idle (Journal.prepare_spares)
IDLE_SECONDS = 1.0  # quiet this long, the filer syncs and removes drained segments
# Each step of a spool file's direct write waits this long at most while a journal flush is
# in flight: a sender waits for every flush, and writes queued in front of one delay it.
# Alternating runs on a 2-core VM: 10 senders 397-411/s against 346-357/s unpaced, one
# association 274-323/s against 260-300/s.
PACE_SECONDS = 0.003
PACE_BELOW = 32 << 20  # ... while the filer keeps up: with this much waiting, it does not
_RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)
# Room reserved for an instance written to the journal as it arrives: what the sender's
# instance before it took, an eighth more and room for its meta; a first instance gets
# MIN_RESERVATION. One that outgrows its room is journalled after its last byte instead.
# Only one instance at a time is written as it arrives: while one is, the others are
# journalled after their last byte (see WriteAhead.reserve).
MIN_RESERVATION = 256 << 10
RESERVED_FOR_META = 64 << 10
MAX_RESERVATION = 32 << 20

# A write that changes nothing, so that its commit is a WAL commit that is fsynced.
_TOUCH_LAST = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == select(func.max(_INSTANCES.c.id)).scalar_subquery())
    .values(id=_INSTANCES.c.id)
)


def header_meta(
    header: InstanceHeader, relative_path: str, calling_ae: str | None
) -> dict[str, Any]:
    """What a journal record says of its instance, besides its bytes."""
    return {
        "sop_class": header.sop_class_uid,
        "sop": header.sop_instance_uid,
        "study": header.study_instance_uid,
        "series": header.series_instance_uid,
        "syntax": header.transfer_syntax_uid,
        "texts": header.texts,
        "number": header.instance_number,
        "path": relative_path,
        "ae": calling_ae,
    }


def _pending_from(record: Record, spool: Spool) -> Pending | None:
    """The record as an instance to file again, or None for one this node cannot have
    written: its UIDs invalid, or a path other than the spool's own for them (the scan of a
    segment at recovery also reads what a crash or an earlier use of the segment left
    between records, bytes a sender chose). Nothing it names is trusted before this."""
    meta = record.meta
    try:
        sop_class, syntax = (validate_uid(meta[key], key) for key in ("sop_class", "syntax"))
        sop, study, series = meta["sop"], meta["study"], meta["series"]
        if meta["path"] != spool.relative_path(study, series, sop):  # which validates them
            raise ValueError("a path of its own")
        texts = meta["texts"]
        if not isinstance(texts, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in texts.items()
        ):
            raise ValueError("descriptive attributes that are not text")
        number, ae = meta["number"], meta["ae"]
        if not (number is None or type(number) is int) or not (ae is None or isinstance(ae, str)):
            raise ValueError("an instance number or AE title of the wrong type")
    except (KeyError, TypeError, ValueError) as exc:
        log.error(
            "a journal record in segment %d is not one of ours, skipped: %s", record.segment, exc
        )
        return None
    header = InstanceHeader(
        sop_class,
        sop,
        study,
        series,
        transfer_syntax_uid=syntax,
        texts=dict(texts),
        instance_number=number,
    )
    return Pending(header, (record.payload,), len(record.payload), meta["path"], ae, None)


class WriteAhead:
    """The journal, what is in it and not yet filed, and the thread that files it."""

    def __init__(self, ingestor: Ingestor, journal: Journal, separate: bool = False) -> None:
        """``separate``: file in a process of its own (:class:`FilingProcess`), which reads
        each instance back from the journal; the instances waiting are then not held in
        this process's memory. What an earlier run left is filed here, either way."""
        self.ingestor = ingestor
        self.journal = journal
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # filed: for settle() and the backlog
        # Work for the filer: woken by the record that starts a batch, every FILING_BATCH-th
        # one, the one that brings the backlog to its bound, and by settle() and close(), not
        # by every record (a wake-up each cost the listener's threads a context switch and
        # the interpreter lock, for nothing).
        self._work = threading.Condition(self._lock)
        self._pending: dict[str, Pending] = {}
        self._queue: list[str] = []
        self._pending_bytes = 0
        self._stopping = False
        self._hurry = 0  # threads waiting in settle(): file at once
        # Instances being journalled whose Success the journal sends itself (Answer): each
        # holds a claim, numbered in order, from before its commit until its entry is in
        # _pending, so that settle() cannot miss one already answered.
        self._claims: set[int] = set()
        self._last_claim = 0
        self._last_record = 0.0  # when the last record was journalled (time.monotonic())
        self._filer = Filer(ingestor, pace=self._pace)
        self._process = (
            FilingProcess(ingestor.catalogue.url, ingestor.spool, ingestor.duplicate_policy)
            if separate
            else None
        )
        self._most_pending = MAX_PENDING_BYTES if self._process is None else MAX_JOURNALLED_BYTES
        self._backlog = (
            MAX_PENDING_BYTES * 3 // 4 if self._process is None else FILING_BACKLOG_BYTES
        )
        self._catalogued = UidLookup(ingestor.catalogue.url)
        if self._process is not None:
            self._process.start()
        self._replay()
        self._thread = threading.Thread(target=self._run, name="journal-filer", daemon=True)
        self._thread.start()

    @property
    def filing_pid(self) -> int | None:
        """The filing process's ID, while one runs (for the benchmarks' accounting)."""
        return None if self._process is None else self._process.pid

    # -- the listener's side

    def is_new(self, uid: str) -> bool:
        """Whether no instance of ``uid`` is in the journal or the catalogue (False where
        the catalogue cannot be read: the caller then asks again, the usual way)."""
        with self._lock:
            if uid in self._pending:
                return False
        try:
            return not self._catalogued(uid)
        except SQLAlchemyError:
            return False

    def reserve(self, size_hint: int) -> Reservation | None:
        """Room in the journal where an instance of about ``size_hint`` bytes (the
        sender's one before) is written as it arrives; None while another instance is,
        once the journal is closed, or where it cannot make room (the instance then takes
        the usual way, which answers for it).

        Writing as the bytes arrive lets one association's flush find its pages already on
        their way to the disk. With several associations, the flush one of them waits for
        carries the others' instances anyway, and the extra writes and write-outs of each
        (a system call each, which releases the interpreter lock) cost more than they
        save: ten senders received 8-17 % faster with one instance at a time."""
        if self.journal.streaming:
            return None
        room = max(size_hint + size_hint // 8, MIN_RESERVATION) + RESERVED_FOR_META
        try:
            return self.journal.reserve(min(room, MAX_RESERVATION))
        except OSError as exc:
            log.warning("cannot make room in the journal: %s", exc)
            return None

    def accept(
        self,
        header: InstanceHeader,
        data: bytes | Parts,
        calling_ae: str | None,
        crc32: int | None = None,
        new: bool = False,
        reserved: Reservation | None = None,
        answer: Answer | None = None,
    ) -> IngestOutcome | None:
        """Journal a new instance and answer for it; None when it is not new (or still in
        the journal), for the caller's own path. The caller holds its UID's lock; ``crc32``
        is that of ``data`` (Part 10 bytes, or their parts as received) where the receiver
        computed it; ``new``: the caller knows it is
        new (:meth:`node.store.ingest.Ingestor.look_ahead`), so it is not looked up again;
        ``reserved``: the room it was written to as it arrived (:meth:`reserve`);
        ``answer``: the sender's Success, sent by the journal once the record is durable
        (:class:`Answer`), before the instance is counted here."""
        from node.store.ingest import IngestOutcome, brief

        uid = header.sop_instance_uid
        if not new:
            self.settle({uid})
            try:
                if self._catalogued(uid):
                    return None
            except SQLAlchemyError as exc:  # unreachable: the sender keeps it and retries
                log.error("cannot read the catalogue for an instance: %s", brief(exc))
                return IngestOutcome(OUT_OF_RESOURCES, "cannot read the catalogue")
        relative = self.ingestor.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, uid
        )
        deadline = time.monotonic() + BACKLOG_WAIT_SECONDS
        with self._lock:
            while self._pending_bytes > self._most_pending and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:  # the filer is stuck (the catalogue refuses rows): refuse
                    log.error("the ingest journal's backlog is full: refusing an instance")
                    return IngestOutcome(OUT_OF_RESOURCES, "cannot write to the catalogue")
                self._changed.wait(left)
            claim = 0
            if answer is not None:
                self._last_claim = claim = self._last_claim + 1
                self._claims.add(claim)
        parts: Parts = (data,) if isinstance(data, bytes) else data
        size = size_of(parts)
        try:
            meta = header_meta(header, relative, calling_ae)
            if reserved is not None:
                entry = self.journal.commit(reserved, meta, parts, crc32, answer)
            else:
                entry = self.journal.append(meta, parts, crc32, answer)
        except BaseException as exc:
            if claim:
                with self._lock:
                    self._unclaim(claim)
            if not isinstance(exc, (JournalError, ValueError)):
                raise
            log.error("cannot journal an instance: %s", exc)
            return IngestOutcome(OUT_OF_RESOURCES, "cannot write to the journal")
        segment = entry.segment
        held = None if self._process is not None else parts  # read back by the process
        source = (str(segment.path), entry.payload_at)
        with self._lock:
            if claim:
                self._unclaim(claim)
            self._pending[uid] = Pending(header, held, size, relative, calling_ae, segment, source)
            self._queue.append(uid)
            self._pending_bytes += size
            self._last_record = time.monotonic()
            crossed = self._pending_bytes >= self._backlog > self._pending_bytes - size
            if len(self._queue) == 1 or len(self._queue) % FILING_BATCH == 0 or crossed:
                self._work.notify()
        return IngestOutcome(SUCCESS, series_uid=header.series_instance_uid)

    def _unclaim(self, claim: int) -> None:
        """An instance answered by the journal is in ``_pending``, or was not journalled
        (the lock held)."""
        self._claims.discard(claim)
        if self._hurry:
            self._changed.notify_all()

    def settle(self, uids: set[str] | None = None, timeout: float | None = None) -> bool:
        """Wait until the journal's instances (those of ``uids``, or all received so far)
        are filed; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # Instances answered (or about to be) before this call, not yet in _pending.
            claimed = self._last_claim
            if uids is None and not self._wait(
                lambda: all(claim > claimed for claim in self._claims), deadline
            ):
                return False
            waiting = set(self._pending) if uids is None else uids
            if not any(uid in self._pending for uid in waiting):
                return True  # nothing to wait for: the filer keeps gathering its batch
            self._work.notify()
            return self._wait(lambda: not any(uid in self._pending for uid in waiting), deadline)

    def _wait(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Wait until ``done()``, the lock held and this thread counted as one the filer
        hurries for; False if ``deadline`` (time.monotonic()) passed first."""
        self._hurry += 1
        try:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        finally:
            self._hurry -= 1
        return True

    def close(self) -> None:
        """File everything in the journal, sync it, and remove the journal's segments."""
        self.settle(timeout=60.0)
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
            self._work.notify()
        self._thread.join(60.0)
        self._filer.close()
        if self._process is not None:
            self._process.close()
        self._catalogued.dispose()
        drained = not self._pending
        for segment in self.journal.close():
            if segment.streaming:  # a receiver may still write: left open, filed next start
                continue
            if drained:
                self._retire(segment)
            else:  # filed at the next start
                os.close(segment.fd)

    # -- filing

    def _run(self) -> None:
        failures = 0
        while True:
            with self._lock:
                idle = False
                while not self._queue and not self._stopping and not idle:
                    idle = not self._work.wait(IDLE_SECONDS)
                if idle:  # a quiet moment: sync what full segments hold and let them go
                    self._lock.release()
                    try:
                        self._retire_drained(0)
                        self.journal.prepare_spares(SPARES_READY)
                    finally:
                        self._lock.acquire()
                    continue
                if not self._queue:
                    return
                self._gather()
                uids = self._queue[:MAX_FILED_AT_ONCE]
                batch = [self._pending[uid] for uid in uids]
            try:
                paths = self._file(batch)
            except Exception as exc:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                log.error(
                    "cannot file %d journalled instance(s), retrying in %.1f s: %s",
                    len(batch),
                    delay,
                    exc,
                )
                with self._lock:
                    if self._stopping:
                        return  # they stay in the journal, filed at the next start
                    self._work.wait(delay)
                continue
            failures = 0
            with self._lock:
                del self._queue[: len(uids)]
                for uid in uids:
                    self._pending_bytes -= self._pending.pop(uid).size
                self._changed.notify_all()
            by_segment: dict[int, tuple[Segment, list[str]]] = {}
            for item, path in zip(batch, paths, strict=True):
                if item.segment is not None:
                    by_segment.setdefault(id(item.segment), (item.segment, []))[1].append(path)
            for segment, written in by_segment.values():
                self.journal.materialised(segment, written)
            self._retire_drained(RETIRE_BYTES if self.journal.spares >= SPARES_LOW else 0)

    def _gather(self) -> None:
        """Let records gather while they keep arriving (the lock held), and file them once
        none has come for ``FILING_QUIET`` seconds: at the end of a sender's stream, in the
        pause between two, not in the middle of one. Sooner once ``self._backlog`` bytes
        or ``MAX_WAITING`` records wait (filed ``MAX_FILED_AT_ONCE`` at a time), while
        someone waits for them (:meth:`settle`), or on stopping.

        Filing beside a stream slowed it by a third: every journal flush then also carried
        the spool files written since the one before (its median went from 0.18 to
        0.68 ms), and the filer's processor time was taken from the receivers'. One
        association sending 300 slices received 830-980 instances/s with filing held back
        against 650-710 with filing beside it (filing in a process of its own both ways).
        Success still waits for the journal alone, as ever; what waits here is the spool
        file and the catalogue row, which readers and the completion of a series see
        (an association's end waits for its instances to be filed before it counts).

        Ten senders at once never pause: with filing started by every 500 records waiting,
        their spool copies shared the disk with the journal's flushes. Held back by size
        alone (``FILING_BACKLOG_BYTES``), and no spare zero-filled while they send
        (:meth:`Journal.prepare_spares`), ten senders x 300 slices received 598-636
        instances/s against 465-472/s, alternated in one process on a 2-core VM whose
        disk writes about 630 MB/s; their files were all filed 3-4 s after the senders'
        end (0.3 s before). The journal then holds up to ``FILING_BACKLOG_BYTES`` more."""
        while (
            not self._stopping
            and not self._hurry
            and self._pending_bytes < self._backlog
            and len(self._queue) < MAX_WAITING
        ):
            left = self._last_record + FILING_QUIET - time.monotonic()
            if left <= 0:
                return
            self._work.wait(left)

    def _retire_drained(self, least: int) -> None:
        """Retire the full, drained segments once they hold ``least`` bytes or more: a
        sync of the file system costs the journal's flushes while it runs, so under load
        it is done once per ``RETIRE_BYTES``, and otherwise when the node is quiet.

        Under load the journal also runs short of spares: once it takes its last one, it
        zero-fills another, 128 MiB written beside the instances arriving (a series took
        a fifth longer while one was made). So with fewer than ``SPARES_LOW`` spares,
        drained segments are retired at once, and become its next spares."""
        for segment in self.journal.retirable(least):
            self._retire(segment)

    def _file(self, batch: list[Pending]) -> list[str]:
        """File a batch received since the start: in the filing process where there is one
        (here, from the journal, if it cannot)."""
        if self._process is not None and all(item.source for item in batch):
            try:
                return self._process.file(batch)
            except FilingFailed as exc:
                log.warning("filing %d instance(s) here instead: %s", len(batch), exc)
        return self._filer.file(batch)

    def _catalogue_barrier(self) -> None:
        """Make every catalogue row committed so far durable (those committed without
        waiting for the disk) with one commit that waits: SQLite fsyncs its whole WAL on a
        commit at synchronous=FULL (the engine's setting), PostgreSQL flushes all WAL before
        a synchronous commit. Never by opening SQLite's files here: closing a descriptor
        would drop the process's locks on them."""
        engine = self.ingestor.catalogue.engine
        if engine.dialect.name == "sqlite":
            with self.ingestor._catalogue_lock, engine.begin() as connection:
                connection.execute(_TOUCH_LAST)
            return
        with engine.begin() as connection:
            connection.exec_driver_sql("SELECT txid_current()")

    def _pace(self) -> None:
        if self._pending_bytes < PACE_BELOW:  # read without the lock: a hint
            self.journal.wait_quiet(PACE_SECONDS)

    def _retire(self, segment: Segment) -> None:
        """Sync the files and catalogue rows filed from a full segment, then retire it (kept
        as a spare, or removed)."""
        try:
            if not syncfs(self.ingestor.spool.root):
                folders = set()
                for relative in segment.written:
                    path = self.ingestor.spool.absolute(relative)
                    folders.add(path.parent)
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:  # removed since (retention, a replacement)
                        continue
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for folder in folders:
                    fsync_dir(folder)
            self._catalogue_barrier()
        except (OSError, SQLAlchemyError) as exc:  # it stays; filed again at start-up
            log.error("cannot sync what journal segment %d holds: %s", segment.number, exc)
            return
        self.journal.forget(segment)

    # -- start-up

    def _replay(self) -> None:
        """File what an earlier run left in the journal, durably, before anyone reads."""
        records: dict[str, Pending] = {}  # a batch: distinct UIDs, one segment at most
        segment, total = None, 0
        for record in self.journal.recover():
            pending = _pending_from(record, self.ingestor.spool)
            if pending is None:
                continue
            uid = pending.header.sop_instance_uid
            if records and (
                record.segment != segment or uid in records or len(records) >= MAX_FILED_AT_ONCE
            ):
                self._refile(list(records.values()))
                records = {}
            segment = record.segment
            records[uid] = pending
            total += 1
        if records:
            self._refile(list(records.values()))
        if total:
            log.warning("filed %d instance(s) again from the journal after a restart", total)
        self.journal.retire_recovered()

    def _refile(self, batch: list[Pending]) -> None:
        """File records of an earlier run durably, and remove what the crash left beside
        their spool files (a temporary file written in part, never renamed)."""
        for relative in self._filer.file(batch, durably=True):
            for leftover in leftovers_beside(self.ingestor.spool.absolute(relative)):
                leftover.unlink(missing_ok=True)
