"""Receive -> store durably -> catalogue: the one path every received instance takes.

The DIMSE listener hands raw Part 10 bytes to :meth:`Ingestor.ingest`; STOW-RS hands the
staged, fsynced files of one request to :meth:`Ingestor.ingest_staged`, which places and
catalogues them together (one folder fsync per folder, one transaction). Both return the
status of each instance, and Success only after its file is durable and its catalogue row
committed.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import zlib
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
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import UID
from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Instance, Series, Study
from node.disk import DiskGuard
from node.storage import Spool, StagedFile, StoredFile
from node.uids import InvalidUID, is_valid_uid, validate_uid

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

_VR_32 = frozenset(  # explicit VRs with two reserved bytes and a 4-byte length (PS3.5 7.1.2)
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)
_VRS = _VR_32 | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
MAX_NESTING = 64  # sequences within sequences; pydicom recurses on each level
MAX_INFLATED = 1 << 30  # bytes a deflated data set may inflate to


class _Malformed(Exception):
    """Why a stream is not a well-formed Part 10 file."""


def check_structure(source: bytes | bytearray | Path | BinaryIO) -> None:
    """Refuse (0xC000) a stream that is not a well-formed Part 10 file in the transfer
    syntax its file meta names.

    Reads only element headers, seeking over values (a staged STOW-RS part is never loaded
    whole): every element complete within its container, every explicit VR a VR, undefined
    lengths only on sequences and encapsulated pixel data and closed by their delimiters,
    pixel data encapsulated exactly when the transfer syntax says so, sequences at most
    :data:`MAX_NESTING` deep. Lenient where common readers are: odd lengths, tag order, and
    a transfer syntax pydicom does not know, read as explicit VR little endian (as every
    newer transfer syntax but the deflated ones is encoded).
    """
    try:
        if isinstance(source, bytes | bytearray):
            _Structure(BytesIO(source)).check()
        elif isinstance(source, Path):
            with source.open("rb") as fp:
                _Structure(fp).check()
        else:
            start = source.tell()
            try:
                _Structure(source).check()
            finally:
                source.seek(start)  # where the caller's reader expects it
    except _Malformed as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a well-formed DICOM file: {exc}") from None
    except OSError as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc


class _Structure:
    """One pass over a Part 10 stream: the file meta, then the data set."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        start = fp.tell()
        self.size = fp.seek(0, 2)
        fp.seek(start)
        self.implicit = False
        self.encapsulated: bool | None = None  # None: a transfer syntax pydicom does not know
        self._endian("<")

    def _endian(self, order: str) -> None:
        self.tag, self.short, self.length = (struct.Struct(order + f) for f in ("HH", "H", "L"))

    def check(self) -> None:
        tsuid = self._meta()
        deflated = False
        if tsuid.is_transfer_syntax:
            self.implicit = tsuid.is_implicit_VR
            self.encapsulated = tsuid.is_encapsulated
            deflated = tsuid.is_deflated
            if not tsuid.is_little_endian:
                self._endian(">")
        if deflated:
            self._inflate()
        self._elements(self.size, False, self.implicit, 0)

    def _meta(self) -> UID:
        """The transfer syntax the file meta names; leaves the stream at the data set."""
        fp = self.fp
        prefix = fp.read(132)
        if len(prefix) < 132 or prefix[128:] != b"DICM":
            raise _Malformed("no preamble and DICM prefix")
        tsuid = ""
        while True:
            position = fp.tell()
            head = fp.read(8)
            if len(head) < 8 or head[:2] != b"\x02\x00":  # the data set starts here
                fp.seek(position)
                break
            vr = head[4:6]
            if vr not in _VRS:
                raise _Malformed(f"the file meta has an unknown VR {vr.decode('latin-1')!r}")
            length = self._length32() if vr in _VR_32 else int.from_bytes(head[6:], "little")
            if length == _UNDEFINED or fp.tell() + length > self.size:
                raise _Malformed("the file meta is cut short")
            if head[2:4] == b"\x10\x00":
                tsuid = fp.read(length).rstrip(b"\x00 ").decode("latin-1")
            else:
                fp.seek(length, 1)
        if not is_valid_uid(tsuid):
            raise _Malformed("the file meta has no valid Transfer Syntax UID")
        return UID(tsuid)

    def _inflate(self) -> None:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(self.fp.read(), MAX_INFLATED)
        except zlib.error as exc:
            raise _Malformed(f"the deflated data set does not inflate: {exc}") from None
        if inflater.unconsumed_tail:
            raise _Malformed(f"the deflated data set inflates to more than {MAX_INFLATED} bytes")
        if not inflater.eof:
            raise _Malformed("the deflated data set is cut short")
        self.fp, self.size = BytesIO(data), len(data)

    def _length32(self) -> int:
        data = self.fp.read(4)
        if len(data) < 4:
            raise _Malformed("an element header is cut short")
        return self.length.unpack(data)[0]

    def _header(self, limit: int) -> tuple[int, bytes]:
        head = self.fp.read(8)
        if len(head) < 8 or self.fp.tell() > limit:
            raise _Malformed("an element header is cut short")
        group, element = self.tag.unpack_from(head)
        return group << 16 | element, head

    def _elements(self, limit: int, delimited: bool, implicit: bool, depth: int) -> None:
        """Elements up to ``limit`` or, if ``delimited``, up to an item delimiter."""
        fp = self.fp
        while True:
            position = fp.tell()
            if position == limit and not delimited:
                return
            tag, head = self._header(limit)
            if tag == _ITEM_END and delimited:
                return
            if tag >> 16 == 0xFFFE:
                raise _Malformed(f"a delimiter or item tag among elements at {position}")
            vr = None
            if implicit:
                length = self.length.unpack_from(head, 4)[0]
            else:
                vr = head[4:6]
                if vr not in _VRS:
                    raise _Malformed(f"unknown VR {vr.decode('latin-1')!r} at {position}")
                wide = vr in _VR_32
                length = self._length32() if wide else self.short.unpack_from(head, 6)[0]
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and vr in (b"OB", b"OW") and self.encapsulated is not False:
                    self._fragments(limit)
                elif implicit or vr in (b"SQ", b"UN"):  # UN of undefined length: implicit VR
                    self._items(limit, True, True if vr == b"UN" else implicit, depth + 1)
                else:
                    raise _Malformed(f"undefined length for {vr.decode()} at {position}")
                continue
            if tag == _PIXEL_DATA and depth == 0 and self.encapsulated:
                raise _Malformed("pixel data not encapsulated in an encapsulated transfer syntax")
            end = fp.tell() + length
            if end > limit:
                raise _Malformed(f"a value of {length} bytes runs past its end at {position}")
            if vr == b"SQ":
                self._items(end, False, implicit, depth + 1)
            else:
                fp.seek(end)

    def _items(self, limit: int, delimited: bool, implicit: bool, depth: int) -> None:
        """The items of a sequence, up to ``limit`` or its delimiter."""
        if depth > MAX_NESTING:
            raise _Malformed(f"sequences nested more than {MAX_NESTING} deep")
        fp = self.fp
        while True:
            position = fp.tell()
            if position == limit and not delimited:
                return
            tag, head = self._header(limit)
            if tag == _SEQUENCE_END and delimited:
                return
            if tag != _ITEM:
                raise _Malformed(f"a sequence holds something other than items at {position}")
            length = self.length.unpack_from(head, 4)[0]
            if length == _UNDEFINED:
                self._elements(limit, True, implicit, depth)
                continue
            end = fp.tell() + length
            if end > limit:
                raise _Malformed(f"an item of {length} bytes runs past its end at {position}")
            self._elements(end, False, implicit, depth)

    def _fragments(self, limit: int) -> None:
        """Encapsulated pixel data: items of defined length, then the delimiter."""
        fp = self.fp
        while True:
            position = fp.tell()
            tag, head = self._header(limit)
            if tag == _SEQUENCE_END:
                return
            length = self.length.unpack_from(head, 4)[0]
            if tag != _ITEM or length == _UNDEFINED:
                raise _Malformed(f"encapsulated pixel data holds a non-fragment at {position}")
            end = fp.tell() + length
            if end > limit:
                raise _Malformed(f"a fragment of {length} bytes runs past its end at {position}")
            fp.seek(end)


