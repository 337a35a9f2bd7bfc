"""Per-sender settings, by calling AE title: the completion signals trusted from a sender,
and how a storage commitment requester takes its reports.

The configuration file gives the base values (``completion.sources.<AE>``,
``dicom.commitment.report_to.<AE>``); admins change them in the catalogue from the CLI
(``curia-node ae settings``) or the API (``/api/v1/source-settings``), each change audited
with the values before and after, like the allow-list and the destinations. A value set in
the catalogue wins over the file's, field by field; ``reset`` goes back to the file. The
node reads them through a short cache (:class:`SourceSettingsView`), so a change applies
without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Peer
from node.core.settings import ReportAddress, Settings, SourceSignals
from node.core.uids import validate_ae_title

log = logging.getLogger(__name__)

ROLE = "source-settings"
SIGNALS, REPORT = "signals", "commitment_report"
CONFIGURATION, CATALOGUE, DEFAULT = "configuration", "catalogue", "default"


class SourceSettingsError(ValueError):
    """A per-sender setting that cannot be accepted; the message names the field."""


@dataclass(frozen=True)
class SourceSetting:
    """One sender's effective settings, and where each value comes from."""

    ae_title: str
    signals: SourceSignals
    report: ReportAddress | None
    origin: dict[str, str]  # "signals.<field>" / "commitment_report.<field>" -> origin

    def public(self) -> dict[str, Any]:
        return {
            "ae_title": self.ae_title,
            SIGNALS: self.signals.model_dump(),
            REPORT: None if self.report is None else self.report.model_dump(),
            "origin": dict(sorted(self.origin.items())),
        }


def _name(ae_title: str) -> str:
    return f"settings:{ae_title}"


def _title(ae_title: str) -> str:
    try:
        return validate_ae_title(ae_title)
    except ValueError as exc:
        raise SourceSettingsError(str(exc)) from exc


def _overrides(catalogue: Catalogue) -> dict[str, dict[str, Any]]:
    with catalogue.session() as session:
        rows = session.scalars(select(Peer).where(Peer.role == ROLE)).all()
        return {row.ae_title or "": dict(row.options or {}) for row in rows}


def _merge(settings: Settings, ae_title: str, override: dict[str, Any]) -> SourceSetting:
    origin: dict[str, str] = {}
    base = settings.completion.sources.get(ae_title)
    changed = dict(override.get(SIGNALS) or {})
    values: dict[str, Any] = {}
    for name in SourceSignals.model_fields:
        if name in changed:
            values[name], origin[f"{SIGNALS}.{name}"] = changed[name], CATALOGUE
        elif base is not None and name in base.model_fields_set:
            values[name], origin[f"{SIGNALS}.{name}"] = getattr(base, name), CONFIGURATION
        else:
            origin[f"{SIGNALS}.{name}"] = DEFAULT
    unknown = sorted(set(changed) - set(SourceSignals.model_fields))
    if unknown:
        raise SourceSettingsError(f"{SIGNALS}: unknown setting(s) {', '.join(unknown)}")
    try:
        signals = SourceSignals(**values)
    except ValidationError as exc:
        raise SourceSettingsError(f"{SIGNALS}: {_errors(exc)}") from None
    report_base = settings.dicom.commitment.report_to.get(ae_title)
    report_changed = override.get(REPORT)
    report = None
    if report_base is not None or report_changed:
        fields = report_base.model_dump(exclude_unset=True) if report_base else {}
        for name in fields:
            origin[f"{REPORT}.{name}"] = CONFIGURATION
        for name, value in (report_changed or {}).items():
            fields[name], origin[f"{REPORT}.{name}"] = value, CATALOGUE
        try:
            report = ReportAddress(**fields)
        except ValidationError as exc:
            raise SourceSettingsError(f"{REPORT}: {_errors(exc)}") from None
    return SourceSetting(ae_title, signals, report, origin)


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}"
        for error in exc.errors()
    )


def configured_titles(settings: Settings) -> set[str]:
    """The senders the configuration file has per-sender settings for."""
    return set(settings.completion.sources) | set(settings.dicom.commitment.report_to)


def list_source_settings(catalogue: Catalogue, settings: Settings) -> list[SourceSetting]:
    """Every sender with a setting in the configuration file or the catalogue."""
    overrides = _overrides(catalogue)
    titles = configured_titles(settings) | set(overrides)
    return [_merge(settings, t, overrides.get(t, {})) for t in sorted(titles)]


