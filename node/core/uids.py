"""Validation of identifiers that come from the network before they touch a path or a query.

A UID becomes a file name in the spool; an AE title becomes an allow-list key. Both are
checked against PS3.5 here, once, so no other module needs to trust sender input.
"""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default repertoire, no backslash


class InvalidUID(ValueError):
    """A UID that is empty, too long or not digits-and-dots."""


def is_valid_uid(value: object) -> bool:
    """True for a PS3.5 9.1 UID: digits and dots, no empty or zero-padded component, <= 64."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def validate_uid(value: object, name: str = "UID") -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InvalidUID` naming it."""
    if not isinstance(value, str) or not value:
        raise InvalidUID(f"{name} is missing or empty")
    if len(value) > 64:
        raise InvalidUID(f"{name} is longer than 64 characters")
    if not _UID.fullmatch(value):
        raise InvalidUID(f"{name} is not digits and dots")
    return value


def validate_ae_title(value: str) -> str:
    """Return a stripped AE title (1-16 printable characters, no backslash) or raise."""
    stripped = value.strip()
    if not _AE_TITLE.fullmatch(stripped):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return stripped
