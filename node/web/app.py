"""The HTTP API (FastAPI): health, and a read view of studies and results.

Every route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <token>``; what a
token may do depends on its role (:mod:`node.web.tokens`): 401 without a valid token, 403 when
its role does not allow the request.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydicom import dcmread
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from node import __version__
from node.catalogue.db import Catalogue
from node.catalogue.models import DeliveryState, PipelineRun, Series, Study
from node.core.settings import Settings
from node.dicomweb import create_dicomweb_router
from node.store.ingest import Ingestor
from node.store.spool import write_durably
from node.web.admin import actor, create_admin_router
from node.web.dashboard import create_dashboard_router
from node.web.headers import DOCS_PATH, SecurityHeaders
from node.web.metrics import CatalogueCollector, GpuCollector
from node.web.results import (
    SR_SOP_CLASSES,
    ResultsError,
    list_deliveries,
    render_html,
    requeue,
    result_files,
)
from node.web.signals import create_signals_router
from node.web.source_settings import create_source_settings_router
from node.web.tokens import Principal, TokenVerifier


def api_token(settings: Settings) -> str:
    """The admin token: configured, or generated once into ``<data>/api-token`` (0600)."""
    if settings.api.token is not None:
        return settings.api.token.get_secret_value()
    path = settings.data_path / "api-token"
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    write_durably(path, token.encode(), mode=0o600)
    return token


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.catalogue.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def create_api(
    settings: Settings,
    catalogue: Catalogue,
    enqueue_dispatch: Callable[[int], object] | None = None,
    ingestor: Ingestor | None = None,
) -> FastAPI:
    """The API app; ``enqueue_dispatch`` sends a delivery to the dispatch queue."""
    verifier = TokenVerifier(catalogue, api_token(settings))
    # The API description is served below, behind the token (or not at all).
    app = FastAPI(
        title="Curia Node", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(SecurityHeaders)

    def require_token(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        scheme, _, given = (authorization or "").partition(" ")
        principal = verifier.verify(given.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if not principal.may(request.method, path):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"a {principal.role} token may not {request.method} this resource",
            )
        request.state.principal = principal
        return principal

    app.state.catalogue = catalogue
    auth = [Depends(require_token)]
    # DICOMweb: STOW-RS, QIDO-RS, WADO-RS under /dicom-web, behind the same token; STOW-RS
    # shares the listener's ingestor (one storage path, one set of locks).
    app.include_router(
        create_dicomweb_router(
            settings,
            catalogue,
            ingestor,
            max_part_bytes=settings.api.stow_max_part_mb << 20,
            memory_budget=settings.api.stow_memory_mb << 20,
        ),
        dependencies=auth,
    )

    app.include_router(create_admin_router(settings, catalogue), dependencies=auth)
    app.include_router(create_source_settings_router(settings, catalogue), dependencies=auth)
    app.include_router(create_signals_router(auth))
    dashboard_pages, dashboard_api = create_dashboard_router(settings, catalogue)
    app.include_router(dashboard_pages)  # static pages: no data, no token
    app.include_router(dashboard_api, dependencies=auth)

    scrape_registry = CollectorRegistry()
    scrape_registry.register(CatalogueCollector(catalogue))
    scrape_registry.register(GpuCollector())

    if settings.api.docs:

        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        def openapi() -> JSONResponse:
            """The OpenAPI description, for a client that holds a token."""
            return JSONResponse(app.openapi())

        @app.get(DOCS_PATH, dependencies=auth, include_in_schema=False)
        def docs() -> HTMLResponse:
            """Swagger UI over the description above (a client sending the token)."""
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Curia Node API")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: the catalogue answers (the node cannot accept anything without it)."""
        try:
            with catalogue.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", dependencies=auth)
    def metrics() -> Response:
        """Prometheus metrics (scrape with the bearer token)."""
        body = generate_latest(REGISTRY) + generate_latest(scrape_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/studies", dependencies=auth)
    def list_studies(session: SessionDep) -> list[dict[str, Any]]:
        studies = session.scalars(select(Study).order_by(Study.id.desc()).limit(200)).all()
        return [
            {
                "study_instance_uid": study.study_instance_uid,
                "series": [_series(series) for series in study.series],
            }
            for study in studies
        ]

    @app.get("/api/v1/deliveries", dependencies=auth)
    def deliveries(state: DeliveryState | None = None) -> list[dict[str, Any]]:
        """Deliveries, newest first; ``?state=failed`` is the dead-letter list."""
        views = list_deliveries(catalogue, state.value if state else None)
        return [asdict(view) for view in views]

    @app.post("/api/v1/deliveries/{delivery_id}/retry", dependencies=auth, status_code=202)
    def retry_delivery(request: Request, delivery_id: int) -> dict[str, Any]:
        if enqueue_dispatch is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no pipeline connected")
        try:
            requeue(catalogue, delivery_id, actor(request), enqueue_dispatch)
        except ResultsError as exc:
            code = 404 if "no delivery" in str(exc) else status.HTTP_409_CONFLICT
            raise HTTPException(code, str(exc)) from exc
        return {"id": delivery_id, "state": "pending"}

    @app.get("/api/v1/studies/{study_uid}/report", dependencies=auth, response_class=HTMLResponse)
    def study_report(study_uid: str) -> str:
        """The study's Structured Reports rendered as HTML."""
        try:
            files = result_files(catalogue, settings.results_dir, study_uid)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
        reports = [f for f in files if _is_sr(f)]
        if not reports:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no report for this study")
        return "\n<hr>\n".join(render_html(path) for path in reports)

    @app.get("/api/v1/runs", dependencies=auth)
    def list_runs(session: SessionDep) -> list[dict[str, Any]]:
        runs = session.scalars(select(PipelineRun).order_by(PipelineRun.id.desc()).limit(200))
        return [_run(run) for run in runs]

    return app


def _is_sr(path: Path) -> bool:
    return str(dcmread(path, stop_before_pixels=True).SOPClassUID) in SR_SOP_CLASSES


def _series(series: Series) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "instances": series.instance_count,
        "state": series.state.value,
        "state_reason": series.state_reason,
        "completed_by": series.completed_by,
        "waiting_for": (series.routing or {}).get("waiting_for"),
        "runs": [_run(run) for run in series.runs],
    }


def _run(run: PipelineRun) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": run.id,
        "state": run.state.value,
        "backbone": run.backbone,
        "heads": run.heads,
        "error": run.error,
        "created_at": iso(run.created_at),
        "finished_at": iso(run.finished_at),
        "results": [
            {
                "kind": result.kind,
                "sop_instance_uid": result.sop_instance_uid,
                "summary": result.summary,
                "deliveries": [
                    {"destination": d.destination, "state": d.state.value, "attempts": d.attempts}
                    for d in result.deliveries
                ],
            }
            for result in run.results
        ],
    }
