"""DICOMweb (PS3.18): STOW-RS into the node, QIDO-RS and WADO-RS over what it holds.

STOW-RS parts take the C-STORE path (:meth:`Ingestor.ingest`): durable, validated,
catalogued, duplicates handled, so a series received over HTTP completes and is analysed
like one received over DIMSE. The request body is streamed and every part spooled before
the first one is stored, so a truncated upload stores nothing.

Queries and retrieval also cover the node's own results (the ``results`` table): they are
listed with the study they were made for, but not catalogued as received instances,
because a received series is what the completion watcher analyses.
"""

from __future__ import annotations

import json
import logging
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from xml.etree.ElementTree import Element, SubElement, tostring

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from node.catalogue.db import Catalogue
from node.catalogue.models import Instance, PipelineRun, Result, Series, Study
from node.disk import DiskGuard
from node.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
    Ingestor,
)
from node.multipart import MediaType, MultipartError, Part, parse_accept, read_parts, write_parts
from node.settings import Settings
from node.storage import Spool
from node.uids import InvalidUID, is_valid_uid, validate_uid

log = logging.getLogger(__name__)

DEFAULT_MAX_PART_BYTES = 512 * 1024 * 1024  # one instance; larger parts fail with 0xA700
DEFAULT_MEMORY_BUDGET = 64 * 1024 * 1024  # part bytes one request keeps in memory
MAX_QIDO_RESULTS = 1000  # per query; more are paged with limit/offset
STOW_CALLING_AE = "STOW-RS"
STOW_WORKERS = 4  # parts of one request stored at once
PARALLEL_PART_BYTES = 32 * 1024 * 1024  # larger parts are stored one at a time
PROCESSING_FAILURE = 0x0110

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
_FILE_CHUNK = 1024 * 1024
_IDENTIFY_BYTES = 1024 * 1024  # enough for the header of an oversized part
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NATIVE_DICOM = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

Level = Literal["study", "series", "instance"]

# Attributes returned by default (PS3.18 Table 6.7.1-2, -2a, -2b) and for includefield=all.
_STUDY_ATTRS = [
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
]
_STUDY_ALL = [
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
]
_SERIES_ATTRS = [
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "TimezoneOffsetFromUTC",
]
_SERIES_ALL = [
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
]
_INSTANCE_ATTRS = [
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "TimezoneOffsetFromUTC",
]
_UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
_STUDY_KEYS = {"StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber"}
_MATCHING_KEYS: dict[Level, set[str]] = {
    "study": _STUDY_KEYS | {"ModalitiesInStudy"},
    "series": _STUDY_KEYS | {"SeriesInstanceUID", "Modality", "SeriesDescription"},
}
_MATCHING_KEYS["instance"] = _MATCHING_KEYS["series"] | {"SOPInstanceUID"}


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, message)


def _uid(value: str, name: str) -> str:
    """A UID from a path or a query: validated before it reaches a path or a query."""
    try:
        return validate_uid(value, name)
    except InvalidUID as exc:
        raise _bad_request(str(exc)) from None


# --- STOW-RS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartOutcome:
    """What happened to one STOW-RS part (UIDs are None where the part did not say)."""

    status: int
    reason: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


def _identify(data: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """Best-effort (SOP Class, SOP Instance, Study, Series) UIDs for the answer; the
    ingestor makes the real decision, so unreadable data yields Nones, not an error."""
    names = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=list(names))
        values = [str(ds.get(name, "") or "") for name in names]
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, struct.error):
        return None, None, None, None
    a, b, c, d = (value if is_valid_uid(value) else None for value in values)
    return a, b, c, d


