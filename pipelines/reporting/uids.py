"""UIDs of result objects, random or derived from a key.

A report stage that is retried (a worker killed after writing, a redelivered task) must
write the same objects again rather than new ones beside them: given the same key, the
same purpose always gives the same UID, and different keys or purposes give different
ones.
"""

from __future__ import annotations

import json

from pydicom.uid import generate_uid

__all__ = ["derived_uid", "new_uid"]


def derived_uid(key: str, purpose: str) -> str:
    """The UID for ``purpose`` (e.g. "SR series", "SEG instance") of the object ``key`` names.

    Purposes name the kind of object too, so that an SR and a SEG given the same key still
    get different UIDs.

    Key and purpose are hashed as one JSON list, not concatenated, so that ("ab", "c")
    and ("a", "bc") cannot give the same UID.
    """
    return str(generate_uid(entropy_srcs=[json.dumps([key, purpose])]))


def new_uid(key: str | None, purpose: str) -> str:
    """:func:`derived_uid` when there is a key, else a fresh random UID."""
    return derived_uid(key, purpose) if key is not None else str(generate_uid())
