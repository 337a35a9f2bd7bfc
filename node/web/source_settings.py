"""Admin routes for the per-sender settings (by calling AE title): completion signals
trusted from a sender, and how it takes its storage commitment reports.

Reading needs any token; changing them an admin token. Every change is audited with the
values before and after (see :mod:`node.catalogue.source_settings`); the running node
applies it within a second.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict

from node.catalogue.db import Catalogue
from node.catalogue.source_settings import (
    REPORT,
    SIGNALS,
    SourceSettingsError,
    get_source_setting,
    list_source_settings,
    reset_source_setting,
    set_source_setting,
)
from node.core.settings import Settings
from node.web.admin import actor


class SourceSettingsChange(BaseModel):
    """The fields to change; those left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    signals: dict[str, Any] | None = None
    commitment_report: dict[str, Any] | None = None


def _error(exc: SourceSettingsError) -> HTTPException:
    if str(exc).startswith("no "):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    return HTTPException(422, str(exc))


def create_source_settings_router(settings: Settings, catalogue: Catalogue) -> APIRouter:
    router = APIRouter(prefix="/api/v1/source-settings")

    @router.get("")
    def every_source() -> list[dict[str, Any]]:
        """Every sender with a setting in the configuration file or the catalogue."""
        return [s.public() for s in list_source_settings(catalogue, settings)]

    @router.get("/{ae_title}")
    def one_source(ae_title: str) -> dict[str, Any]:
        """One sender's settings, and where each value comes from."""
        try:
            return get_source_setting(catalogue, settings, ae_title).public()
        except SourceSettingsError as exc:
            raise _error(exc) from exc

    @router.patch("/{ae_title}")
    def change(request: Request, ae_title: str, body: SourceSettingsChange) -> dict[str, Any]:
        changes = {
            section: values
            for section, values in ((SIGNALS, body.signals), (REPORT, body.commitment_report))
            if values
        }
        if not changes:
            raise HTTPException(422, "nothing to change")
        try:
            setting = set_source_setting(catalogue, settings, ae_title, changes, actor(request))
        except SourceSettingsError as exc:
            raise _error(exc) from exc
        return setting.public()

    @router.delete("/{ae_title}")
    def reset(request: Request, ae_title: str) -> dict[str, Any]:
        """Forget what was set here: the configuration file's values apply again."""
        try:
            return reset_source_setting(catalogue, settings, ae_title, actor(request)).public()
        except SourceSettingsError as exc:
            raise _error(exc) from exc

    return router