class StowService:
    """Stores the parts of one STOW-RS request through the ingestor (as DIMSE does)."""

    def __init__(self, ingestor: Ingestor, max_part_bytes: int) -> None:
        self.ingestor = ingestor
        self.max_part_bytes = max_part_bytes

    def store(self, parts: list[Part], study_uid: str | None) -> list[PartOutcome]:
        """Outcomes in part order. Parts are stored a few at a time, because each waits on
        its fsyncs; a large part is stored alone, so memory stays near one large part."""
        outcomes: dict[int, PartOutcome] = {}
        with ThreadPoolExecutor(STOW_WORKERS, thread_name_prefix="stow") as pool:
            pending: dict[Future[PartOutcome], int] = {}
            for index, part in enumerate(parts):
                if part.size > PARALLEL_PART_BYTES:
                    wait(pending)
                    outcomes[index] = self._store_part(part, study_uid)
                else:
                    pending[pool.submit(self._store_part, part, study_uid)] = index
            for future, index in pending.items():
                outcomes[index] = future.result()
        return [outcomes[index] for index in range(len(parts))]

    def _store_part(self, part: Part, study_uid: str | None) -> PartOutcome:
        content_type = part.content_type
        if content_type is not None and content_type.type != "application/dicom":
            return PartOutcome(CANNOT_UNDERSTAND, f"a part of type {content_type.type}")
        data = part.head(_IDENTIFY_BYTES) if part.oversized else part.read()
        sop_class, sop_uid, part_study, part_series = _identify(data)
        ids = {
            "sop_class_uid": sop_class,
            "sop_instance_uid": sop_uid,
            "study_uid": part_study,
            "series_uid": part_series,
        }
        if part.oversized:
            reason = f"part larger than the {self.max_part_bytes}-byte limit"
            log.warning("STOW-RS part refused: %s", reason)
            return PartOutcome(OUT_OF_RESOURCES, reason, **ids)
        # A part without a readable Study UID is the ingestor's to refuse (0xC000 / 0xA900).
        if study_uid is not None and part_study is not None and part_study != study_uid:
            reason = "StudyInstanceUID differs from the one in the request URL"
            log.warning("STOW-RS part refused: %s", reason)
            return PartOutcome(DATASET_DOES_NOT_MATCH_SOP_CLASS, reason, **ids)
        try:
            outcome = self.ingestor.ingest(data, STOW_CALLING_AE)
        except Exception:  # one part's bug must not lose the answer for the others
            log.exception("STOW-RS part could not be ingested")
            return PartOutcome(PROCESSING_FAILURE, "processing failure", **ids)
        return PartOutcome(outcome.status, outcome.reason, **ids)


def stow_answer(outcomes: list[PartOutcome], studies_url: str, study_uid: str | None) -> Dataset:
    """The PS3.18 10.5.3 response data set: referenced and failed SOP instances."""
    answer = Dataset()
    referenced, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
        if outcome.status == SUCCESS:
            item.RetrieveURL = (
                f"{studies_url}/{outcome.study_uid}/series/{outcome.series_uid}"
                f"/instances/{outcome.sop_instance_uid}"
            )
            referenced.append(item)
        else:
            item.FailureReason = outcome.status
            failed.append(item)
    stored_studies = {outcome.study_uid for outcome in outcomes if outcome.status == SUCCESS}
    study = study_uid or (stored_studies.pop() if len(stored_studies) == 1 else None)
    if study is not None:
        answer.RetrieveURL = f"{studies_url}/{study}"
    if referenced:
        answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    return answer


def stow_status(outcomes: list[PartOutcome]) -> int:
    stored = sum(outcome.status == SUCCESS for outcome in outcomes)
    if stored == len(outcomes):
        return status.HTTP_200_OK
    return status.HTTP_202_ACCEPTED if stored else status.HTTP_409_CONFLICT


# --- DICOM JSON and XML --------------------------------------------------------------------


def dicom_json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(suppress_invalid_tags=True)


def json_to_xml(model: dict[str, Any]) -> bytes:
    """A DICOM JSON object as a PS3.19 Native DICOM Model document."""
    root = Element("NativeDicomModel", xmlns=_NATIVE_DICOM)
    _xml_attributes(root, model)
    return tostring(root, encoding="utf-8", xml_declaration=True)


def _xml_attributes(parent: Element, model: dict[str, Any]) -> None:
    for tag, element in sorted(model.items()):
        vr = element["vr"]
        attrs = {"tag": tag, "vr": vr}
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attrs["keyword"] = keyword
        node = SubElement(parent, "DicomAttribute", attrs)
        if "InlineBinary" in element:
            SubElement(node, "InlineBinary").text = element["InlineBinary"]
        elif "BulkDataURI" in element:
            SubElement(node, "BulkData", uri=element["BulkDataURI"])
        for number, value in enumerate(element.get("Value", []), start=1):
            if vr == "SQ":
                _xml_attributes(SubElement(node, "Item", number=str(number)), value)
            elif vr == "PN":
                _xml_person_name(SubElement(node, "PersonName", number=str(number)), value)
            else:
                text = "" if value is None else str(value)
                SubElement(node, "Value", number=str(number)).text = text


