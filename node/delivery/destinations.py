"""Destinations: where results and routed studies go, kept in the catalogue.

A destination is a DIMSE peer (AE title, host, port, optional TLS), a DICOMweb service
(STOW-RS URL and bearer token) or an Orthanc server (REST URL and credentials). Admins
create, edit, remove and check them from the CLI, the API or the dashboard; every change is
audited with the values before and after (secrets masked). Workers read the catalogue on
each delivery, so a change applies without a restart. Each protocol has its transport class
(a :class:`~node.delivery.transport.Destination`), built from the spec by :data:`TRANSPORTS`.

The ``[archive]`` section of the configuration is a destination too, named ``archive``; it
is read-only here (edit the configuration to change it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Peer
from node.core.masking import MASK, mask_url
from node.core.settings import Settings
from node.core.uids import validate_ae_title
from node.delivery.dimse import DimseDestination
from node.delivery.orthanc import OrthancRestDestination
from node.delivery.stow import StowRsDestination
from node.delivery.transport import Destination, DispatchError

DESTINATION = "destination"
CONFIG_ARCHIVE = "archive"
ProtocolName = Literal["dimse", "stow-rs", "orthanc-rest"]
_SECRETS = ("token", "password")
_OPTION_KEYS = (
    "calling_ae_title",
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "token",
    "username",
    "password",
    "results",
    "timeout",
)


class DestinationError(ValueError):
    """A destination that cannot be created, changed or found; the message says why."""


class DestinationSpec(BaseModel):
    """One destination, validated for its protocol (like highdicom's constructors: a bad
    value is refused with the field's name, never stored)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    protocol: ProtocolName = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    calling_ae_title: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    url: str | None = None
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    results: bool = Field(
        True, description="send every result here (routing rules can add more destinations)"
    )
    enabled: bool = True
    timeout: float = Field(30.0, gt=0, le=600)
    source: Literal["catalogue", "config"] = "catalogue"

    @model_validator(mode="after")
    def _check_protocol_fields(self) -> DestinationSpec:
        if self.protocol == "dimse":
            missing = [f for f in ("ae_title", "host", "port") if getattr(self, f) in (None, "")]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)}")
            self.ae_title = validate_ae_title(self.ae_title or "")
            if self.calling_ae_title:
                self.calling_ae_title = validate_ae_title(self.calling_ae_title)
            if bool(self.cert_file) != bool(self.key_file):
                raise ValueError("give both cert_file and key_file for a TLS client certificate")
        else:
            if not self.url or not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"a {self.protocol} destination needs an http(s) url")
            self.url = self.url.rstrip("/")
            if self.protocol == "orthanc-rest" and (self.username is None) != (
                self.password is None
            ):
                raise ValueError("give both username and password, or neither")
        return self

    def public(self) -> dict[str, Any]:
        """A JSON-ready view with secrets masked: what the API, CLI and audit trail show."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in _SECRETS:
            if getattr(self, key) is not None:
                data[key] = MASK
        if self.url:
            data["url"] = mask_url(self.url)
        return data

    def transport(self, default_calling_ae: str) -> Destination:
        """The transport that sends to this destination (:data:`TRANSPORTS`)."""
        return TRANSPORTS[self.protocol](self, default_calling_ae)


def _dimse(spec: DestinationSpec, default_calling_ae: str) -> DimseDestination:
    return DimseDestination(
        name=spec.name,
        ae_title=spec.ae_title or "",
        host=spec.host or "",
        port=spec.port or 104,
        calling_ae_title=spec.calling_ae_title or default_calling_ae,
        timeout=spec.timeout,
        tls=spec.tls,
        ca_file=spec.ca_file,
        cert_file=spec.cert_file,
        key_file=spec.key_file,
    )


def _stow_rs(spec: DestinationSpec, default_calling_ae: str) -> StowRsDestination:
    token = spec.token.get_secret_value() if spec.token else None
    return StowRsDestination(spec.name, spec.url or "", token, timeout=spec.timeout)


def _orthanc_rest(spec: DestinationSpec, default_calling_ae: str) -> OrthancRestDestination:
    password = spec.password.get_secret_value() if spec.password else None
    return OrthancRestDestination(
        spec.name, spec.url or "", spec.username, password, timeout=spec.timeout
    )


# Each protocol a destination can name, and how its transport class is built from the spec
# (every protocol listed: a new transport is one class and one line here).
TRANSPORTS: dict[ProtocolName, Callable[[DestinationSpec, str], Destination]] = {
    "dimse": _dimse,
    "stow-rs": _stow_rs,
    "orthanc-rest": _orthanc_rest,
}


def parse_spec(data: dict[str, Any]) -> DestinationSpec:
    """Validate ``data`` into a spec, turning pydantic's errors into one readable line."""
    try:
        return DestinationSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'destination'}: {err['msg']}"
            for err in exc.errors()
        )
        raise DestinationError(problems) from None


def config_archive(settings: Settings) -> DestinationSpec | None:
    """The configuration's ``[archive]`` as a (read-only) destination."""
    archive = settings.archive
    if not archive.enabled:
        return None
    return DestinationSpec(
        name=CONFIG_ARCHIVE,
        protocol=archive.protocol,
        ae_title=archive.ae_title if archive.protocol == "dimse" else None,
        host=archive.host if archive.protocol == "dimse" else None,
        port=archive.port if archive.protocol == "dimse" else None,
        calling_ae_title=archive.calling_ae_title,
        url=archive.url,
        token=archive.token,
        username=archive.username,
        password=archive.password,
        source="config",
    )


