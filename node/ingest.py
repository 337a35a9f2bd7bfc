"""Receive -> store durably -> catalogue: the one path every received instance takes.

The DIMSE listener hands raw Part 10 bytes to :meth:`Ingestor.ingest`; STOW-RS hands the
staged, fsynced files of one request to :meth:`Ingestor.ingest_staged`, which places and
catalogues them together (one folder fsync per folder, one transaction). Rows that wait
for the catalogue at the same time, from any association or request, are committed in one
transaction. Both return the status of each instance, and Success only after its file is
durable and its catalogue row committed.
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
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.values import convert_string
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Instance, Series, Study
from node.disk import DiskGuard
from node.storage import Spool, StagedFile, StoredFile
from node.structure import MAX_INFLATED as MAX_INFLATED  # re-exported
from node.structure import MAX_NESTING as MAX_NESTING  # re-exported
from node.structure import Malformed, RawElement, Scan, scan
from node.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # instances placed and catalogued in one transaction

# C-STORE statuses (PS3.4 Annex B.2.3 and GG.4)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "InstanceNumber",
]


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    reason: str = ""
    duplicate: bool = False
    series_uid: str | None = None


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    dataset: Dataset
    instance_number: int | None


class RejectedInstance(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- is it a well-formed Part 10 stream? ---------------------------------------------------

_HEADER_TAG_SET = frozenset(int(Tag(name)) for name in _HEADER_TAGS) | {0x00080005}


def check_structure(source: bytes | bytearray | Path | BinaryIO) -> None:
    """Refuse (0xC000) a stream that is not a well-formed Part 10 file in the transfer
    syntax its file meta names (:func:`node.structure.scan`)."""
    _scan(source, frozenset())


def _scan(source: bytes | bytearray | Path | BinaryIO, wanted: frozenset[int]) -> Scan:
    try:
        return scan(source, wanted)
    except Malformed as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a well-formed DICOM file: {exc}") from None
    except OSError as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc


def parse_header(source: bytes | bytearray | Path | BinaryIO, whole: bool = True) -> Dataset:
    """The header (no pixel data) of Part 10 bytes or a file, or why it cannot be read.

    The whole stream is checked first (:func:`check_structure`): pydicom reads only the
    header, and reads damaged bytes leniently, so without the check a file cut inside its
    pixel data, or one whose lengths or VRs are garbage, could be stored as received. The
    same pass keeps the header's elements, so pydicom decodes them without reading the
    bytes again, unless pydicom's reader could walk them differently (then it reads them
    itself). ``whole=False`` skips the check, for bytes known to be cut and refused anyway
    (a STOW-RS part over the size limit), whose header still names the instance in the
    answer.
    """
    if whole:
        found = _scan(source, _HEADER_TAG_SET)
        if found.plain:
            try:
                ds = _dataset(found)
            except Exception as exc:  # what pydicom's reader would have tripped on
                raise RejectedInstance(
                    CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}"
                ) from exc
            if ds is not None:
                return ds
    in_memory = isinstance(source, bytes | bytearray)
    try:
        ds = dcmread(
            BytesIO(source) if in_memory else source,
            stop_before_pixels=True,
            specific_tags=_HEADER_TAGS,
        )
    except Exception as exc:  # whatever the parser trips on, these bytes are not readable
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    if in_memory and isinstance(ds, FileDataset):
        ds.buffer = None  # read in full already; keep no copy of the instance's bytes
    return ds


def _raw(element: RawElement, implicit: bool, little_endian: bool) -> RawDataElement:
    """The element as pydicom's reader yields it."""
    value = element.value if element.length else empty_value_for_VR(element.vr, raw=True)
    return RawDataElement(
        BaseTag(element.tag),
        element.vr,
        element.length,
        value,
        element.offset,
        implicit,
        little_endian,
    )


def _dataset(found: Scan) -> Dataset | None:
    """The header pydicom's ``dcmread(stop_before_pixels=True, specific_tags=...)`` reads,
    built from the elements :func:`node.structure.scan` kept (the same raw elements, so
    pydicom decodes each value as it would have), or None where pydicom's reader would
    read them otherwise."""
    meta = FileMetaDataset(Dataset({BaseTag(e.tag): _raw(e, False, True) for e in found.meta}))
    meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding
    )
    if meta._dict:
        meta[next(iter(meta.elements())).tag]  # pydicom's reader decodes the first one
    implicit, little = found.implicit, found.little_endian
    if (implicit, little) != _pydicom_encoding(meta.get("TransferSyntaxUID")):
        return None  # pydicom's reader would take the data set for another encoding
    elements: dict[BaseTag, RawDataElement] = {}
    for element in found.elements:
        raw = _raw(element, implicit, little)
        if element.tag == 0x00080005:  # decoded as it is read, as pydicom's reader does
            convert_encodings(convert_string(raw.value or b"", little))
        elements[raw.tag] = raw
    ds = Dataset(elements, parent_encoding=default_encoding)
    encoding: str | list[str] = default_encoding
    if 0x00080005 in elements:
        charset = convert_raw_data_element(elements[BaseTag(0x00080005)]).value
        encoding = convert_encodings(charset)
    ds.set_original_encoding(implicit, little, encoding)
    ds.file_meta = meta
    return ds