def _xml_person_name(parent: Element, value: dict[str, str]) -> None:
    parts = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        if value.get(group):
            node = SubElement(parent, group)
            for name, text in zip(parts, value[group].split("^"), strict=False):
                if text:
                    SubElement(node, name).text = text


def _negotiate(accept: str | None, offers: list[str]) -> str:
    """The first of ``offers`` (most preferred by the server first) the client accepts."""
    for media in parse_accept(accept):
        for offer in offers:
            if media.type in (offer, "*/*", offer.split("/")[0] + "/*"):
                return offer
            if media.type == "application/json" and offer == DICOM_JSON:
                return offer
    raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"can answer only {', '.join(offers)}")


def _json_response(body: Any, code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), code, headers=headers, media_type=DICOM_JSON)


# --- QIDO-RS -------------------------------------------------------------------------------


@dataclass
class Query:
    """A parsed QIDO-RS request: matching keys, paging and the attributes to return."""

    level: Level
    uids: dict[str, list[str]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    date: tuple[str, str] | None = None  # inclusive, either end may be ""
    limit: int = MAX_QIDO_RESULTS
    offset: int = 0
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, level: Level, params: Iterable[tuple[str, str]]) -> Query:
        query = cls(level)
        ignored: list[str] = []
        for key, value in params:
            if key == "limit":
                query.limit = min(_non_negative(key, value), MAX_QIDO_RESULTS)
            elif key == "offset":
                query.offset = _non_negative(key, value)
            elif key == "fuzzymatching":
                if value.strip().lower() == "true":
                    query.warnings.append("fuzzy matching is not supported; literal matching used")
            elif key == "includefield":
                for name in filter(None, (item.strip() for item in value.split(","))):
                    if name == "all":
                        query.include_all = True
                    else:
                        query.include.append(_keyword(name))
            else:
                query._add_key(_keyword(key), value, ignored)
        if ignored:
            query.warnings.append(f"not supported for matching, ignored: {', '.join(ignored)}")
        return query

    def _add_key(self, keyword: str, value: str, ignored: list[str]) -> None:
        if self.level == "study" and keyword == "Modality":
            keyword = "ModalitiesInStudy"
        self.include.append(keyword)
        if keyword not in _MATCHING_KEYS[self.level]:
            ignored.append(keyword)
        elif keyword in _UID_KEYS:
            values = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
            if values:  # an empty value is universal matching
                self.uids.setdefault(keyword, []).extend(_uid(v, keyword) for v in values)
        elif keyword == "StudyDate":
            self.date = _date_range(value)
        else:
            self.text[keyword] = value

    def restrict(self, keyword: str, uid: str) -> None:
        """A UID from the request path: a matching key the client cannot widen."""
        given = self.uids.get(keyword)
        self.uids[keyword] = [uid] if given is None or uid in given else []


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise _bad_request(f"{name} must be a non-negative integer")
    return int(value)


