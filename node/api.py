"""The HTTP API (FastAPI): health, and a read view of studies and results.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import __version__
from node.catalogue.db import Catalogue
from node.catalogue.models import PipelineRun, Series, Study
from node.settings import Settings
from node.storage import write_durably


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


def create_api(settings: Settings, catalogue: Catalogue) -> FastAPI:
    token = api_token(settings)
    app = FastAPI(title="Curia Node", version=__version__)

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app.state.catalogue = catalogue
    auth = [Depends(require_token)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

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

    @app.get("/api/v1/runs", dependencies=auth)
    def list_runs(session: SessionDep) -> list[dict[str, Any]]:
        runs = session.scalars(select(PipelineRun).order_by(PipelineRun.id.desc()).limit(200))
        return [_run(run) for run in runs]

    return app


def _series(series: Series) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "instances": series.instance_count,
        "state": series.state.value,
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
