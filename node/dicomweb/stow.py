"""STOW-RS: storing the parts of one request durably, catalogued like DIMSE instances.

Each part is written to a staging file in the spool while the body streams in, hashed on
the way, then parsed once and fsynced, by a pool of threads so that the fsyncs of a series
overlap the upload. Only after the closing delimiter does anything reach the catalogue:
the ingestor renames the staged files into place, fsyncs each folder touched once and
commits one transaction (:meth:`Ingestor.ingest_staged`), so a truncated upload stores
nothing and an instance is answered as stored only once it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import status
from pydicom.dataset import Dataset

from node.core.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from node.core.uids import is_valid_uid
from node.dicomweb.multipart import MediaType, MultipartParser
from node.store.disk import DiskGuard
from node.store.header import InstanceHeader, RejectedInstance, header_from, parse_header
from node.store.ingest import Ingestor, IngestOutcome
from node.store.spool import Spool, StagedFile

log = logging.getLogger(__name__)

STOW_CALLING_AE = "STOW-RS"
WRITE_CHUNK = 1024 * 1024  # part bytes handed to the writer thread at a time
FREE_SPACE_CHECK = 16 * 1024 * 1024  # body bytes between two free-space checks
SETTLE_WORKERS = 8  # parts written, parsed and fsynced at once as the body streams in
_ID_NAMES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_ID_KEYS = ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid")  # of PartOutcome


@dataclass(frozen=True)
class PartOutcome:
    """What happened to one STOW-RS part (UIDs are None where the part did not say)."""

    status: int
    reason: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


class StowRefused(Exception):
    """The whole request is refused while it streams in (nothing of it is stored): its HTTP
    status and the reason for the answer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class StowLimits:
    """What one request may cost: body bytes, parts, and the free space it must leave."""

    max_body_bytes: int = 4096 << 20
    max_parts: int = 10000
    guard: DiskGuard | None = None


class StowPart:
    """One body part on its way to the spool (a :class:`~node.dicomweb.multipart.PartSink`).

    Its bytes, up to the part limit, go to a staged file; a part that is not
    application/dicom is not kept at all, since it is refused whatever it holds.
    """

    def __init__(self, upload: StowUpload, headers: dict[str, str]) -> None:
        self.headers = headers
        value = headers.get("content-type")
        self.content_type = MediaType.parse(value) if value else None
        self.wanted = self.content_type is None or self.content_type.type == "application/dicom"
        self.limit = upload.max_part_bytes
        self.size = 0
        self.oversized = False
        self.staged: StagedFile | None = None
        self.header: InstanceHeader | RejectedInstance | None = None
        self.ids: dict[str, str | None] = dict.fromkeys(_ID_KEYS)
        self.error: Exception | None = None
        self.ready: Future[None] | None = None  # written, parsed and synced (or failed)
        self.written: Future[None] | None = None  # its last chunk handed to the writer
        self._upload = upload
        self._buffer = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if not self.wanted or self.oversized:
            return
        if self.size + len(data) > self.limit:
            data = data[: self.limit - self.size]
            self.oversized = True
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= WRITE_CHUNK:
            self._upload.write_chunk(self, self.take_buffer())

    def end(self) -> None:
        if self.wanted:
            self._upload.settle(self, self.take_buffer())

    def close(self) -> None:
        """Nothing here: the upload discards the staged files once its threads are done."""

    def take_buffer(self) -> bytearray:
        data, self._buffer = self._buffer, bytearray()
        return data

    def append(self, data: bytearray) -> None:
        """Write ``data`` to the staged file (created on the first bytes); one thread at a
        time, in order (a failure is kept on the part, and later bytes are dropped)."""
        if self.error is not None:
            return
        try:
            if self.staged is None:
                self.staged = self._upload.spool.stage()
            self.staged.write(data)
        except Exception as exc:
            self.error = exc

    def read_header(self, source: bytearray | Path) -> None:
        """Parse the header once, for the answer (:attr:`ids`) and for the ingestor."""
        ds: Dataset | None = None
        try:
            ds = parse_header(source, whole=not self.oversized)
            header = self.header = header_from(ds)
        except RejectedInstance as exc:
            self.header = exc
            if ds is not None:  # readable, but some UID is not valid
                self.identify(ds)
        except Exception as exc:  # a parser bug fails this part, not the request
            self.error = exc
        else:
            self.ids = {
                "sop_class_uid": header.sop_class_uid,
                "sop_instance_uid": header.sop_instance_uid,
                "study_uid": header.study_instance_uid,
                "series_uid": header.series_instance_uid,
            }

    def identify(self, ds: Dataset) -> None:
        """Best-effort UIDs for the answer; unreadable or invalid values stay None (the
        ingestor makes the real decision)."""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            values = [str(ds.get(name, "") or "") for name in _ID_NAMES]
            for key, value in zip(_ID_KEYS, values, strict=True):
                self.ids[key] = value if value and is_valid_uid(value) else None