def _keyword(name: str) -> str:
    """An attribute named by keyword or by 8-digit hex tag."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise _bad_request(f"unknown or unsupported attribute {name!r}")


def _date_range(value: str) -> tuple[str, str] | None:
    if value in ("", "*"):
        return None
    low, dash, high = value.partition("-")
    for part in (low, high):
        if part and not (len(part) == 8 and part.isdigit()):
            raise _bad_request("StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if not dash:
        return low, low
    if not low and not high:
        raise _bad_request("StudyDate range needs at least one end")
    return low, high


def _pattern_condition(column: Any, pattern: str, dialect: str) -> ColumnElement[bool] | None:
    """Single-value matching with DICOM wildcards (* and ?), case-sensitive; None = any."""
    if pattern in ("", "*"):
        return None
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    if dialect == "sqlite":  # LIKE ignores case in SQLite; GLOB does not
        return column.op("GLOB")(pattern.replace("[", "[[]"))
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _pattern_matches(value: str | None, pattern: str) -> bool:
    if pattern in ("", "*"):
        return True
    return value is not None and fnmatchcase(value, pattern.replace("[", "[[]"))


@dataclass
class Row:
    """One match: what the catalogue knows, and a file to read the other attributes from."""

    study: Study
    path: Path | None
    series_uid: str | None = None
    modality: str | None = None
    series_description: str | None = None
    sop_uid: str | None = None
    sop_class: str | None = None
    instance_number: int | None = None
    modalities: set[str] = field(default_factory=set)
    series_count: int = 0
    instance_count: int = 0


@dataclass(frozen=True)
class ResultRow:
    """A result the node wrote, with the study of the series it was made from."""

    study: Study
    series_uid: str
    sop_uid: str
    modality: str
    path: Path


class Finder:
    """Matches queries against the catalogue and the results table."""

    def __init__(self, settings: Settings, session: Session) -> None:
        self.settings = settings
        self.session = session
        self.dialect = session.get_bind().dialect.name

    def _conditions(self, query: Query, columns: dict[str, Any]) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        for keyword, uids in query.uids.items():
            if keyword in columns:
                conditions.append(columns[keyword].in_(uids))
        for keyword, pattern in query.text.items():
            if keyword in columns:
                condition = _pattern_condition(columns[keyword], pattern, self.dialect)
                if condition is not None:
                    conditions.append(condition)
        return conditions

    def _study_conditions(self, query: Query) -> list[ColumnElement[bool]]:
        columns = {
            "StudyInstanceUID": Study.study_instance_uid,
            "PatientID": Study.patient_id,
            "AccessionNumber": Study.accession_number,
        }
        conditions = self._conditions(query, columns)
        if query.date is not None:
            low, high = query.date
            if low:
                conditions.append(Study.study_date >= low)
            if high:
                conditions.append(Study.study_date <= high)
        return conditions

    def results(self, query: Query, *extra: ColumnElement[bool]) -> list[ResultRow]:
        """Results matching the query, except those also received as instances."""
        columns = {
            "SeriesInstanceUID": Result.series_instance_uid,
            "SOPInstanceUID": Result.sop_instance_uid,
            "Modality": func.upper(Result.kind),
        }
        stmt = (
            select(Result, Study)
            .join(PipelineRun, Result.run_id == PipelineRun.id)
            .join(Series, PipelineRun.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns), *extra)
            .where(Result.sop_instance_uid.not_in(select(Instance.sop_instance_uid)))
            .order_by(Result.id)
        )
        rows = []
        for result, study in self.session.execute(stmt):
            path = _inside(self.settings.results_dir, result.path)
            if path is not None:
                rows.append(
                    ResultRow(
                        study,
                        result.series_instance_uid,
                        result.sop_instance_uid,
                        result.kind.upper(),
                        path,
                    )
                )
        pattern = query.text.get("SeriesDescription", "")
        if pattern not in ("", "*"):
            rows = [
                row
                for row in rows
                if _pattern_matches(
                    _read(row.path, ["SeriesDescription"]).get("SeriesDescription"), pattern
                )
            ]
        return rows

    def studies(self, query: Query) -> tuple[list[Row], bool]:
        stmt = select(Study).where(*self._study_conditions(query))
        by_series = self._conditions(query, {"ModalitiesInStudy": Series.modality})
        if by_series:  # a study matches if a received series or a result has the modality
            by_result = self._conditions(query, {"ModalitiesInStudy": func.upper(Result.kind)})
            received = select(Series.study_id).where(*by_series)
            made = (
                select(Series.study_id)
                .join(PipelineRun, PipelineRun.series_id == Series.id)
                .join(Result, Result.run_id == PipelineRun.id)
                .where(*by_result)
            )
            stmt = stmt.where(or_(Study.id.in_(received), Study.id.in_(made)))
        found = list(
            self.session.scalars(
                stmt.order_by(Study.id).offset(query.offset).limit(query.limit + 1)
            )
        )
        more = len(found) > query.limit
        studies = {study.id: study for study in found[: query.limit]}
        rows = {study_id: Row(study, None) for study_id, study in studies.items()}
        first: dict[int, int] = {}
        per_series = (
            select(Series.study_id, Series.modality, func.count(Instance.id), func.min(Instance.id))
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(list(studies)))
            .group_by(Series.id)
        )
        for study_id, modality, count, first_id in self.session.execute(per_series):
            row = rows[study_id]
            row.series_count += 1
            row.instance_count += count
            if modality:
                row.modalities.add(modality)
            if first_id is not None:
                first[study_id] = min(first.get(study_id, first_id), first_id)
        paths = self._instance_paths(list(first.values()))
        for study_id, instance_id in first.items():
            rows[study_id].path = paths.get(instance_id)
        result_series: dict[int, set[str]] = {}
        for result in self.results(Query("study"), Study.id.in_(list(studies))):
            row = rows[result.study.id]
            row.instance_count += 1
            row.modalities.add(result.modality)
            result_series.setdefault(result.study.id, set()).add(result.series_uid)
        for study_id, series_uids in result_series.items():
            rows[study_id].series_count += len(series_uids - self._received(series_uids))
        return list(rows.values()), more

    def _received(self, series_uids: Iterable[str]) -> set[str]:
        """Which of these series UIDs are received series (a result may share one)."""
        stmt = select(Series.series_instance_uid).where(
            Series.series_instance_uid.in_(list(series_uids))
        )
        return set(self.session.scalars(stmt))

    def _instance_paths(self, ids: list[int]) -> dict[int, Path]:
        stmt = select(Instance.id, Instance.path).where(Instance.id.in_(ids))
        paths = {
            i: _inside(self.settings.spool_dir, path) for i, path in self.session.execute(stmt)
        }
        return {i: path for i, path in paths.items() if path is not None}

    def _series_stmt(self, query: Query) -> Select[Any]:
        columns = {
            "SeriesInstanceUID": Series.series_instance_uid,
            "Modality": Series.modality,
            "SeriesDescription": Series.series_description,
        }
        return (
            select(Series, Study, func.count(Instance.id), func.min(Instance.id))
            .join(Study, Series.study_id == Study.id)
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns))
            .group_by(Series.id, Study.id)
        )

    def series(self, query: Query) -> tuple[list[Row], bool]:
        stmt = self._series_stmt(query).order_by(Series.id)

        def catalogued(offset: int, limit: int) -> list[Row]:
            found = self.session.execute(stmt.offset(offset).limit(limit)).all()
            paths = self._instance_paths([first for *_, first in found if first is not None])
            return [
                Row(
                    study,
                    paths.get(first),
                    series_uid=series.series_instance_uid,
                    modality=series.modality,
                    series_description=series.series_description,
                    instance_count=count,
                )
                for series, study, count, first in found
            ]

        def made() -> list[Row]:
            grouped: dict[str, Row] = {}
            for result in self.results(query):
                row = grouped.setdefault(
                    result.series_uid,
                    Row(result.study, result.path, result.series_uid, result.modality),
                )
                row.instance_count += 1
            known = self._received(grouped)
            return [row for uid, row in grouped.items() if uid not in known]

        return self._page(stmt, catalogued, made, query)

    def instances(self, query: Query) -> tuple[list[Row], bool]:
        columns = {
            "SeriesInstanceUID": Series.series_instance_uid,
            "Modality": Series.modality,
            "SeriesDescription": Series.series_description,
            "SOPInstanceUID": Instance.sop_instance_uid,
        }
        stmt = (
            select(Instance, Series, Study)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns))
            .order_by(Series.id, Instance.instance_number, Instance.id)
        )

        def catalogued(offset: int, limit: int) -> list[Row]:
            return [
                Row(
                    study,
                    _inside(self.settings.spool_dir, instance.path),
                    series_uid=series.series_instance_uid,
                    modality=series.modality,
                    series_description=series.series_description,
                    sop_uid=instance.sop_instance_uid,
                    sop_class=instance.sop_class_uid,
                    instance_number=instance.instance_number,
                )
                for instance, series, study in self.session.execute(
                    stmt.offset(offset).limit(limit)
                )
            ]

        def made() -> list[Row]:
            return [
                Row(r.study, r.path, r.series_uid, r.modality, sop_uid=r.sop_uid)
                for r in self.results(query)
            ]

        return self._page(stmt, catalogued, made, query)

    def _page(
        self,
        stmt: Select[Any],
        catalogued: Callable[[int, int], list[Row]],
        made: Callable[[], list[Row]],
        query: Query,
    ) -> tuple[list[Row], bool]:
        """One page of catalogued rows followed by the (few) result rows."""
        rows = catalogued(query.offset, query.limit + 1)
        if len(rows) > query.limit:
            return rows[: query.limit], True
        if rows or query.offset == 0:
            before = query.offset + len(rows)
        else:
            counted = select(func.count()).select_from(stmt.order_by(None).subquery())
            before = self.session.scalar(counted) or 0
        start = max(0, query.offset - before)
        wanted = query.limit - len(rows)
        extra = made()[start : start + wanted + 1]
        return rows + extra[:wanted], len(extra) > wanted


def _inside(root: Path, relative: str) -> Path | None:
    """A catalogue path under its root, or None (logged) for one that would leave it."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        log.error("catalogue path outside its folder ignored: %r", relative)
        return None
    return root / pure


