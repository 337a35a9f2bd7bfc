"""WADO-RS: stored instances as multipart/related (as stored, never transcoded), and their
headers as DICOM JSON."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, status
from fastapi.responses import StreamingResponse
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.models import Instance, Series, Study
from node.core.settings import Settings
from node.dicomweb.common import inside, read_stored
from node.dicomweb.finder import Finder
from node.dicomweb.multipart import parse_accept, write_parts
from node.dicomweb.query import Query
from node.dicomweb.rendering import dicom_json

_FILE_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    path: Path
    transfer_syntax_uid: str | None


def locate(
    settings: Settings, session: Session, study: str, series: str | None, sop: str | None
) -> list[StoredObject]:
    """The files of a study, a series or one instance (received first, then results)."""
    stmt = (
        select(Instance.path, Instance.transfer_syntax_uid)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.study_instance_uid == study)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    query = Query("instance")
    query.restrict("StudyInstanceUID", study)
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == series)
        query.restrict("SeriesInstanceUID", series)
    if sop is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop)
        query.restrict("SOPInstanceUID", sop)
    found = []
    for relative, tsuid in session.execute(stmt):
        path = inside(settings.spool_dir, relative)
        if path is not None:
            found.append(StoredObject(path, tsuid))
    found += [StoredObject(r.path, None) for r in Finder(settings, session).results(query)]
    return found


def _acceptable_syntaxes(accept: str | None) -> set[str]:
    """Transfer syntaxes the client accepts for application/dicom ("*" = as stored).

    Without a transfer-syntax parameter the node answers as stored: it does not transcode.
    """
    syntaxes: set[str] = set()
    for media in parse_accept(accept):
        if media.type in ("*/*", "multipart/*"):
            syntaxes.add("*")
        elif media.type in ("multipart/related", "application/dicom"):
            kind = media.params.get("type", "application/dicom").lower()
            if media.type == "application/dicom" or kind == "application/dicom":
                syntaxes.add(media.params.get("transfer-syntax", "*"))
    if not syntaxes:
        raise HTTPException(
            status.HTTP_406_NOT_ACCEPTABLE,
            'can answer only multipart/related; type="application/dicom"',
        )
    return syntaxes


def _transfer_syntax(obj: StoredObject) -> str:
    if obj.transfer_syntax_uid:
        return obj.transfer_syntax_uid
    return str(read_file_meta_info(obj.path).TransferSyntaxUID)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(_FILE_CHUNK):
            yield chunk


def retrieve_response(objects: list[StoredObject], accept: str | None) -> StreamingResponse:
    """Stored bytes as multipart/related, streamed file by file."""
    syntaxes = _acceptable_syntaxes(accept)
    typed = [(obj, _transfer_syntax(obj)) for obj in objects]
    if "*" not in syntaxes:
        refused = {tsuid for _, tsuid in typed if tsuid not in syntaxes}
        if refused:
            raise HTTPException(
                status.HTTP_406_NOT_ACCEPTABLE,
                f"stored as {', '.join(sorted(refused))}; the node does not transcode",
            )
    boundary = uuid.uuid4().hex
    body = write_parts(
        boundary,
        ((f"application/dicom; transfer-syntax={ts}", _file_chunks(obj.path)) for obj, ts in typed),
    )
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body, media_type=media_type)


def metadata(objects: list[StoredObject]) -> list[dict[str, Any]]:
    """DICOM JSON of each header; pixel data is left out (no bulk data service)."""
    return [dicom_json(read_stored(obj.path, None)) for obj in objects]
