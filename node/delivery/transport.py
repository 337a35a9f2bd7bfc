"""What every destination is: something that sends files and says whether it answers.

One class per transport implements :class:`Destination` (:mod:`node.delivery.dimse`,
:mod:`node.delivery.stow`, :mod:`node.delivery.orthanc`); :mod:`node.delivery.destinations`
builds the right one from a destination's configuration. A send succeeds only when the
destination confirms every instance; anything else raises :class:`DispatchError` naming the
destination and the reason (never patient data). Retries are the delivery queue's job, so
a transport makes one attempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit


class DispatchError(RuntimeError):
    """Sending failed; the message says where and why, without patient data."""


class Destination(Protocol):
    """A configured destination, ready to send to."""

    def send(self, paths: list[Path]) -> None:
        """Send every file in ``paths`` or raise :class:`DispatchError`."""
        ...

    def check(self) -> str:
        """Ask whether the destination answers (C-ECHO, an HTTP request) and return what it
        said, or raise :class:`DispatchError`. Sends no data."""
        ...


def check_url(url: str, name: str) -> str:
    """``url`` without its trailing slash, refused unless it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'Argument "url" of destination {name!r} must be an http(s) URL')
    return url.rstrip("/")
