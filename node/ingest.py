"""Receive -> store durably -> catalogue: the one path every received instance takes.

The DIMSE listener (and later STOW-RS) hands raw Part 10 bytes to :meth:`Ingestor.ingest`
and returns the status it gets. Success is returned only after the file is durable and its
catalogue row committed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Instance, Series, Study
from node.disk import DiskGuard
from node.storage import Spool, StoredFile
from node.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

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


class RejectedInstance(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_header(data: bytes) -> InstanceHeader:
    """Parse the identifying attributes of a Part 10 byte string, validating every UID."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    try:
        tsuid = validate_uid(str(ds.file_meta.get("TransferSyntaxUID", "")), "TransferSyntaxUID")
        values = [
            validate_uid(str(ds.get(name, "") or ""), name)
            for name in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ]
    except InvalidUID as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    return InstanceHeader(*values, transfer_syntax_uid=tsuid, dataset=ds)


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
        if self.guard is not None and not self.guard.can_accept(len(data)):
            log.error("refused instance from %s: free disk space below the watermark", calling_ae)
            return IngestOutcome(OUT_OF_RESOURCES, "free disk space below the watermark")
        try:
            header = read_header(data)
            if expected_sop_uid is not None and header.sop_instance_uid != expected_sop_uid:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID in the data set differs from the request's",
                )
        except RejectedInstance as exc:
            self.spool.quarantine(data, exc.reason, calling_ae)
            log.warning("refused instance from %s: 0x%04X %s", calling_ae, exc.status, exc.reason)
            return IngestOutcome(exc.status, exc.reason)
        with self._uid_locks[hash(header.sop_instance_uid) % len(self._uid_locks)]:
            return self._store(header, data, calling_ae)

    def _store(self, header: InstanceHeader, data: bytes, calling_ae: str | None) -> IngestOutcome:
        with self.catalogue.session() as session:
            existing = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
            )
        if existing is not None:
            return self._duplicate(existing, header, data, calling_ae)
        stored = self._write(header, data)
        if isinstance(stored, IngestOutcome):
            return stored
        try:
            with self._catalogue_lock, self.catalogue.session() as session:
                series = self._upsert_series(session, header, calling_ae)
                session.add(
                    Instance(
                        sop_instance_uid=header.sop_instance_uid,
                        series=series,
                        sop_class_uid=header.sop_class_uid,
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        instance_number=_instance_number(header.dataset),
                        path=stored.relative_path,
                        size=stored.size,
                        sha256=stored.sha256,
                    )
                )
        except Exception:
            log.exception("cannot catalogue instance; removing its file")
            self.spool.remove(stored.relative_path)
            return IngestOutcome(OUT_OF_RESOURCES, "cannot write to the catalogue")
        return IngestOutcome(SUCCESS, series_uid=header.series_instance_uid)

    def _write(self, header: InstanceHeader, data: bytes) -> StoredFile | IngestOutcome:
        """Write the file durably, or the Out of Resources outcome if the disk refuses."""
        try:
            return self.spool.store(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                data,
            )
        except OSError as exc:
            log.error("cannot write instance to the spool: %s", exc)
            return IngestOutcome(OUT_OF_RESOURCES, "cannot write to the spool")

    def _upsert_series(self, session: Session, header: InstanceHeader, ae: str | None) -> Series:
        ds = header.dataset
        now = datetime.now(UTC)
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
        series.instance_count = (series.instance_count or 0) + 1
        series.last_received_at = now
        return series

    def _duplicate(
        self, existing: Instance, header: InstanceHeader, data: bytes, ae: str | None
    ) -> IngestOutcome:
        """Identical bytes: Success, stored once. Different bytes: the configured policy
        (keep the first copy, or replace it atomically), recorded in the audit trail."""
        digest = hashlib.sha256(data).hexdigest()
        if digest == existing.sha256:
            return IngestOutcome(SUCCESS, duplicate=True, series_uid=header.series_instance_uid)
        replace = self.duplicate_policy == "replace"
        if replace:
            stored = self._write(header, data)
            if isinstance(stored, IngestOutcome):
                return stored
        with self._catalogue_lock, self.catalogue.session() as session:
            if replace:
                row = session.get(Instance, existing.id)
                row.path, row.size, row.sha256 = stored.relative_path, stored.size, stored.sha256
                row.transfer_syntax_uid = header.transfer_syntax_uid
            session.add(
                AuditEvent(
                    actor=ae or "unknown",
                    action="duplicate-differs-replaced"
                    if replace
                    else "duplicate-differs-kept-first",
                    target=header.sop_instance_uid,
                    details={"before": existing.sha256, "received": digest},
                )
            )
        return IngestOutcome(SUCCESS, duplicate=True, series_uid=header.series_instance_uid)