def get_source_setting(catalogue: Catalogue, settings: Settings, ae_title: str) -> SourceSetting:
    """One sender's effective settings (the defaults for a sender nobody configured)."""
    ae_title = _title(ae_title)
    return _merge(settings, ae_title, _overrides(catalogue).get(ae_title, {}))


def set_source_setting(
    catalogue: Catalogue,
    settings: Settings,
    ae_title: str,
    changes: Mapping[str, Mapping[str, Any]],
    actor: str,
) -> SourceSetting:
    """Change some of a sender's settings (``{"signals": {...}, "commitment_report": {...}}``,
    the fields to change only); checked as a whole before anything is stored."""
    ae_title = _title(ae_title)
    unknown = sorted(set(changes) - {SIGNALS, REPORT})
    if unknown:
        raise SourceSettingsError(
            f"unknown section(s) {', '.join(unknown)}: use {SIGNALS} or {REPORT}"
        )
    with catalogue.session() as session:
        row = session.scalar(select(Peer).where(Peer.name == _name(ae_title)))
        if row is not None and row.role != ROLE:
            raise SourceSettingsError(f"a {row.role} is named {_name(ae_title)!r}: rename it first")
        before = dict(row.options or {}) if row is not None else {}
        after = {key: dict(value) for key, value in before.items()}
        for section, values in changes.items():
            after[section] = {**after.get(section, {}), **dict(values)}
        previous = _merge(settings, ae_title, before)
        merged = _merge(settings, ae_title, after)  # refused here, before it is stored
        if row is None:
            row = Peer(name=_name(ae_title), role=ROLE, protocol="dimse", ae_title=ae_title)
            session.add(row)
        row.options = after
        session.add(
            AuditEvent(
                actor=actor,
                action="source-settings-changed",
                target=ae_title,
                details={"before": previous.public(), "after": merged.public()},
            )
        )
    return merged


def reset_source_setting(
    catalogue: Catalogue, settings: Settings, ae_title: str, actor: str
) -> SourceSetting:
    """Forget what the catalogue says for a sender: the configuration file's values apply."""
    ae_title = _title(ae_title)
    with catalogue.session() as session:
        row = session.scalar(select(Peer).where(Peer.name == _name(ae_title), Peer.role == ROLE))
        if row is None:
            raise SourceSettingsError(f"no settings for {ae_title!r} in the catalogue")
        previous = _merge(settings, ae_title, dict(row.options or {}))
        session.delete(row)
        merged = _merge(settings, ae_title, {})
        session.add(
            AuditEvent(
                actor=actor,
                action="source-settings-reset",
                target=ae_title,
                details={"before": previous.public(), "after": merged.public()},
            )
        )
    return merged


class SourceSettingsView:
    """The effective settings as the running node reads them: re-read from the catalogue
    at most every ``cache_seconds``. A catalogue that cannot be read keeps the last values
    (at start, the configuration file's)."""

    def __init__(self, catalogue: Catalogue, settings: Settings, cache_seconds: float = 1.0):
        self.catalogue = catalogue
        self.settings = settings
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._current: dict[str, SourceSetting] = {
            title: _merge(settings, title, {}) for title in configured_titles(settings)
        }
        self.signals: Mapping[str, SourceSignals] = _Live(self, lambda s: s.signals)
        self.reports: Mapping[str, ReportAddress] = _Live(self, lambda s: s.report)

    def current(self) -> dict[str, SourceSetting]:
        with self._lock:
            if time.monotonic() - self._loaded_at >= self.cache_seconds:
                self._loaded_at = time.monotonic()
                try:
                    loaded = list_source_settings(self.catalogue, self.settings)
                except Exception as exc:  # the last values stay
                    log.warning("cannot read the per-sender settings: %s", exc)
                    return self._current
                self._current = {s.ae_title: s for s in loaded}
            return self._current


class _Live(Mapping[str, Any]):
    """A read-only mapping AE title -> one part of its settings, always current."""

    def __init__(self, view: SourceSettingsView, part: Any) -> None:
        self._view = view
        self._part = part

    def _items(self) -> dict[str, Any]:
        found = ((title, self._part(s)) for title, s in self._view.current().items())
        return {title: value for title, value in found if value is not None}

    def __getitem__(self, key: str) -> Any:  # one sender's part, not every sender's
        value = self._part(self._view.current()[key])
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())