def _read(path: Path | None, keywords: list[str] | None) -> Dataset:
    """The header of a stored file (no pixel data); empty if it cannot be read."""
    if path is None:
        return Dataset()
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as exc:
        log.warning("cannot read the header of %s: %s", path.name, exc)
        return Dataset()


def _copy(target: Dataset, header: Dataset, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if keyword in header and keyword not in target:
            target.add(header[keyword])


def render(row: Row, query: Query, studies_url: str, in_study: bool, in_series: bool) -> Dataset:
    """One QIDO-RS answer item from catalogue values plus the stored file's header.

    Attributes of a higher level are included unless the request path fixes that level
    (``in_study``: /studies/{uid}/..., ``in_series``: .../series/{uid}/...).
    """
    level = query.level
    with_study = level == "study" or not in_study
    wanted: list[str] = []
    if with_study:
        wanted += _STUDY_ATTRS + (_STUDY_ALL if query.include_all else [])
    if level == "series" or (level == "instance" and not in_series):
        wanted += _SERIES_ATTRS + (_SERIES_ALL if query.include_all else [])
    if level == "instance":
        wanted += _INSTANCE_ATTRS
    wanted += query.include
    all_of_instance = level == "instance" and query.include_all
    header = _read(row.path, None if all_of_instance else sorted(set(wanted)))
    out = Dataset()
    study = row.study
    out.StudyInstanceUID = study.study_instance_uid
    url = f"{studies_url}/{study.study_instance_uid}"
    if level == "study":
        out.ModalitiesInStudy = sorted(row.modalities)
        out.NumberOfStudyRelatedSeries = row.series_count
        out.NumberOfStudyRelatedInstances = row.instance_count
    else:
        out.SeriesInstanceUID = row.series_uid
        url += f"/series/{row.series_uid}"
        if row.modality:
            out.Modality = row.modality
        if row.series_description:
            out.SeriesDescription = row.series_description
    if level == "series":
        out.NumberOfSeriesRelatedInstances = row.instance_count
    if level == "instance":
        out.SOPInstanceUID = row.sop_uid
        url += f"/instances/{row.sop_uid}"
        if row.sop_class:
            out.SOPClassUID = row.sop_class
        if row.instance_number is not None:
            out.InstanceNumber = row.instance_number
    if with_study:
        for keyword, value in (
            ("PatientID", study.patient_id),
            ("StudyDate", study.study_date),
            ("AccessionNumber", study.accession_number),
        ):
            if value and keyword not in header:
                setattr(out, keyword, value)
    out.InstanceAvailability = "ONLINE"
    out.RetrieveURL = url
    _copy(out, header, wanted)
    if all_of_instance:
        for element in header:
            bulky = element.VR in _BULK_VRS or element.tag.group in (0x0002, 0x7FE0)
            if not bulky and element.tag not in out:
                out.add(element)
    return out


# --- WADO-RS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    path: Path
    transfer_syntax_uid: str | None


def locate(
    settings: Settings, session: Session, study: str, series: str | None, sop: str | None
) -> list[StoredObject]:
    """The files of a study, a series or one instance (received first, then results)."""
    stmt = (
        select(Instance.path, Instance.transfer_syntax_uid)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.study_instance_uid == study)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    query = Query("instance")
    query.restrict("StudyInstanceUID", study)
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == series)
        query.restrict("SeriesInstanceUID", series)
    if sop is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop)
        query.restrict("SOPInstanceUID", sop)
    found = []
    for relative, tsuid in session.execute(stmt):
        path = _inside(settings.spool_dir, relative)
        if path is not None:
            found.append(StoredObject(path, tsuid))
    found += [StoredObject(r.path, None) for r in Finder(settings, session).results(query)]
    return found


