"""The admin dashboard: static pages served by the node, and the one-call overview it polls.

The pages (``/dashboard/``) hold no data and are served without a token; everything they show
comes from the API with the bearer token the admin types in. ``GET /api/v1/overview`` gives
the studies and queues panels what they need in one query round: studies, series, pipeline
runs, results and deliveries, plus queue depths and counts, and nothing that names a patient.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from node import __version__
from node.catalogue.db import Catalogue
from node.catalogue.models import (
    Delivery,
    DeliveryState,
    PipelineRun,
    Result,
    RunState,
    Series,
    Study,
)
from node.core.settings import Settings

STATIC_DIR = resources.files("node.web") / "static" / "dashboard"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The pages load only their own scripts and styles. Reports are shown in a sandboxed srcdoc
# frame, which inherits this policy, so inline styles (dsr2html writes some) are allowed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-src 'self'; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
STUDY_LIMIT = 100


def _static_files() -> dict[str, Any]:
    """The dashboard's files by name (a fixed set: a request can never name another path)."""
    return {
        entry.name: entry
        for entry in STATIC_DIR.iterdir()
        if entry.is_file() and any(entry.name.endswith(ext) for ext in MEDIA_TYPES)
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they are stored in UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _delivery(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "destination": delivery.destination,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "rule": delivery.rule,
        "created_at": _iso(delivery.created_at),
        "sent_at": _iso(delivery.sent_at),
    }


def _result(result: Result) -> dict[str, Any]:
    return {
        "kind": result.kind,
        "uid": result.sop_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "summary": result.summary,
        "created_at": _iso(result.created_at),
        "deliveries": [_delivery(d) for d in sorted(result.deliveries, key=lambda d: d.id)],
    }


def _run(run: PipelineRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "state": run.state.value,
        "rerun_of": run.rerun_of,
        "backbone": run.backbone,
        "heads": run.heads,
        "error": run.error,
        "created_at": _iso(run.created_at),
        "enqueued_at": _iso(run.enqueued_at),
        "started_at": _iso(run.started_at),
        "inferred_at": _iso(run.inferred_at),
        "finished_at": _iso(run.finished_at),
        "results": [_result(r) for r in sorted(run.results, key=lambda r: r.id)],
    }


def _series(series: Series, forwards: list[Delivery]) -> dict[str, Any]:
    return {
        "uid": series.series_instance_uid,
        "modality": series.modality,
        "description": series.series_description,
        "body_part": series.body_part_examined,
        "calling_ae_title": series.calling_ae_title,
        "instance_count": series.instance_count,
        "state": series.state.value,
        "state_reason": series.state_reason,
        "priority": series.priority,
        "first_received_at": _iso(series.first_received_at),
        "last_received_at": _iso(series.last_received_at),
        "completed_at": _iso(series.completed_at),
        "runs": [_run(run) for run in sorted(series.runs, key=lambda r: r.id)],
        "forwards": [_delivery(d) for d in forwards],
    }


def overview(catalogue: Catalogue) -> dict[str, Any]:
    """Newest studies with their whole pipeline, queue depths and counts (no patient data)."""
    with catalogue.session() as session:
        studies = session.scalars(
            select(Study)
            .order_by(Study.id.desc())
            .limit(STUDY_LIMIT)
            .options(
                selectinload(Study.series)
                .selectinload(Series.runs)
                .selectinload(PipelineRun.results)
                .selectinload(Result.deliveries)
            )
        ).all()
        series_ids = [series.id for study in studies for series in study.series]
        forwards: dict[int | None, list[Delivery]] = {}
        if series_ids:
            for delivery in session.scalars(
                select(Delivery).where(Delivery.series_id.in_(series_ids)).order_by(Delivery.id)
            ):
                forwards.setdefault(delivery.series_id, []).append(delivery)

        def count_by(column: Any) -> dict[str, int]:
            return {
                getattr(state, "value", state): n
                for state, n in session.execute(select(column, func.count()).group_by(column))
            }

        runs = count_by(PipelineRun.state)
        deliveries = count_by(Delivery.state)
        series_states = count_by(Series.state)
        instances = session.scalar(select(func.coalesce(func.sum(Series.instance_count), 0)))
        series_total = session.scalar(select(func.count(Series.id)))
        studies_total = session.scalar(select(func.count(Study.id)))
        return {
            "version": __version__,
            "generated_at": _iso(datetime.now(UTC)),
            "queues": {
                "runs_queued": runs.get(RunState.QUEUED.value, 0),
                "runs_running": runs.get(RunState.RUNNING.value, 0),
                "deliveries_pending": deliveries.get(DeliveryState.PENDING.value, 0),
                "deliveries_failed": deliveries.get(DeliveryState.FAILED.value, 0),
            },
            "counts": {
                "studies": studies_total or 0,
                "series": series_total or 0,
                "instances_received": int(instances or 0),
                "series_by_state": series_states,
                "runs": runs,
                "deliveries": deliveries,
            },
            "studies": [
                {
                    "study_instance_uid": study.study_instance_uid,
                    "created_at": _iso(study.created_at),
                    "series": [
                        _series(series, forwards.get(series.id, []))
                        for series in sorted(study.series, key=lambda s: s.id)
                    ],
                }
                for study in studies
            ],
        }


def create_dashboard_router(
    settings: Settings, catalogue: Catalogue
) -> tuple[APIRouter, APIRouter]:
    """``(pages, api)``: include ``pages`` without the token dependency, ``api`` behind it."""
    pages = APIRouter(include_in_schema=False)
    api = APIRouter(prefix="/api/v1")
    files = _static_files()

    @pages.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("dashboard/", status.HTTP_307_TEMPORARY_REDIRECT)

    @pages.get("/dashboard")
    def dashboard_slash() -> RedirectResponse:
        return RedirectResponse("dashboard/", status.HTTP_307_TEMPORARY_REDIRECT)

    @pages.get("/dashboard/")
    def dashboard_index() -> FileResponse:
        return _serve(files, "index.html")

    @pages.get("/dashboard/{name}")
    def dashboard_file(name: str) -> FileResponse:
        return _serve(files, name)

    @api.get("/overview")
    def get_overview() -> dict[str, Any]:
        """Studies -> series -> runs -> results -> deliveries, queue depths and counts."""
        return overview(catalogue)

    return pages, api


def _serve(files: dict[str, Any], name: str) -> FileResponse:
    entry = files.get(name)
    if entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dashboard file")
    suffix = name[name.rfind(".") :]
    return FileResponse(str(entry), media_type=MEDIA_TYPES[suffix], headers=SECURITY_HEADERS)