class StowUpload:
    """Receives one STOW-RS body into staged files, and cleans up whatever is not placed.

    A part's last bytes (all of a part up to :data:`WRITE_CHUNK`) are written, hashed,
    parsed and fsynced by one task of a thread pool, so the parts of a series settle side
    by side while the body streams in; the earlier chunks of a larger part go through one
    writer thread, in order. Bytes handed to the threads and not yet done with are
    limited by ``memory_budget``: past it, reading the request waits for the disk, so a
    gigabyte upload is never held in memory.
    """

    def __init__(
        self,
        spool: Spool,
        max_part_bytes: int,
        memory_budget: int,
        limits: StowLimits | None = None,
    ) -> None:
        self.spool = spool
        self.max_part_bytes = max_part_bytes
        self.memory_budget = memory_budget
        self.limits = limits or StowLimits()
        self.received = 0
        self.parts: list[StowPart] = []  # every part begun, for the clean-up
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="stow-write")
        self._settler = ThreadPoolExecutor(SETTLE_WORKERS, thread_name_prefix="stow-settle")
        self._queue: deque[tuple[Future[None], int]] = deque()
        self._queued = 0

    def new_part(self, headers: dict[str, str]) -> StowPart:
        if len(self.parts) >= self.limits.max_parts:
            raise StowRefused(
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                f"more than {self.limits.max_parts} parts in one request",
            )
        part = StowPart(self, headers)
        self.parts.append(part)
        return part

    async def receive(self, stream: AsyncIterable[bytes], boundary: str) -> list[StowPart]:
        """The parts of a whole body, each staged, parsed and synced; raises
        :class:`~node.dicomweb.multipart.MultipartError` for a malformed or truncated body."""
        parser = MultipartParser(boundary, self.new_part)
        checked = 0
        async for chunk in stream:
            self.received += len(chunk)
            if self.received > self.limits.max_body_bytes:
                raise StowRefused(
                    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                    f"request body larger than {self.limits.max_body_bytes} bytes",
                )
            if self.received - checked >= FREE_SPACE_CHECK:
                checked = self.received
                self.check_space(0)
            parser.feed(chunk)
            await self._drain()
        parts = parser.finish()
        for part in parts:
            if part.ready is not None:
                await asyncio.wrap_future(part.ready)
        return parts

    def check_space(self, incoming: int) -> None:
        """Refuse the request (507) when ``incoming`` more bytes would take the data folder
        below its free-space watermark; checked before the body and as it is staged."""
        guard = self.limits.guard
        if guard is not None and not guard.can_accept(incoming):
            raise StowRefused(
                status.HTTP_507_INSUFFICIENT_STORAGE,
                "not enough free space in the data folder; try again later",
            )

    def write_chunk(self, part: StowPart, data: bytearray) -> None:
        """Hand a chunk of a large part to the writer thread (in arrival order)."""
        part.written = self._writer.submit(part.append, data)
        self._track(part.written, len(data))

    def settle(self, part: StowPart, data: bytearray) -> None:
        """The part is complete: write its last bytes, parse it and fsync it."""
        part.ready = self._settler.submit(self._settle, part, data, part.written)
        self._track(part.ready, len(data))

    def _track(self, future: Future[None], size: int) -> None:
        self._queue.append((future, size))
        self._queued += size

    async def _drain(self) -> None:
        """Forget finished tasks; wait for the oldest while too many bytes are queued."""
        while self._queue:
            future, size = self._queue[0]
            if not future.done():
                if self._queued <= self.memory_budget:
                    return
                await asyncio.wrap_future(future)
            self._queue.popleft()
            self._queued -= size

    @staticmethod
    def _settle(part: StowPart, data: bytearray, written: Future[None] | None) -> None:
        """Settler thread: the part's last bytes after its earlier chunks, its header (from
        memory when the part was never larger than one chunk), then fsync (not for an
        oversized part, which is never stored)."""
        if written is not None:
            written.result()
        part.append(data)
        if part.error is not None or part.staged is None:
            return
        part.read_header(data if written is None else part.staged.path)
        if not part.oversized:
            try:
                part.staged.sync()
            except Exception as exc:
                part.error = exc

    def close(self) -> None:
        """Wait for the threads, then remove every staged file that was not placed
        (blocking: call it off the event loop)."""
        self._writer.shutdown(wait=True)
        self._settler.shutdown(wait=True)
        for part in self.parts:
            if part.staged is not None:
                try:
                    part.staged.discard()
                except OSError as exc:
                    log.warning("cannot remove a staged STOW-RS part: %s", exc)


