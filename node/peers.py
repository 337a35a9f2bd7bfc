"""Peers: which senders may associate with the node (the source allow-list).

A source is an AE title plus, optionally, the address it must connect from (an IP, a
network in CIDR form, or a host name). Unknown senders are refused unless the explicit
``dicom.accept_any_source`` switch is on. Changes in the catalogue apply to the next
association without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Peer
from node.uids import validate_ae_title

log = logging.getLogger(__name__)

SOURCE = "source"


class PeerError(ValueError):
    """A peer definition that cannot be accepted; the message says which part and why."""


@dataclass(frozen=True)
class SourcePeer:
    name: str
    ae_title: str
    host: str | None


def _validate_host(host: str | None) -> str | None:
    if host is None or host.strip() in ("", "*"):
        return None
    host = host.strip()
    try:
        ipaddress.ip_network(host, strict=False)
        return host
    except ValueError:
        pass
    if not all(part and part.replace("-", "").isalnum() for part in host.split(".")):
        raise PeerError(f"host {host!r} is not an IP address, a CIDR network or a host name")
    return host


def _host_matches(rule: str | None, address: str) -> bool:
    if rule is None:
        return True
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    try:
        return peer in ipaddress.ip_network(rule, strict=False)
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(rule, None)}
    except OSError:
        return False
    return address in resolved


class SourcePolicy:
    """Decides whether a calling AE title from an address may associate."""

    def __init__(self, catalogue: Catalogue, accept_any: bool, cache_seconds: float = 1.0) -> None:
        self.catalogue = catalogue
        self.accept_any = accept_any
        self.cache_seconds = cache_seconds
        self._cache: tuple[float, list[SourcePeer]] = (0.0, [])
        self._lock = threading.Lock()

    def sources(self) -> list[SourcePeer]:
        with self._lock:
            loaded_at, peers = self._cache
            if time.monotonic() - loaded_at < self.cache_seconds:
                return peers
            peers = list_sources(self.catalogue)
            self._cache = (time.monotonic(), peers)
            return peers

    def allows(self, ae_title: str, address: str) -> bool:
        if self.accept_any:
            return True
        ae_title = ae_title.strip()
        return any(
            peer.ae_title == ae_title and _host_matches(peer.host, address)
            for peer in self.sources()
        )


def list_sources(catalogue: Catalogue) -> list[SourcePeer]:
    with catalogue.session() as session:
        rows = session.scalars(
            select(Peer).where(Peer.role == SOURCE, Peer.enabled.is_(True)).order_by(Peer.name)
        ).all()
        return [SourcePeer(row.name, row.ae_title or "", row.host) for row in rows]


def add_source(
    catalogue: Catalogue, name: str, ae_title: str, host: str | None, actor: str
) -> SourcePeer:
    try:
        ae_title = validate_ae_title(ae_title)
    except ValueError as exc:
        raise PeerError(str(exc)) from exc
    host = _validate_host(host)
    if not name.strip():
        raise PeerError("a source needs a name")
    with catalogue.session() as session:
        if session.scalar(select(Peer).where(Peer.name == name)) is not None:
            raise PeerError(f"a peer named {name!r} already exists")
        session.add(Peer(name=name, role=SOURCE, protocol="dimse", ae_title=ae_title, host=host))
        session.add(
            AuditEvent(
                actor=actor,
                action="source-added",
                target=name,
                details={"after": {"ae_title": ae_title, "host": host}},
            )
        )
    return SourcePeer(name, ae_title, host)


def remove_source(catalogue: Catalogue, name: str, actor: str) -> None:
    with catalogue.session() as session:
        peer = session.scalar(select(Peer).where(Peer.name == name, Peer.role == SOURCE))
        if peer is None:
            raise PeerError(f"no source named {name!r}")
        session.add(
            AuditEvent(
                actor=actor,
                action="source-removed",
                target=name,
                details={"before": {"ae_title": peer.ae_title, "host": peer.host}},
            )
        )
        session.delete(peer)


def update_source(
    catalogue: Catalogue,
    name: str,
    actor: str,
    ae_title: str | None = None,
    host: str | None = None,
) -> SourcePeer:
    """Change a sender's AE title and/or address (``host="*"`` allows any address)."""
    with catalogue.session() as session:
        peer = session.scalar(select(Peer).where(Peer.name == name, Peer.role == SOURCE))
        if peer is None:
            raise PeerError(f"no source named {name!r}")
        before = {"ae_title": peer.ae_title, "host": peer.host}
        if ae_title is not None:
            try:
                peer.ae_title = validate_ae_title(ae_title)
            except ValueError as exc:
                raise PeerError(str(exc)) from exc
        if host is not None:
            peer.host = _validate_host(host)
        after = {"ae_title": peer.ae_title, "host": peer.host}
        session.add(
            AuditEvent(
                actor=actor,
                action="source-changed",
                target=name,
                details={"before": before, "after": after},
            )
        )
        return SourcePeer(name, peer.ae_title or "", peer.host)