def _from_row(row: Peer) -> DestinationSpec:
    options = dict(row.options or {})
    return DestinationSpec(
        name=row.name,
        protocol=row.protocol,
        ae_title=row.ae_title,
        host=row.host,
        port=row.port,
        url=row.url,
        enabled=row.enabled,
        **{k: v for k, v in options.items() if k in _OPTION_KEYS},
    )


def _to_row(spec: DestinationSpec, row: Peer) -> None:
    row.protocol = spec.protocol
    row.ae_title, row.host, row.port, row.url = spec.ae_title, spec.host, spec.port, spec.url
    row.enabled = spec.enabled
    options: dict[str, Any] = {}
    for key in _OPTION_KEYS:
        value = getattr(spec, key)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            options[key] = value
    row.options = options


def list_destinations(catalogue: Catalogue, settings: Settings) -> list[DestinationSpec]:
    """Every destination: the configured archive first, then the catalogue's, by name."""
    archive = config_archive(settings)
    with catalogue.session() as session:
        rows = session.scalars(
            select(Peer).where(Peer.role == DESTINATION).order_by(Peer.name)
        ).all()
        stored = [_from_row(row) for row in rows]
    return ([archive] if archive else []) + stored


def get_destination(catalogue: Catalogue, settings: Settings, name: str) -> DestinationSpec:
    for spec in list_destinations(catalogue, settings):
        if spec.name == name:
            return spec
    raise DestinationError(f"no destination named {name!r}")


def _audit(actor: str, action: str, name: str, before: Any, after: Any) -> AuditEvent:
    return AuditEvent(
        actor=actor, action=action, target=name, details={"before": before, "after": after}
    )


def add_destination(
    catalogue: Catalogue, settings: Settings, data: dict[str, Any], actor: str
) -> DestinationSpec:
    spec = parse_spec({**data, "source": "catalogue"})
    if spec.name == CONFIG_ARCHIVE and config_archive(settings) is not None:
        raise DestinationError("the name 'archive' belongs to the configured [archive]")
    with catalogue.session() as session:
        if session.scalar(select(Peer).where(Peer.name == spec.name)) is not None:
            raise DestinationError(f"a peer named {spec.name!r} already exists")
        row = Peer(name=spec.name, role=DESTINATION)
        _to_row(spec, row)
        session.add(row)
        session.add(_audit(actor, "destination-added", spec.name, None, spec.public()))
    return spec


def update_destination(
    catalogue: Catalogue, settings: Settings, name: str, changes: dict[str, Any], actor: str
) -> DestinationSpec:
    """Apply ``changes`` (fields to set; ``None`` clears an optional one) and re-validate."""
    if "name" in changes and changes["name"] != name:
        raise DestinationError("a destination cannot be renamed; add a new one instead")
    with catalogue.session() as session:
        row = session.scalar(select(Peer).where(Peer.name == name, Peer.role == DESTINATION))
        if row is None:
            if name == CONFIG_ARCHIVE and config_archive(settings) is not None:
                raise DestinationError("'archive' comes from the configuration file; edit it there")
            raise DestinationError(f"no destination named {name!r}")
        before = _from_row(row)
        merged = {
            **before.model_dump(exclude={"source"}),
            **{k: v for k, v in changes.items() if k != "source"},
        }
        for key in _SECRETS:
            if isinstance(merged.get(key), SecretStr):
                merged[key] = merged[key].get_secret_value()
        spec = parse_spec(merged)
        _to_row(spec, row)
        row.updated_at = datetime.now(UTC)
        session.add(_audit(actor, "destination-changed", name, before.public(), spec.public()))
    return spec


def remove_destination(catalogue: Catalogue, name: str, actor: str) -> None:
    with catalogue.session() as session:
        row = session.scalar(select(Peer).where(Peer.name == name, Peer.role == DESTINATION))
        if row is None:
            raise DestinationError(f"no destination named {name!r}")
        session.add(_audit(actor, "destination-removed", name, _from_row(row).public(), None))
        session.delete(row)


@dataclass(frozen=True)
class CheckOutcome:
    """What checking a destination showed: whether it answered, what, and how fast."""

    name: str
    ok: bool
    detail: str
    elapsed_ms: float


def check_destination(spec: DestinationSpec, default_calling_ae: str) -> CheckOutcome:
    """C-ECHO a DIMSE destination, or make a harmless HTTP request to a web one."""
    started = time.perf_counter()
    try:
        detail = spec.transport(default_calling_ae).check()
        ok = True
    except (DispatchError, ValueError) as exc:
        detail, ok = str(exc), False
    return CheckOutcome(spec.name, ok, detail, round((time.perf_counter() - started) * 1000, 1))


def dispatchers(catalogue: Catalogue, settings: Settings) -> dict[str, Destination]:
    """Enabled destinations by name, each ready to ``send``."""
    return {
        spec.name: spec.transport(settings.dicom.ae_title)
        for spec in list_destinations(catalogue, settings)
        if spec.enabled
    }


def result_destinations(catalogue: Catalogue, settings: Settings) -> list[str]:
    """Names of the enabled destinations that receive every result by default."""
    return [
        spec.name
        for spec in list_destinations(catalogue, settings)
        if spec.enabled and spec.results
    ]