class StowService:
    """Decides each part's fate and stores the acceptable ones through the ingestor (as
    DIMSE does), all of one request together."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def store(self, parts: list[StowPart], study_uid: str | None) -> list[PartOutcome]:
        """Outcomes in part order; blocking (fsyncs, one catalogue transaction)."""
        outcomes: list[PartOutcome | None] = [self._screen(part, study_uid) for part in parts]
        candidates = [index for index, outcome in enumerate(outcomes) if outcome is None]
        received: list[tuple[StagedFile, InstanceHeader | RejectedInstance]] = []
        for index in candidates:
            part = parts[index]
            assert part.staged is not None and part.header is not None
            received.append((part.staged, part.header))
        try:
            results = self.ingestor.ingest_staged(received, STOW_CALLING_AE)
        except Exception:  # a bug must not lose the answer for the parts refused above
            log.exception("STOW-RS parts could not be ingested")
            results = [IngestOutcome(PROCESSING_FAILURE, "processing failure")] * len(received)
        for index, result in zip(candidates, results, strict=True):
            outcomes[index] = PartOutcome(result.status, result.reason, **parts[index].ids)
        return [outcome for outcome in outcomes if outcome is not None]

    def _screen(self, part: StowPart, study_uid: str | None) -> PartOutcome | None:
        """The outcome of a part refused before the ingestor sees it, or None."""
        if not part.wanted:
            assert part.content_type is not None
            return PartOutcome(CANNOT_UNDERSTAND, f"a part of type {part.content_type.type}")
        ids = part.ids
        if part.oversized:
            reason = f"part larger than the {part.limit}-byte limit"
            log.warning("STOW-RS part refused: %s", reason)
            return PartOutcome(OUT_OF_RESOURCES, reason, **ids)
        # A part without a readable Study UID is the ingestor's to refuse (0xC000 / 0xA900).
        part_study = ids["study_uid"]
        if study_uid is not None and part_study is not None and part_study != study_uid:
            reason = "StudyInstanceUID differs from the one in the request URL"
            log.warning("STOW-RS part refused: %s", reason)
            return PartOutcome(DATASET_DOES_NOT_MATCH_SOP_CLASS, reason, **ids)
        if part.error is not None or part.staged is None or part.header is None:
            if isinstance(part.error, OSError):
                log.error("cannot write a STOW-RS part to the spool: %s", part.error)
                return PartOutcome(OUT_OF_RESOURCES, "cannot write to the spool", **ids)
            log.error("STOW-RS part could not be received: %r", part.error)
            return PartOutcome(PROCESSING_FAILURE, "processing failure", **ids)
        return None


def stow_answer(
    outcomes: list[PartOutcome], studies_url: str, study_uid: str | None
) -> dict[str, Any]:
    """The PS3.18 10.5.3 response, referenced and failed SOP instances, as DICOM JSON.

    Built directly (as pydicom renders it): a data set per part would cost more than the
    rest of answering a large request.
    """
    answer: dict[str, Any] = {}
    referenced, failed = [], []
    for outcome in outcomes:
        item = {
            "00081150": _json_value("UI", outcome.sop_class_uid),
            "00081155": _json_value("UI", outcome.sop_instance_uid),
        }
        if outcome.status == SUCCESS:
            item["00081190"] = _json_value(
                "UR",
                f"{studies_url}/{outcome.study_uid}/series/{outcome.series_uid}"
                f"/instances/{outcome.sop_instance_uid}",
            )
            referenced.append(item)
        else:
            item["00081197"] = _json_value("US", outcome.status)
            failed.append(item)
    stored_studies = {outcome.study_uid for outcome in outcomes if outcome.status == SUCCESS}
    study = study_uid or (stored_studies.pop() if len(stored_studies) == 1 else None)
    if study is not None:
        answer["00081190"] = _json_value("UR", f"{studies_url}/{study}")
    if referenced:
        answer["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    return answer


def _json_value(vr: str, value: str | int | None) -> dict[str, Any]:
    """One DICOM JSON attribute; an empty value has no "Value" (PS3.18 F.2.5)."""
    if value is None or value == "":
        return {"vr": vr}
    return {"vr": vr, "Value": [value]}


def stow_status(outcomes: list[PartOutcome]) -> int:
    """200 when every part is stored, 202 when some are, 409 when none is."""
    stored = sum(outcome.status == SUCCESS for outcome in outcomes)
    if stored == len(outcomes):
        return status.HTTP_200_OK
    return status.HTTP_202_ACCEPTED if stored else status.HTTP_409_CONFLICT