def parse_header(source: bytes | bytearray | Path | BinaryIO, whole: bool = True) -> Dataset:
    """The header (no pixel data) of Part 10 bytes or a file, or why it cannot be read.

    The whole stream is checked first (:func:`check_structure`): pydicom reads only the
    header, and reads damaged bytes leniently, so without the check a file cut inside its
    pixel data, or one whose lengths or VRs are garbage, could be stored as received.
    ``whole=False`` skips the check, for bytes known to be cut and refused anyway (a STOW-RS
    part over the size limit), whose header still names the instance in the answer.
    """
    in_memory = isinstance(source, bytes | bytearray)
    if whole:
        check_structure(source)
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
        self._catalogue_lock = threading.Lock()

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
                    rows = session.scalars(
                        select(Instance).where(Instance.sop_instance_uid.in_(uids))
                    )
                    existing = {row.sop_instance_uid: row for row in rows}
            except SQLAlchemyError as exc:  # unreachable: the sender keeps it and retries
                log.error(
                    "cannot read the catalogue for %d instance(s): %s", len(batch), brief(exc)
                )
                return [IngestOutcome(OUT_OF_RESOURCES, "cannot read the catalogue")] * len(batch)
            return self._write_and_catalogue(batch, existing, calling_ae)

    def _stripe(self, entry: _Entry) -> int:
        return hash(entry.header.sop_instance_uid) % len(self._uid_locks)

    def _write_and_catalogue(
        self, batch: list[_Entry], existing: dict[str, Instance], ae: str | None
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
        try:
            with self._catalogue_lock, self.catalogue.session() as session:
                self._add_instances(session, [(batch[i].header, written[i]) for i in new], ae)
                for index in changed:
                    self._record_duplicate(
                        session, batch[index], existing, written.get(index), ae, replace
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
        series: dict[str, Series] = {}
        for header, _ in instances:
            uid = header.series_instance_uid
            if uid not in series:
                series[uid] = self._upsert_series(session, header, ae, counts[uid], now)
        session.flush()  # the ids of new series
        rows = []
        for header, stored in instances:
            assert isinstance(stored, StoredFile)
            rows.append(
                {
                    "sop_instance_uid": header.sop_instance_uid,
                    "series_id": series[header.series_instance_uid].id,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "instance_number": header.instance_number,
                    "path": stored.relative_path,
                    "size": stored.size,
                    "sha256": stored.sha256,
                }
            )
        session.execute(insert(Instance), rows)

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
        session: Session,
        header: InstanceHeader,
        ae: str | None,
        count: int = 1,
        now: datetime | None = None,
    ) -> Series:
        """The series row (and its study, when new) with ``count`` more instances."""
        ds = header.dataset
        now = now or datetime.now(UTC)
        series = session.scalar(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        )
        if series is None:
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
                instance_count=0,
                first_received_at=now,
            )
            session.add(series)
        series.instance_count = (series.instance_count or 0) + count
        series.last_received_at = now
        return series

    @staticmethod
    def _record_duplicate(
        session: Session,
        entry: _Entry,
        existing: dict[str, Instance],
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
