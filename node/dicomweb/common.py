"""What every DICOMweb service shares: media types, levels, identifiers from requests, and
the headers of stored files."""

from __future__ import annotations

import logging
import struct
from pathlib import Path, PurePosixPath
from typing import Literal

from fastapi import HTTPException, status
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.core.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
MAX_QIDO_RESULTS = 1000  # per query; more are paged with limit/offset

Level = Literal["study", "series", "instance"]


def bad_request(message: str) -> HTTPException:
    """A 400 answer with ``message`` as its detail."""
    return HTTPException(status.HTTP_400_BAD_REQUEST, message)


def checked_uid(value: str, name: str) -> str:
    """A UID from a path or a query: validated before it reaches a path or a query."""
    try:
        return validate_uid(value, name)
    except InvalidUID as exc:
        raise bad_request(str(exc)) from None


def inside(root: Path, relative: str) -> Path | None:
    """A catalogue path under its root, or None (logged) for one that would leave it."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        log.error("catalogue path outside its folder ignored: %r", relative)
        return None
    return root / pure


def read_stored(path: Path | None, keywords: list[str] | None) -> Dataset:
    """The header of a stored file (no pixel data); empty if it cannot be read."""
    if path is None:
        return Dataset()
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as exc:
        log.warning("cannot read the header of %s: %s", path.name, exc)
        return Dataset()
