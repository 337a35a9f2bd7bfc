"""Peers: which senders may associate with the node (the source allow-list), and the
node's own AE titles.

A source is an AE title plus, optionally, the address it must connect from (an IP, a
network in CIDR form, or a host name). Unknown senders are refused unless the explicit
``dicom.accept_any_source`` switch is on. The node answers to ``dicom.ae_title`` and to any
local AE title added in the catalogue (e.g. one per department, so routing rules can tell
them apart). Changes in the catalogue apply to the next association without a restart.
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
from node.core.uids import validate_ae_title

log = logging.getLogger(__name__)

SOURCE = "source"
LOCAL = "local"


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
    """Decides whether a calling AE title from an address may associate, and whether the
    called AE title is one of the node's."""

    def __init__(
        self,
        catalogue: Catalogue,
        accept_any: bool,
        cache_seconds: float = 1.0,
        ae_title: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.accept_any = accept_any
        self.cache_seconds = cache_seconds
        self.ae_title = ae_title
        self._cache: tuple[float, list[SourcePeer], set[str]] = (0.0, [], set())
        self._lock = threading.Lock()

    def _load(self) -> tuple[list[SourcePeer], set[str]]:
        with self._lock:
            loaded_at, peers, local = self._cache
            if time.monotonic() - loaded_at < self.cache_seconds:
                return peers, local
            peers = list_sources(self.catalogue)
            local = set(list_local_titles(self.catalogue))
            self._cache = (time.monotonic(), peers, local)
            return peers, local

    def sources(self) -> list[SourcePeer]:
        return self._load()[0]

    def answers_to(self, called_ae_title: str) -> bool:
        """Whether ``called_ae_title`` is the configured AE title or a local one."""
        called = called_ae_title.strip()
        if self.ae_title is not None and called == self.ae_title:
            return True
        return called in self._load()[1]

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


def list_local_titles(catalogue: Catalogue) -> list[str]:
    """The node's AE titles added in the catalogue (the configured one is not listed)."""
    with catalogue.session() as session:
        rows = session.scalars(
            select(Peer).where(Peer.role == LOCAL, Peer.enabled.is_(True)).order_by(Peer.name)
        ).all()
        return [row.ae_title or "" for row in rows]


def add_local_title(catalogue: Catalogue, ae_title: str, actor: str) -> str:
    """Answer to one more called AE title (its catalogue name is ``local:<title>``)."""
    try:
        ae_title = validate_ae_title(ae_title)
    except ValueError as exc:
        raise PeerError(str(exc)) from exc
    name = f"local:{ae_title}"
    with catalogue.session() as session:
        if session.scalar(select(Peer).where(Peer.name == name)) is not None:
            raise PeerError(f"the node already answers to {ae_title!r}")
        session.add(Peer(name=name, role=LOCAL, protocol="dimse", ae_title=ae_title))
        session.add(
            AuditEvent(
                actor=actor,
                action="local-ae-added",
                target=ae_title,
                details={"after": {"ae_title": ae_title}},
            )
        )
    return ae_title


def remove_local_title(catalogue: Catalogue, ae_title: str, actor: str) -> None:
    with catalogue.session() as session:
        peer = session.scalar(
            select(Peer).where(Peer.name == f"local:{ae_title.strip()}", Peer.role == LOCAL)
        )
        if peer is None:
            raise PeerError(f"no local AE title {ae_title!r}")
        session.add(
            AuditEvent(
                actor=actor,
                action="local-ae-removed",
                target=peer.ae_title,
                details={"before": {"ae_title": peer.ae_title}},
            )
        )
        session.delete(peer)
