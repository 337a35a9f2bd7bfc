"""Receive -> store durably -> catalogue: the one path every received instance takes.

The DIMSE listener hands raw Part 10 bytes to :meth:`Ingestor.ingest`; STOW-RS hands the
staged, fsynced files of one request to :meth:`Ingestor.ingest_staged`, which places and
catalogues them together (one folder fsync per folder, one transaction). Both return the
status of each instance, and Success only after its file is durable and its catalogue row
committed.

The header is read and checked by :mod:`node.store.header`; this module makes an accepted
instance durable and catalogued.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from sqlalchemy import Connection, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.db import Catalogue
from node.catalogue.instance_lookups import INSTANCES as _INSTANCES
from node.catalogue.instance_lookups import KNOWN_ANY, KNOWN_ONE
from node.catalogue.models import AuditEvent, Series, Study
from node.core.status import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from node.store.buffers import Parts, joined, size_of
from node.store.disk import DiskGuard
from node.store.header import InstanceHeader, RejectedInstance, read_header
from node.store.journal import Answer, Journal, Reservation
from node.store.spool import Spool, StagedFile, StoredFile, file_sha256
from node.store.structure import MAX_INFLATED as MAX_INFLATED  # re-exported
from node.store.structure import MAX_NESTING as MAX_NESTING  # re-exported
from node.store.write_ahead import WriteAhead

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # instances placed and catalogued in one transaction
SETTLE_SECONDS = 30.0  # longest wait for the journal to be filed before a signal goes on


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    reason: str = ""
    duplicate: bool = False
    series_uid: str | None = None


@dataclass
class _Entry:
    """An accepted instance on its way into the spool: bytes, or a staged (synced) file."""

    header: InstanceHeader
    payload: bytes | StagedFile

    @property
    def size(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else self.payload.size

    @cached_property
    def sha256(self) -> str:
        if isinstance(self.payload, bytes):
            return hashlib.sha256(self.payload).hexdigest()
        return self.payload.sha256


def _text(header: InstanceHeader, name: str, limit: int) -> str | None:
    value = header.texts.get(name)
    return None if value is None else value[:limit]


@dataclass(frozen=True)
class _Known:
    """A catalogued instance met again: its row, the digest of its bytes (None: not
    computed yet) and its file."""

    id: int
    sha256: str | None
    path: str


# Core statements built once: an instance costs their execution, not their construction
# (nor loading ORM objects it only reads one column of).
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_AUDIT_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]
_COUNT_IN_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("uid"))
    .values(
        instance_count=func.coalesce(_SERIES.c.instance_count, 0)
        + bindparam("count", type_=_SERIES.c.instance_count.type),
        last_received_at=bindparam("now", type_=_SERIES.c.last_received_at.type),
    )
    .returning(_SERIES.c.id)
)
_STUDY_ID = select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
_ADD_STUDY = insert(_STUDIES).returning(_STUDIES.c.id)
_ADD_SERIES = insert(_SERIES).returning(_SERIES.c.id)
_ADD_INSTANCES = insert(_INSTANCES)
_KEEP_DIGEST = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("row"), _INSTANCES.c.sha256.is_(None))
    .values(sha256=bindparam("digest"))
)


class Ingestor:
    """Stores and catalogues instances; safe to call from many association threads."""

    def __init__(
        self,
        spool: Spool,
        catalogue: Catalogue,
        guard: DiskGuard | None = None,
        duplicate_policy: str = "keep_first",
        journal: Journal | None = None,
        filing_process: bool = False,
    ) -> None:
        """With a ``journal``, new instances given to :meth:`ingest` are made durable in it
        and filed behind it (:mod:`node.store.write_ahead`), in a process of its own with
        ``filing_process`` (:mod:`node.store.filing`); what an earlier run left in it is
        filed here, before this returns."""
        self.spool = spool
        self.catalogue = catalogue
        self.guard = guard
        self.duplicate_policy = duplicate_policy
        # Two associations sending the same SOP Instance UID at once must not race on its
        # file: each UID maps to one of these locks for the whole check-write-commit.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # Per lock: how many times a UID of it became catalogued or journalled, counted
        # after it did (under the lock). A look-ahead that found a UID new holds while its
        # count is unchanged (:meth:`look_ahead`).
        self._changes = [0] * len(self._uid_locks)
        # One writer at a time: keeps study/series upserts free of races on any database.
        self._catalogue_lock = threading.Lock()
        self.write_ahead = (
            WriteAhead(self, journal, separate=filing_process) if journal is not None else None
        )

    def settle(self, timeout: float | None = SETTLE_SECONDS) -> bool:
        """Wait until every instance answered so far is in the catalogue (those still in
        the journal are being filed): before a signal that may complete their series.
        False if ``timeout`` passed first (the catalogue is not taking rows)."""
        if self.write_ahead is None or self.write_ahead.settle(timeout=timeout):
            return True
        log.warning("instances in the ingest journal not yet filed after %.0f s", timeout)
        return False

    def close(self) -> None:
        """File what is in the journal and stop its thread (no-op without one)."""
        if self.write_ahead is not None:
            self.write_ahead.close()

    def look_ahead(self, sop_instance_uid: str) -> int | None:
        """Whether an instance of this UID would be new, asked when its C-STORE command
        arrives, so that the catalogue is read while its data set is still arriving, not
        after its last byte: a token for :meth:`ingest` where it is new (neither catalogued
        nor in the journal), None otherwise. The token holds only while no other instance
        of its UID's lock has become catalogued or journalled since."""
        if self.write_ahead is None:
            return None
        stripe = self._stripe(sop_instance_uid)
        seen = self._changes[stripe]  # read first: a change after it invalidates the token
        return seen if self.write_ahead.is_new(sop_instance_uid) else None

    def reserve(self, size_hint: int) -> Reservation | None:
        """Room in the journal where an instance of about ``size_hint`` bytes is written as
        it arrives, so that the flush after its last byte finds most of it on the disk;
        None where there is no journal."""
        if self.write_ahead is None:
            return None
        return self.write_ahead.reserve(size_hint)

    def ingest(
        self,
        data: bytes | Parts,
        calling_ae: str | None,
        expected_sop_uid: str | None = None,
        expected_sop_class: str | None = None,
        crc32: int | None = None,
        ahead: int | None = None,
        reserved: Reservation | None = None,
        header: InstanceHeader | None = None,
        answer: Answer | None = None,
    ) -> IngestOutcome:
        """Store and catalogue one instance received as Part 10 bytes (or the parts they
        arrived in, joined only where they must be: not on the journal's way); ``expected_*`` are
        the UIDs the C-STORE command named, which the data set must carry too (else it is
        refused 0xA900: stored under the command's class, it would be catalogued as what
        it is not). ``crc32``: of ``data``, where the receiver computed it on the way;
        ``ahead``: :meth:`look_ahead`'s token for ``expected_sop_uid``; ``reserved``: the
        journal room it was written to as it arrived (:meth:`reserve`), given back by the
        caller when it is not used; ``header``: what :func:`read_header` makes of ``data``,
        where the receiver read it already; ``answer``: the sender's Success, which the
        journal sends itself the moment the instance is durable, where it takes it
        (:class:`node.store.journal.Answer`: ``sent`` says whether it did)."""
        if not self._room_for(size_of(data), calling_ae):
            return IngestOutcome(OUT_OF_RESOURCES, "free disk space below the watermark")
        try:
            if header is None:
                data = joined(data)
                header = read_header(data)
            if expected_sop_uid is not None and header.sop_instance_uid != expected_sop_uid:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID in the data set differs from the request's",
                )
            if expected_sop_class is not None and header.sop_class_uid != expected_sop_class:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"SOPClassUID {header.sop_class_uid} in the data set differs from the "
                    f"request's {expected_sop_class}",
                )
        except RejectedInstance as exc:
            try:
                self.spool.quarantine(joined(data), exc.reason, calling_ae)
            except OSError as error:  # the refusal stands; only its evidence is lost
                log.error("cannot quarantine a refused instance: %s", error)
            return self._refused(exc, calling_ae)
        if self.write_ahead is not None:
            stripe = self._stripe(header.sop_instance_uid)
            with self._uid_locks[stripe]:
                new = (
                    ahead is not None
                    and expected_sop_uid is not None  # which the header's UID is, here
                    and ahead == self._changes[stripe]
                )
                outcome = self.write_ahead.accept(
                    header, data, calling_ae, crc32, new, reserved, answer
                )
                if outcome is not None and outcome.status == SUCCESS:
                    self._changes[stripe] += 1
            if outcome is not None:
                return outcome
        return self._store([_Entry(header, joined(data))], calling_ae)[0]

    def ingest_staged(
        self,
        received: Sequence[tuple[StagedFile, InstanceHeader | RejectedInstance]],
        calling_ae: str | None,
    ) -> list[IngestOutcome]:
        """Store and catalogue instances already staged and fsynced, each with its header
        from :func:`header_from` (or why it has none); outcomes in the same order.

        The same checks as :meth:`ingest`, but the files are placed and catalogued in
        batches. Staged files that are not placed stay where they are: the caller discards
        them.
        """
        outcomes: list[IngestOutcome | None] = [None] * len(received)
        accepted: list[_Entry] = []
        positions: list[int] = []
        for index, (staged, header) in enumerate(received):
            if not self._room_for(staged.size, calling_ae):
                outcomes[index] = IngestOutcome(
                    OUT_OF_RESOURCES, "free disk space below the watermark"
                )
                continue
            if isinstance(header, RejectedInstance):
                try:
                    self.spool.quarantine_staged(staged, header.reason, calling_ae)
                except OSError as error:  # the refusal stands; only its evidence is lost
                    log.error("cannot quarantine a refused instance: %s", error)
                outcomes[index] = self._refused(header, calling_ae)
                continue
            accepted.append(_Entry(header, staged))
            positions.append(index)
        for index, outcome in zip(positions, self._store(accepted, calling_ae), strict=True):
            outcomes[index] = outcome
        return _filled(outcomes)

    def _room_for(self, size: int, calling_ae: str | None) -> bool:
        if self.guard is None or self.guard.can_accept(size):
            return True
        log.error("refused instance from %s: free disk space below the watermark", calling_ae)
        return False

    @staticmethod
    def _refused(exc: RejectedInstance, calling_ae: str | None) -> IngestOutcome:
        log.warning("refused instance from %s: 0x%04X %s", calling_ae, exc.status, exc.reason)
        return IngestOutcome(exc.status, exc.reason)

    def _store(self, entries: list[_Entry], calling_ae: str | None) -> list[IngestOutcome]:
        outcomes: list[IngestOutcome] = []
        for batch in _batches(entries):
            outcomes += self._store_batch(batch, calling_ae)
        return outcomes

    def _store_batch(self, batch: list[_Entry], calling_ae: str | None) -> list[IngestOutcome]:
        """Check, write and catalogue instances with distinct SOP Instance UIDs, holding
        their UID locks throughout (taken in one order, so batches cannot deadlock)."""
        stripes = sorted({self._stripe(entry.header.sop_instance_uid) for entry in batch})
        with ExitStack() as held:
            for stripe in stripes:
                held.enter_context(self._uid_locks[stripe])
            uids = [entry.header.sop_instance_uid for entry in batch]
            if self.write_ahead is not None:  # met first in the journal: filed before this
                self.write_ahead.settle(set(uids))
            try:
                with self.catalogue.engine.connect() as connection:
                    rows = (
                        connection.execute(KNOWN_ONE, {"uid": uids[0]})
                        if len(uids) == 1
                        else connection.execute(KNOWN_ANY, {"uids": uids})
                    )
                    existing = {uid: _Known(*known) for uid, *known in rows}
            except SQLAlchemyError as exc:  # unreachable: the sender keeps it and retries
                log.error(
                    "cannot read the catalogue for %d instance(s): %s", len(batch), brief(exc)
                )
                return [IngestOutcome(OUT_OF_RESOURCES, "cannot read the catalogue")] * len(batch)
            outcomes = self._write_and_catalogue(batch, existing, calling_ae)
            for stripe in stripes:  # catalogued or replaced: look-aheads made before are stale
                self._changes[stripe] += 1
            return outcomes

    def _stripe(self, sop_instance_uid: str) -> int:
        return hash(sop_instance_uid) % len(self._uid_locks)

    def _write_and_catalogue(
        self, batch: list[_Entry], existing: dict[str, _Known], ae: str | None
    ) -> list[IngestOutcome]:
        """New instances are written and catalogued; a duplicate with identical bytes is
        Success, stored once; different bytes follow the configured policy (keep the first
        copy, or replace it atomically), recorded in the audit trail."""
        replace = self.duplicate_policy == "replace"
        self._digest_known(existing)
        outcomes: list[IngestOutcome | None] = [None] * len(batch)
        to_write: list[int] = []
        differing: set[int] = set()
        for index, entry in enumerate(batch):
            known = existing.get(entry.header.sop_instance_uid)
            if known is None:
                to_write.append(index)
            elif entry.sha256 == known.sha256:
                outcomes[index] = self._success(entry, duplicate=True)
            else:
                differing.add(index)
                if replace:
                    to_write.append(index)
        written = dict(zip(to_write, self._write([batch[i] for i in to_write]), strict=True))
        for index, stored in written.items():
            if isinstance(stored, IngestOutcome):
                outcomes[index] = stored
        new = [i for i in to_write if outcomes[i] is None and i not in differing]
        changed = [i for i in sorted(differing) if outcomes[i] is None]
        if not new and not changed:
            return _filled(outcomes)
        try:
            with self._catalogue_lock, self.catalogue.engine.begin() as connection:
                self._add_instances(connection, [(batch[i].header, written[i]) for i in new], ae)
                for index in changed:
                    self._record_duplicate(
                        connection, batch[index], existing, written.get(index), ae, replace
                    )
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError):  # the database, not a bug: no traceback
                log.error("cannot catalogue %d instance(s): %s", len(new + changed), brief(exc))
            else:
                log.exception("cannot catalogue %d instance(s); removing new files", len(new))
            new_files = [written[i] for i in new]
            self.spool.remove(*(f.relative_path for f in new_files if isinstance(f, StoredFile)))
            failed = IngestOutcome(OUT_OF_RESOURCES, "cannot write to the catalogue")
            for index in new + changed:
                outcomes[index] = failed
        for index in new:
            if outcomes[index] is None:
                outcomes[index] = self._success(batch[index])
        for index in changed:
            if outcomes[index] is None:
                outcomes[index] = self._success(batch[index], duplicate=True)
        return _filled(outcomes)

    def _digest_known(self, existing: dict[str, _Known]) -> None:
        """Give the catalogued instances met again a digest where their row has none yet
        (filed from the journal), computed from their file and kept in the row. A file
        that cannot be read has no digest: its row differs from whatever arrives."""
        computed: dict[int, str] = {}
        for uid, known in existing.items():
            if known.sha256 is not None:
                continue
            digest = file_sha256(self.spool.absolute(known.path))
            if digest is None:
                log.error("cannot read the file of a catalogued instance to compare it")
                continue
            existing[uid] = _Known(known.id, digest, known.path)
            computed[known.id] = digest
        if not computed:
            return
        try:
            with self._catalogue_lock, self.catalogue.engine.begin() as connection:
                connection.execute(
                    _KEEP_DIGEST, [{"row": row, "digest": d} for row, d in computed.items()]
                )
        except SQLAlchemyError as exc:  # computed again next time
            log.error("cannot keep the digests of %d instance(s): %s", len(computed), brief(exc))

    def _add_instances(
        self,
        connection: Connection,
        instances: list[tuple[InstanceHeader, StoredFile | IngestOutcome]],
        ae: str | None,
    ) -> None:
        """Instance rows, and their series and study rows counted and stamped once per
        series (one bulk INSERT, so a large batch costs little more than one instance)."""
        if not instances:
            return
        now = datetime.now(UTC)
        counts = Counter(header.series_instance_uid for header, _ in instances)
        series: dict[str, int] = {}
        for header, _ in instances:
            uid = header.series_instance_uid
            if uid not in series:
                series[uid] = self._upsert_series(connection, header, ae, counts[uid], now)
        rows = []
        for header, stored in instances:
            assert isinstance(stored, StoredFile)
            rows.append(
                {
                    "sop_instance_uid": header.sop_instance_uid,
                    "series_id": series[header.series_instance_uid],
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "instance_number": header.instance_number,
                    "path": stored.relative_path,
                    "size": stored.size,
                    "sha256": stored.sha256,
                }
            )
        connection.execute(_ADD_INSTANCES, rows)

    @staticmethod
    def _success(entry: _Entry, duplicate: bool = False) -> IngestOutcome:
        return IngestOutcome(
            SUCCESS, duplicate=duplicate, series_uid=entry.header.series_instance_uid
        )

    def _write(self, entries: list[_Entry]) -> list[StoredFile | IngestOutcome]:
        """Write each file durably, or the Out of Resources outcome if the disk refuses.

        Staged files are renamed into place together, one fsync per folder touched."""
        results: list[StoredFile | OSError | None] = []
        staged: list[tuple[int, StagedFile, str]] = []
        for entry in entries:
            header = entry.header
            try:
                if isinstance(entry.payload, bytes):
                    results.append(
                        self.spool.store(
                            header.study_instance_uid,
                            header.series_instance_uid,
                            header.sop_instance_uid,
                            entry.payload,
                        )
                    )
                    continue
                relative = self.spool.relative_path(
                    header.study_instance_uid,
                    header.series_instance_uid,
                    header.sop_instance_uid,
                )
            except OSError as exc:
                results.append(exc)
                continue
            staged.append((len(results), entry.payload, relative))
            results.append(None)
        placed = self.spool.place([(item, relative) for _, item, relative in staged])
        for (index, _, _), stored in zip(staged, placed, strict=True):
            results[index] = stored
        final: list[StoredFile | IngestOutcome] = []
        for result in results:
            assert result is not None
            if isinstance(result, OSError):
                log.error("cannot write instance to the spool: %s", result)
                final.append(IngestOutcome(OUT_OF_RESOURCES, "cannot write to the spool"))
            else:
                final.append(result)
        return final

    def _upsert_series(
        self,
        connection: Connection,
        header: InstanceHeader,
        ae: str | None,
        count: int = 1,
        now: datetime | None = None,
    ) -> int:
        """The id of the series row (and its study, when new) with ``count`` more
        instances; an existing row is counted up in the database, not from a copy read
        earlier, so changes others make to it in between are kept."""
        now = now or datetime.now(UTC)
        counted = connection.execute(
            _COUNT_IN_SERIES, {"uid": header.series_instance_uid, "count": count, "now": now}
        ).scalar()
        if counted is not None:
            return int(counted)
        study_id = connection.execute(_STUDY_ID, {"uid": header.study_instance_uid}).scalar()
        if study_id is None:
            study_id = connection.execute(
                _ADD_STUDY,
                {
                    "study_instance_uid": header.study_instance_uid,
                    "patient_id": _text(header, "PatientID", 64),
                    "study_date": _text(header, "StudyDate", 8),
                    "accession_number": _text(header, "AccessionNumber", 16),
                },
            ).scalar_one()
        return int(
            connection.execute(
                _ADD_SERIES,
                {
                    "series_instance_uid": header.series_instance_uid,
                    "study_id": study_id,
                    "modality": _text(header, "Modality", 16),
                    "series_description": _text(header, "SeriesDescription", 64),
                    "body_part_examined": _text(header, "BodyPartExamined", 16),
                    "calling_ae_title": ae,
                    "instance_count": count,
                    "first_received_at": now,
                    "last_received_at": now,
                },
            ).scalar_one()
        )

    @staticmethod
    def _record_duplicate(
        connection: Connection,
        entry: _Entry,
        existing: dict[str, _Known],
        stored: StoredFile | IngestOutcome | None,
        ae: str | None,
        replace: bool,
    ) -> None:
        header = entry.header
        before = existing[header.sop_instance_uid]
        if replace:
            assert isinstance(stored, StoredFile)
            replaced = connection.execute(
                update(_INSTANCES)
                .where(_INSTANCES.c.id == before.id)
                .values(
                    path=stored.relative_path,
                    size=stored.size,
                    sha256=stored.sha256,
                    transfer_syntax_uid=header.transfer_syntax_uid,
                )
            )
            if replaced.rowcount != 1:
                raise LookupError(f"the catalogue row of {header.sop_instance_uid} is gone")
        connection.execute(
            insert(_AUDIT_EVENTS).values(
                actor=ae or "unknown",
                action="duplicate-differs-replaced" if replace else "duplicate-differs-kept-first",
                target=header.sop_instance_uid,
                details={"before": before.sha256, "received": entry.sha256},
            )
        )


def brief(exc: BaseException) -> str:
    """One line on a database error: the driver's first line, not SQLAlchemy's essay."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _filled(outcomes: list[IngestOutcome | None]) -> list[IngestOutcome]:
    """Outcomes once every instance has one."""
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


def _batches(entries: list[_Entry]) -> Iterator[list[_Entry]]:
    """Runs of at most :data:`MAX_BATCH` entries with distinct SOP Instance UIDs, in order:
    a UID seen again starts a new batch, so it meets the first copy as a catalogued
    duplicate, as it would have arriving alone."""
    batch: list[_Entry] = []
    uids: set[str] = set()
    for entry in entries:
        uid = entry.header.sop_instance_uid
        if uid in uids or len(batch) >= MAX_BATCH:
            yield batch
            batch, uids = [], set()
        batch.append(entry)
        uids.add(uid)
    if batch:
        yield batch