def _pydicom_encoding(syntax: UID | None) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) as pydicom's reader takes them from a file meta's
    transfer syntax; None where it guesses, inflates, or knows a private syntax."""
    if syntax is None or syntax == DeflatedExplicitVRLittleEndian:
        return None
    if syntax in PrivateTransferSyntaxes:
        return None
    if syntax == ImplicitVRLittleEndian:
        return True, True
    if syntax == ExplicitVRBigEndian:
        return False, False
    return False, True  # explicit VR little endian, and every other syntax


def header_from(ds: Dataset) -> InstanceHeader:
    """The identifying attributes of a parsed header, every UID validated."""
    try:
        for _ in ds:  # decode every value read now: a bad one is refused, not met later
            pass
    except Exception as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    try:
        tsuid = validate_uid(str(ds.file_meta.get("TransferSyntaxUID", "")), "TransferSyntaxUID")
        values = [
            validate_uid(str(ds.get(name, "") or ""), name)
            for name in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ]
    except InvalidUID as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    return InstanceHeader(
        *values, transfer_syntax_uid=tsuid, dataset=ds, instance_number=_instance_number(ds)
    )


def read_header(data: bytes) -> InstanceHeader:
    """Parse the identifying attributes of a Part 10 byte string, validating every UID."""
    return header_from(parse_header(data))


@dataclass(frozen=True)
class _Known:
    """A catalogued instance met again: its row and the digest of its bytes."""

    id: int
    sha256: str


@dataclass
class _Rows:
    """What one batch adds to the catalogue, waiting for a commit: new instances (their
    files durable already), and duplicates that differ (replaced files, or the audit)."""

    instances: list[tuple[InstanceHeader, StoredFile | IngestOutcome]]
    duplicates: list[tuple[_Entry, StoredFile | IngestOutcome | None]]
    existing: dict[str, _Known]
    ae: str | None
    replace: bool
    done: bool = False
    error: BaseException | None = None


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


def _text(ds: Dataset, name: str, limit: int) -> str | None:
    value = ds.get(name)
    if value in (None, ""):
        return None
    return str(value)[:limit]


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# Statements built once (an instance costs their execution, not their construction).
_INSTANCES, _SERIES = Instance.__table__, Series.__table__
_KNOWN = select(_INSTANCES.c.id, _INSTANCES.c.sop_instance_uid, _INSTANCES.c.sha256)
_KNOWN_ONE = _KNOWN.where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_KNOWN_ANY = _KNOWN.where(_INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))
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
_ADD_INSTANCES = insert(_INSTANCES)


class Ingestor:
    """Stores and catalogues instances; safe to call from many association threads."""

    def __init__(
        self,
        spool: Spool,
        catalogue: Catalogue,
        guard: DiskGuard | None = None,
        duplicate_policy: str = "keep_first",
    ) -> None:
        self.spool = spool
        self.catalogue = catalogue
        self.guard = guard
        self.duplicate_policy = duplicate_policy
        # Two associations sending the same SOP Instance UID at once must not race on its
        # file: each UID maps to one of these locks for the whole check-write-commit.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # One writer at a time: keeps study/series upserts free of races on any database.
        # Rows wait in the queue for it, and whoever holds it commits all that wait.
        self._catalogue_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Rows] = []

    def ingest(
        self, data: bytes, calling_ae: str | None, expected_sop_uid: str | None = None
    ) -> IngestOutcome:
        """Store and catalogue one instance received as Part 10 bytes."""
        if not self._room_for(len(data), calling_ae):
            return IngestOutcome(OUT_OF_RESOURCES, "free disk space below the watermark")
        try:
            header = read_header(data)
            if expected_sop_uid is not None and header.sop_instance_uid != expected_sop_uid:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID in the data set differs from the request's",
                )
        except RejectedInstance as exc:
            try:
                self.spool.quarantine(data, exc.reason, calling_ae)
            except OSError as error:  # the refusal stands; only its evidence is lost
                log.error("cannot quarantine a refused instance: %s", error)
            return self._refused(exc, calling_ae)
        return self._store([_Entry(header, data)], calling_ae)[0]

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
        stripes = sorted({self._stripe(entry) for entry in batch})
        with ExitStack() as held:
            for stripe in stripes:
                held.enter_context(self._uid_locks[stripe])
            try:
                with self.catalogue.session() as session:
                    uids = [entry.header.sop_instance_uid for entry in batch]
                    rows = session.execute(
                        _KNOWN_ONE if len(uids) == 1 else _KNOWN_ANY,
                        {"uid": uids[0]} if len(uids) == 1 else {"uids": uids},
                    )
                    existing = {uid: _Known(id, sha256) for id, uid, sha256 in rows}
            except SQLAlchemyError as exc:  # unreachable: the sender keeps it and retries
                log.error(
                    "cannot read the catalogue for %d instance(s): %s", len(batch), brief(exc)
                )
                return [IngestOutcome(OUT_OF_RESOURCES, "cannot read the catalogue")] * len(batch)
            return self._write_and_catalogue(batch, existing, calling_ae)

    def _stripe(self, entry: _Entry) -> int:
        return hash(entry.header.sop_instance_uid) % len(self._uid_locks)

    def _write_and_catalogue(
        self, batch: list[_Entry], existing: dict[str, _Known], ae: str | None
    ) -> list[IngestOutcome]:
        """New instances are written and catalogued; a duplicate with identical bytes is
        Success, stored once; different bytes follow the configured policy (keep the first
        copy, or replace it atomically), recorded in the audit trail."""
        replace = self.duplicate_policy == "replace"
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
        work = _Rows(
            [(batch[i].header, written[i]) for i in new],
            [(batch[i], written.get(i)) for i in changed],
            existing,
            ae,
            replace,
        )
        try:
            self._catalogue_together(work)
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

    def _catalogue_together(self, work: _Rows) -> None:
        """Commit ``work`` in one transaction with the rows other threads queued meanwhile
        (group commit: one commit, one log fsync, for all of them); raises if its rows
        were not committed. Each thread still holds its UID locks, and gets its answer
        only once its rows are committed."""
        with self._queue_lock:
            self._queue.append(work)
        with self._catalogue_lock:
            if not work.done:  # nobody took it along: this thread commits the queue
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit(group)
        if work.error is not None:
            raise work.error

    def _commit(self, group: list[_Rows]) -> None:
        """One transaction for the group; if it fails, one for each, so that a bad row
        fails only its own instances."""
        for work in group:
            work.error = RuntimeError("not committed")
        try:
            try:
                with self.catalogue.session() as session:
                    for work in group:
                        self._apply(session, work)
            except Exception as exc:
                if len(group) == 1:
                    group[0].error = exc
                    return
                for work in group:
                    try:
                        with self.catalogue.session() as session:
                            self._apply(session, work)
                    except Exception as single:
                        work.error = single
                    else:
                        work.error = None
            else:
                for work in group:
                    work.error = None
        finally:
            for work in group:
                work.done = True

    def _apply(self, session: Session, work: _Rows) -> None:
        self._add_instances(session, work.instances, work.ae)
        for entry, stored in work.duplicates:
            self._record_duplicate(session, entry, work.existing, stored, work.ae, work.replace)

    def _add_instances(
        self,
        session: Session,
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
        created: dict[str, Series] = {}
        for header, _ in instances:
            uid = header.series_instance_uid
            if uid in series or uid in created:
                continue
            known = self._count_in_series(session, uid, counts[uid], now)
            if known is None:
                created[uid] = self._new_series(session, header, ae, counts[uid], now)
            else:
                series[uid] = known
        if created:
            session.flush()  # the ids of new series
            series.update((uid, row.id) for uid, row in created.items())
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
        session.execute(_ADD_INSTANCES, rows)

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

    @staticmethod
    def _count_in_series(session: Session, uid: str, count: int, now: datetime) -> int | None:
        """Add ``count`` instances to a series row, returning its id; None if it has none
        (one statement, the count added in the database)."""
        return session.execute(
            _COUNT_IN_SERIES, {"uid": uid, "count": count, "now": now}
        ).scalar_one_or_none()

    @staticmethod
    def _new_series(
        session: Session, header: InstanceHeader, ae: str | None, count: int, now: datetime
    ) -> Series:
        """A new series row with ``count`` instances (and its study, when new)."""
        ds = header.dataset
        study = session.scalar(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        )
        if study is None:
            study = Study(
                study_instance_uid=header.study_instance_uid,
                patient_id=_text(ds, "PatientID", 64),
                study_date=_text(ds, "StudyDate", 8),
                accession_number=_text(ds, "AccessionNumber", 16),
            )
            session.add(study)
        series = Series(
            series_instance_uid=header.series_instance_uid,
            study=study,
            modality=_text(ds, "Modality", 16),
            series_description=_text(ds, "SeriesDescription", 64),
            body_part_examined=_text(ds, "BodyPartExamined", 16),
            calling_ae_title=ae,
            instance_count=count,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        return series

    @staticmethod
    def _record_duplicate(
        session: Session,
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
            row = session.get(Instance, before.id)
            assert row is not None
            row.path, row.size, row.sha256 = stored.relative_path, stored.size, stored.sha256
            row.transfer_syntax_uid = header.transfer_syntax_uid
        session.add(
            AuditEvent(
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
