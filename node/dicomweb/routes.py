"""The DICOMweb routes under ``/dicom-web``: STOW-RS, QIDO-RS and WADO-RS."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from node.catalogue.db import Catalogue
from node.core.settings import Settings
from node.core.status import SUCCESS
from node.dicomweb.common import DICOM_JSON, DICOM_XML, Level, bad_request, checked_uid
from node.dicomweb.finder import Finder
from node.dicomweb.multipart import MediaType, MultipartError
from node.dicomweb.qido import render
from node.dicomweb.query import Query
from node.dicomweb.rendering import dicom_json, json_response, json_to_xml, negotiate
from node.dicomweb.stow import (
    StowLimits,
    StowRefused,
    StowService,
    StowUpload,
    stow_answer,
    stow_status,
)
from node.dicomweb.wado import StoredObject, locate, metadata, retrieve_response
from node.store.disk import DiskGuard
from node.store.ingest import Ingestor
from node.store.spool import spool_for

log = logging.getLogger(__name__)

DEFAULT_MAX_PART_BYTES = 512 * 1024 * 1024  # one instance; larger parts fail with 0xA700
DEFAULT_MEMORY_BUDGET = 64 * 1024 * 1024  # part bytes one request keeps in memory


def declared_length(request: Request, limit: int) -> int:
    """The body's Content-Length (0 when chunked); 413 at once when it is over ``limit``."""
    try:
        length = int(request.headers.get("content-length", "0"))
    except ValueError:
        raise bad_request("the Content-Length is not a number") from None
    if length > limit:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            f"request body of {length} bytes, over the limit of {limit}; nothing was stored",
        )
    return max(length, 0)


def create_dicomweb_router(
    settings: Settings,
    catalogue: Catalogue,
    ingestor: Ingestor | None = None,
    *,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> APIRouter:
    """STOW-RS, QIDO-RS and WADO-RS under ``/dicom-web``.

    Pass the node's own ``ingestor`` so DIMSE and STOW-RS share its locks, and so that
    QIDO-RS and WADO-RS find every instance answered Success before their request (what is
    still waiting in its ingest journal is filed first); without one the router makes its
    own from ``settings`` (for an API-only process).
    """
    if ingestor is None:
        ingestor = Ingestor(
            spool_for(settings),
            catalogue,
            DiskGuard(settings.data_path, settings.dicom.min_free_mb * 1024 * 1024),
            settings.dicom.duplicate_policy,
        )
    stow = StowService(ingestor)
    limits = StowLimits(
        settings.api.stow_max_body_mb << 20, settings.api.stow_max_parts, ingestor.guard
    )
    router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])

    def studies_url(request: Request) -> str:
        return str(request.url_for("dicomweb_search_studies"))

    async def store(request: Request, study: str | None) -> Response:
        if study is not None:
            checked_uid(study, "StudyInstanceUID")
        answer_type = negotiate(request.headers.get("accept"), [DICOM_JSON, DICOM_XML])
        media = MediaType.parse(request.headers.get("content-type", ""))
        kind = media.params.get("type", "application/dicom").lower()
        if media.type != "multipart/related" or kind != "application/dicom":
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                'STOW-RS takes multipart/related; type="application/dicom"',
            )
        boundary = media.params.get("boundary")
        if not boundary:
            raise bad_request("the Content-Type has no boundary parameter")
        upload = StowUpload(ingestor.spool, max_part_bytes, memory_budget, limits)
        try:
            try:
                upload.check_space(declared_length(request, limits.max_body_bytes))
                parts = await upload.receive(request.stream(), boundary)
            except StowRefused as exc:
                log.warning("STOW-RS request refused: %s; nothing stored", exc.reason)
                raise HTTPException(exc.code, f"{exc.reason}; nothing was stored") from None
            except MultipartError as exc:
                raise bad_request(f"malformed multipart body: {exc}; nothing was stored") from exc
            except ClientDisconnect:
                log.warning(
                    "STOW-RS client disconnected before the end of its body; nothing stored"
                )
                raise bad_request("the body ended early; nothing was stored") from None
            outcomes = await run_in_threadpool(stow.store, parts, study)
        finally:
            await run_in_threadpool(upload.close)
        answer = stow_answer(outcomes, studies_url(request), study)
        code = stow_status(outcomes)
        stored = sum(outcome.status == SUCCESS for outcome in outcomes)
        log.info("STOW-RS: %d of %d part(s) stored", stored, len(outcomes))
        if answer_type == DICOM_XML:
            return Response(json_to_xml(answer), code, media_type=DICOM_XML)
        return json_response(answer, code)

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
        negotiate(request.headers.get("accept"), [DICOM_JSON])
        query = Query.parse(level, request.query_params.multi_items())
        ingestor.settle()  # what was answered Success before this request is found
        if study is not None:
            query.restrict("StudyInstanceUID", checked_uid(study, "StudyInstanceUID"))
        if series is not None:
            query.restrict("SeriesInstanceUID", checked_uid(series, "SeriesInstanceUID"))
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
        return json_response(body, headers=headers if warnings else None)

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
        study = checked_uid(study, "StudyInstanceUID")
        series = None if series is None else checked_uid(series, "SeriesInstanceUID")
        sop = None if sop is None else checked_uid(sop, "SOPInstanceUID")
        ingestor.settle()  # what was answered Success before this request is found
        with catalogue.session() as session:
            objects = locate(settings, session, study, series, sop)
        if not objects:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study, series or instance")
        return objects

    def metadata_response(request: Request, objects: list[StoredObject]) -> Response:
        negotiate(request.headers.get("accept"), [DICOM_JSON])
        return json_response(metadata(objects))

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