def _acceptable_syntaxes(accept: str | None) -> set[str]:
    """Transfer syntaxes the client accepts for application/dicom ("*" = as stored).

    Without a transfer-syntax parameter the node answers as stored: it does not transcode.
    """
    syntaxes: set[str] = set()
    for media in parse_accept(accept):
        if media.type in ("*/*", "multipart/*"):
            syntaxes.add("*")
        elif media.type in ("multipart/related", "application/dicom"):
            kind = media.params.get("type", "application/dicom").lower()
            if media.type == "application/dicom" or kind == "application/dicom":
                syntaxes.add(media.params.get("transfer-syntax", "*"))
    if not syntaxes:
        raise HTTPException(
            status.HTTP_406_NOT_ACCEPTABLE,
            'can answer only multipart/related; type="application/dicom"',
        )
    return syntaxes


def _transfer_syntax(obj: StoredObject) -> str:
    if obj.transfer_syntax_uid:
        return obj.transfer_syntax_uid
    return str(read_file_meta_info(obj.path).TransferSyntaxUID)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(_FILE_CHUNK):
            yield chunk


def retrieve_response(objects: list[StoredObject], accept: str | None) -> StreamingResponse:
    """Stored bytes as multipart/related, streamed file by file."""
    syntaxes = _acceptable_syntaxes(accept)
    typed = [(obj, _transfer_syntax(obj)) for obj in objects]
    if "*" not in syntaxes:
        refused = {tsuid for _, tsuid in typed if tsuid not in syntaxes}
        if refused:
            raise HTTPException(
                status.HTTP_406_NOT_ACCEPTABLE,
                f"stored as {', '.join(sorted(refused))}; the node does not transcode",
            )
    boundary = uuid.uuid4().hex
    body = write_parts(
        boundary,
        ((f"application/dicom; transfer-syntax={ts}", _file_chunks(obj.path)) for obj, ts in typed),
    )
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body, media_type=media_type)


