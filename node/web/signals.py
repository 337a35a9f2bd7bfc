"""Read views of the senders' completion signals: MPPS steps and storage commitment requests.

What a modality reported and asked, for the API and the dashboard: which steps are open or
ended and which series they list, and which commitment requests are answered. UIDs, AE
titles and counts only; no patient data.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from node.catalogue.models import CommitmentRequest, PerformedStep


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def step_view(step: PerformedStep) -> dict[str, Any]:
    return {
        "sop_instance_uid": step.sop_instance_uid,
        "calling_ae_title": step.calling_ae_title,
        "status": step.status.value,
        "study_instance_uid": step.study_instance_uid,
        "series": {uid: len(uids) for uid, uids in (step.performed_series or {}).items()},
        "created_at": _iso(step.created_at),
        "updated_at": _iso(step.updated_at),
        "ended_at": _iso(step.ended_at),
    }


def commitment_view(row: CommitmentRequest) -> dict[str, Any]:
    return {
        "transaction_uid": row.transaction_uid,
        "calling_ae_title": row.calling_ae_title,
        "instances": len((row.instances or {}).get("items", [])),
        "state": row.state.value,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "outcome": row.outcome,
        "created_at": _iso(row.created_at),
        "answered_at": _iso(row.answered_at),
    }


def create_signals_router(auth: list[Any]) -> APIRouter:
    router = APIRouter(dependencies=auth)

    @router.get("/api/v1/performed-steps")
    def performed_steps(request: Request) -> list[dict[str, Any]]:
        """MPPS steps, newest first."""
        with request.app.state.catalogue.session() as session:
            rows = session.scalars(
                select(PerformedStep).order_by(PerformedStep.id.desc()).limit(200)
            )
            return [step_view(row) for row in rows]

    @router.get("/api/v1/commitments")
    def commitments(request: Request) -> list[dict[str, Any]]:
        """Storage commitment requests, newest first."""
        with request.app.state.catalogue.session() as session:
            rows = session.scalars(
                select(CommitmentRequest).order_by(CommitmentRequest.id.desc()).limit(200)
            )
            return [commitment_view(row) for row in rows]

    return router
