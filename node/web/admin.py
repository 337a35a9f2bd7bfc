"""Admin routes of the HTTP API: senders, destinations, audit trail, caller identity.

Reads need any valid token; changes need an admin token (enforced by the app's token
dependency). Every change is attributed to the calling token's name in the audit trail.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent
from node.core.masking import is_masked
from node.core.rules import RulesError, parse_rules
from node.core.settings import Settings
from node.core.uids import validate_uid
from node.delivery.destinations import (
    DestinationError,
    add_destination,
    check_destination,
    get_destination,
    list_destinations,
    remove_destination,
    update_destination,
)
from node.dimse.allow_list import (
    PeerError,
    add_local_title,
    add_source,
    list_local_titles,
    list_sources,
    remove_local_title,
    remove_source,
    update_source,
)
from node.workflow.routing import active_rules, dry_run, save_rules

JsonObject = Annotated[dict[str, Any], Body()]


class RulesIn(BaseModel):
    document: str = Field(description="the rule set as YAML")


class RulesTestIn(BaseModel):
    study_instance_uid: str
    document: str | None = Field(None, description="rules to try instead of those in force")


class LocalTitleIn(BaseModel):
    ae_title: str


class SourceChange(BaseModel):
    ae_title: str | None = None
    host: str | None = Field(None, description="'*' for any address")


class SourceIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str | None = None


def actor(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    return f"api:{principal.name}" if principal else "api"


def _http_error(exc: ValueError) -> HTTPException:
    message = str(exc)
    if message.startswith("no "):
        return HTTPException(status.HTTP_404_NOT_FOUND, message)
    if any(w in message for w in ("already exists", "belongs to", "comes from", "already answers")):
        return HTTPException(status.HTTP_409_CONFLICT, message)
    return HTTPException(422, message)


def create_admin_router(settings: Settings, catalogue: Catalogue) -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/whoami")
    def whoami(request: Request) -> dict[str, str]:
        """The calling token's name and role (the dashboard shows what it may do)."""
        principal = request.state.principal
        return {"name": principal.name, "role": principal.role}

    @router.get("/sources")
    def sources() -> list[dict[str, Any]]:
        return [asdict(peer) for peer in list_sources(catalogue)]

    @router.post("/sources", status_code=201)
    def create_source(request: Request, body: SourceIn) -> dict[str, Any]:
        try:
            peer = add_source(catalogue, body.name, body.ae_title, body.host, actor(request))
        except PeerError as exc:
            raise _http_error(exc) from exc
        return asdict(peer)

    @router.patch("/sources/{name}")
    def edit_source(request: Request, name: str, body: SourceChange) -> dict[str, Any]:
        try:
            peer = update_source(catalogue, name, actor(request), body.ae_title, body.host)
        except PeerError as exc:
            raise _http_error(exc) from exc
        return asdict(peer)

    @router.delete("/sources/{name}", status_code=204)
    def delete_source(request: Request, name: str) -> None:
        try:
            remove_source(catalogue, name, actor(request))
        except PeerError as exc:
            raise _http_error(exc) from exc

    @router.get("/local-ae-titles")
    def local_titles() -> list[dict[str, Any]]:
        """The AE titles the node answers to: the configured one, then those added."""
        dicom = settings.dicom
        return [{"ae_title": dicom.ae_title, "port": dicom.port, "source": "config"}] + [
            {"ae_title": title, "port": dicom.port, "source": "catalogue"}
            for title in list_local_titles(catalogue)
        ]

    @router.post("/local-ae-titles", status_code=201)
    def create_local_title(request: Request, body: LocalTitleIn) -> dict[str, Any]:
        try:
            title = add_local_title(catalogue, body.ae_title, actor(request))
        except PeerError as exc:
            raise _http_error(exc) from exc
        return {"ae_title": title, "port": settings.dicom.port, "source": "catalogue"}

    @router.delete("/local-ae-titles/{ae_title}", status_code=204)
    def delete_local_title(request: Request, ae_title: str) -> None:
        try:
            remove_local_title(catalogue, ae_title, actor(request))
        except PeerError as exc:
            raise _http_error(exc) from exc

    @router.get("/destinations")
    def destinations() -> list[dict[str, Any]]:
        return [spec.public() for spec in list_destinations(catalogue, settings)]

    @router.get("/destinations/{name}")
    def destination(name: str) -> dict[str, Any]:
        try:
            return get_destination(catalogue, settings, name).public()
        except DestinationError as exc:
            raise _http_error(exc) from exc

    @router.post("/destinations", status_code=201)
    def create_destination(request: Request, body: JsonObject) -> dict[str, Any]:
        """Add a destination: ``{"name", "protocol": "dimse"|"stow-rs"|"orthanc-rest", ...}``."""
        try:
            return add_destination(catalogue, settings, body, actor(request)).public()
        except DestinationError as exc:
            raise _http_error(exc) from exc

    @router.patch("/destinations/{name}")
    def edit_destination(request: Request, name: str, body: JsonObject) -> dict[str, Any]:
        """Change the given fields; masked secrets sent back unchanged are ignored."""
        changes = {k: v for k, v in body.items() if not is_masked(v)}
        try:
            return update_destination(catalogue, settings, name, changes, actor(request)).public()
        except DestinationError as exc:
            raise _http_error(exc) from exc

    @router.delete("/destinations/{name}", status_code=204)
    def delete_destination(request: Request, name: str) -> None:
        try:
            remove_destination(catalogue, name, actor(request))
        except DestinationError as exc:
            raise _http_error(exc) from exc

    @router.post("/destinations/{name}/test")
    def test_destination(name: str) -> dict[str, Any]:
        """C-ECHO or an HTTP check; 200 with ``ok: false`` when the destination does not answer."""
        try:
            spec = get_destination(catalogue, settings, name)
        except DestinationError as exc:
            raise _http_error(exc) from exc
        return asdict(check_destination(spec, settings.dicom.ae_title))

    @router.get("/rules")
    def rules() -> dict[str, Any]:
        """The routing rules in force: the YAML as written, its version and author."""
        active = active_rules(catalogue)
        return {
            "id": active.id,
            "document": active.document,
            "created_by": active.created_by,
            "created_at": active.created_at,
        }

    @router.put("/rules")
    def put_rules(request: Request, body: RulesIn) -> dict[str, Any]:
        """Validate and put a rule set in force; 422 with the reason if it is not valid."""
        known = [d.name for d in list_destinations(catalogue, settings)]
        try:
            active = save_rules(catalogue, body.document, actor(request), known)
        except RulesError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {
            "id": active.id,
            "document": active.document,
            "created_by": active.created_by,
            "created_at": active.created_at,
        }

    @router.post("/rules/test")
    def test_rules(body: RulesTestIn) -> dict[str, Any]:
        """Dry-run (the given or the active) rules on a stored study; changes nothing."""
        try:
            study_uid = validate_uid(body.study_instance_uid, "StudyInstanceUID")
            known = [d.name for d in list_destinations(catalogue, settings)]
            rules = parse_rules(body.document, known) if body.document is not None else None
        except (RulesError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
        try:
            return {"series": dry_run(catalogue, settings.spool_dir, study_uid, rules)}
        except LookupError as exc:
            raise HTTPException(404, str(exc).strip("'\"")) from exc

    @router.get("/audit")
    def audit(limit: int = 100) -> list[dict[str, Any]]:
        """Configuration changes, newest first: who, when, what, before and after."""
        with catalogue.session() as session:
            rows = session.scalars(
                select(AuditEvent).order_by(AuditEvent.id.desc()).limit(min(max(limit, 1), 1000))
            ).all()
            return [
                {
                    "at": row.at.isoformat(),
                    "actor": row.actor,
                    "action": row.action,
                    "target": row.target,
                    "details": row.details,
                }
                for row in rows
            ]

    return router
