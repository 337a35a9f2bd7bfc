"""API tokens: created by an admin, shown once, kept only as a SHA-256 digest.

Tokens are 256-bit random strings, so a plain SHA-256 is enough to make a stolen catalogue
useless for calling the API (no password-style stretching is needed). Three roles:

* ``admin`` may do everything;
* ``read`` may only read (GET/HEAD): dashboards, QIDO/WADO viewers, monitoring;
* ``store`` may only send instances with STOW-RS (a modality or archive pushing studies).

The bootstrap token (``api.token`` or the generated ``<data>/api-token``) is an admin token
that exists so a fresh install can be used at once; admins then create named tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import ApiToken, AuditEvent

ROLES = ("admin", "read", "store")
TOKEN_PREFIX = "cn_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class TokenError(ValueError):
    """A token request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role (``bootstrap`` for the install token)."""

    name: str
    role: str

    def may(self, method: str, path: str) -> bool:
        """Whether this role allows ``method`` on ``path`` (the path below the app root)."""
        if self.role == "admin":
            return True
        if self.role == "read":
            return method in ("GET", "HEAD")
        if self.role == "store":
            return method == "POST" and path.startswith("/dicom-web/studies")
        return False


@dataclass(frozen=True)
class TokenView:
    name: str
    role: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(catalogue: Catalogue, name: str, role: str, actor: str) -> str:
    """Create a named token and return it; this is the only time it is ever visible."""
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not _NAME.match(name):
        raise TokenError(
            "a token name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with catalogue.session() as session:
        if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
            raise TokenError(f"a token named {name!r} already exists")
        session.add(ApiToken(name=name, role=role, token_hash=digest(token), created_by=actor))
        session.add(
            AuditEvent(actor=actor, action="token-created", target=name, details={"role": role})
        )
    return token


def revoke_token(catalogue: Catalogue, name: str, actor: str) -> None:
    with catalogue.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None:
            raise TokenError(f"no token named {name!r}")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            session.add(AuditEvent(actor=actor, action="token-revoked", target=name))


def list_tokens(catalogue: Catalogue) -> list[TokenView]:
    with catalogue.session() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.name)).all()
        return [
            TokenView(
                r.name, r.role, r.created_by, r.created_at, r.last_used_at, r.revoked_at is not None
            )
            for r in rows
        ]


class TokenVerifier:
    """Maps a presented bearer token to a :class:`Principal`, or ``None``.

    Verified digests are cached for a few seconds so a busy STOW-RS or QIDO client does not
    cost a catalogue query per request; a revocation takes effect within that time.
    """

    def __init__(
        self, catalogue: Catalogue, bootstrap: str | None, cache_seconds: float = 5.0
    ) -> None:
        self.catalogue = catalogue
        self.bootstrap = bootstrap
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal | None:
        if not token:
            return None
        if self.bootstrap is not None and hmac.compare_digest(
            token.encode(), self.bootstrap.encode()
        ):
            return Principal("bootstrap", "admin")
        key = digest(token)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now - cached[0] < self.cache_seconds:
                return cached[1]
        principal = self._lookup(key)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, principal)
        return principal

    def _lookup(self, key: str) -> Principal | None:
        with self.catalogue.session() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_hash == key))
            if row is None or row.revoked_at is not None:
                return None
            row.last_used_at = datetime.now(UTC)
            return Principal(row.name, row.role)