def metadata(objects: list[StoredObject]) -> list[dict[str, Any]]:
    """DICOM JSON of each header; pixel data is left out (no bulk data service)."""
    return [dicom_json(_read(obj.path, None)) for obj in objects]


# --- the router ----------------------------------------------------------------------------


def create_dicomweb_router(
    settings: Settings,
    catalogue: Catalogue,
    ingestor: Ingestor | None = None,
    *,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> APIRouter:
    """STOW-RS, QIDO-RS and WADO-RS under ``/dicom-web``.

    Pass the node's own ``ingestor`` so DIMSE and STOW-RS share its locks; without one the
    router makes its own from ``settings`` (for an API-only process).
    """
    if ingestor is None:
        ingestor = Ingestor(
            Spool(settings.spool_dir, settings.quarantine_dir),
            catalogue,
            DiskGuard(settings.data_path, settings.dicom.min_free_mb * 1024 * 1024),
            settings.dicom.duplicate_policy,
        )
    stow = StowService(ingestor, max_part_bytes)
    router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])

    def studies_url(request: Request) -> str:
        return str(request.url_for("dicomweb_search_studies"))

    async def store(request: Request, study: str | None) -> Response:
        if study is not None:
            _uid(study, "StudyInstanceUID")
        answer_type = _negotiate(request.headers.get("accept"), [DICOM_JSON, DICOM_XML])
        media = MediaType.parse(request.headers.get("content-type", ""))
        kind = media.params.get("type", "application/dicom").lower()
        if media.type != "multipart/related" or kind != "application/dicom":
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                'STOW-RS takes multipart/related; type="application/dicom"',
            )
        boundary = media.params.get("boundary")
        if not boundary:
            raise _bad_request("the Content-Type has no boundary parameter")
        try:
            parts = await read_parts(
                request.stream(),
                boundary,
                max_part_bytes=max_part_bytes,
                memory_budget=memory_budget,
                tmp_dir=settings.data_path,
            )
        except MultipartError as exc:
            raise _bad_request(f"malformed multipart body: {exc}; nothing was stored") from exc
        except OSError as exc:  # spilling a part to the data folder failed (disk full?)
            log.error("STOW-RS body could not be spooled: %s", exc)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "cannot spool the request; nothing stored"
            ) from exc
        except ClientDisconnect:
            log.warning("STOW-RS client disconnected before the end of its body; nothing stored")
            raise _bad_request("the body ended early; nothing was stored") from None
        try:
            outcomes = await run_in_threadpool(stow.store, parts, study)
        finally:
            for part in parts:
                part.close()
        answer = dicom_json(stow_answer(outcomes, studies_url(request), study))
        code = stow_status(outcomes)
        stored = sum(outcome.status == SUCCESS for outcome in outcomes)
        log.info("STOW-RS: %d of %d part(s) stored", stored, len(outcomes))
        if answer_type == DICOM_XML:
            return Response(json_to_xml(answer), code, media_type=DICOM_XML)
        return _json_response(answer, code)

    @router.post("/studies", name="dicomweb_store")
    async def store_instances(request: Request) -> Response:
        """STOW-RS: store instances of any studies."""
        return await store(request, None)

    @router.post("/studies/{study}", name="dicomweb_store_study")
    async def store_study_instances(request: Request, study: str) -> Response:
        """STOW-RS: store instances that must belong to the study in the URL."""
        return await store(request, study)

    def search(
        request: Request, level: Level, study: str | None = None, series: str | None = None
    ) -> Response:
        _negotiate(request.headers.get("accept"), [DICOM_JSON])
        query = Query.parse(level, request.query_params.multi_items())
        if study is not None:
            query.restrict("StudyInstanceUID", _uid(study, "StudyInstanceUID"))
        if series is not None:
            query.restrict("SeriesInstanceUID", _uid(series, "SeriesInstanceUID"))
        with catalogue.session() as session:
            finder = Finder(settings, session)
            found = {"study": finder.studies, "series": finder.series, "instance": finder.instances}
            rows, more = found[level](query)
        base = studies_url(request)
        body = [
            dicom_json(render(row, query, base, study is not None, series is not None))
            for row in rows
        ]
        warnings = list(query.warnings)
        if more:
            warnings.append("there are more matches; ask again with a higher offset")
        headers = {"Warning": ", ".join(f'299 curia-node "{w}"' for w in warnings)}
        return _json_response(body, headers=headers if warnings else None)

    @router.get("/studies", name="dicomweb_search_studies")
    def search_studies(request: Request) -> Response:
        """QIDO-RS: studies."""
        return search(request, "study")

    @router.get("/series")
    def search_all_series(request: Request) -> Response:
        """QIDO-RS: series of any study."""
        return search(request, "series")

    @router.get("/studies/{study}/series")
    def search_series(request: Request, study: str) -> Response:
        """QIDO-RS: series of one study."""
        return search(request, "series", study)

    @router.get("/instances")
    def search_all_instances(request: Request) -> Response:
        """QIDO-RS: instances of any study."""
        return search(request, "instance")

    @router.get("/studies/{study}/instances")
    def search_study_instances(request: Request, study: str) -> Response:
        """QIDO-RS: instances of one study."""
        return search(request, "instance", study)

    @router.get("/studies/{study}/series/{series}/instances")
    def search_instances(request: Request, study: str, series: str) -> Response:
        """QIDO-RS: instances of one series."""
        return search(request, "instance", study, series)

    def find(study: str, series: str | None = None, sop: str | None = None) -> list[StoredObject]:
        study = _uid(study, "StudyInstanceUID")
        series = None if series is None else _uid(series, "SeriesInstanceUID")
        sop = None if sop is None else _uid(sop, "SOPInstanceUID")
        with catalogue.session() as session:
            objects = locate(settings, session, study, series, sop)
        if not objects:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study, series or instance")
        return objects

    def metadata_response(request: Request, objects: list[StoredObject]) -> Response:
        _negotiate(request.headers.get("accept"), [DICOM_JSON])
        return _json_response(metadata(objects))

    @router.get("/studies/{study}", name="dicomweb_study")
    def retrieve_study(request: Request, study: str) -> Response:
        """WADO-RS: every instance of a study."""
        return retrieve_response(find(study), request.headers.get("accept"))

    @router.get("/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        """WADO-RS: every instance of a series."""
        return retrieve_response(find(study, series), request.headers.get("accept"))

    @router.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        """WADO-RS: one instance, as stored."""
        return retrieve_response(find(study, series, sop), request.headers.get("accept"))

    @router.get("/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> Response:
        """WADO-RS: the headers of a study's instances."""
        return metadata_response(request, find(study))

    @router.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        """WADO-RS: the headers of a series' instances."""
        return metadata_response(request, find(study, series))

    @router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        """WADO-RS: the header of one instance."""
        return metadata_response(request, find(study, series, sop))

    return router
