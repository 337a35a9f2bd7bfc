"""DICOMweb (PS3.18): STOW-RS into the node, QIDO-RS and WADO-RS over what it holds.

STOW-RS parts take the C-STORE path (:mod:`node.store.ingest`): durable, validated, catalogued,
duplicates handled, so a series received over HTTP completes and is analysed like one
received over DIMSE. The request body is streamed and every part staged before the first
one is catalogued, so a truncated upload stores nothing.

Queries and retrieval also cover the node's own results (the ``results`` table): they are
listed with the study they were made for, but not catalogued as received instances,
because a received series is what the completion watcher analyses.

Modules: :mod:`~node.dicomweb.stow` (STOW-RS), :mod:`~node.dicomweb.query` and
:mod:`~node.dicomweb.finder` (QIDO-RS matching), :mod:`~node.dicomweb.qido` (QIDO-RS
answers), :mod:`~node.dicomweb.wado` (WADO-RS), :mod:`~node.dicomweb.rendering` (DICOM JSON
and XML), :mod:`~node.dicomweb.routes` (the routes).
"""

from node.dicomweb.common import DICOM_JSON, DICOM_XML, MAX_QIDO_RESULTS, Level
from node.dicomweb.finder import Finder, ResultRow, Row
from node.dicomweb.qido import render
from node.dicomweb.query import Query
from node.dicomweb.rendering import dicom_json, json_to_xml
from node.dicomweb.routes import (
    DEFAULT_MAX_PART_BYTES,
    DEFAULT_MEMORY_BUDGET,
    create_dicomweb_router,
)
from node.dicomweb.stow import (
    PROCESSING_FAILURE,
    STOW_CALLING_AE,
    PartOutcome,
    StowService,
    StowUpload,
    stow_answer,
    stow_status,
)
from node.dicomweb.wado import StoredObject, locate, metadata, retrieve_response

__all__ = [
    "DEFAULT_MAX_PART_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "DICOM_JSON",
    "DICOM_XML",
    "MAX_QIDO_RESULTS",
    "PROCESSING_FAILURE",
    "STOW_CALLING_AE",
    "Finder",
    "Level",
    "PartOutcome",
    "Query",
    "ResultRow",
    "Row",
    "StoredObject",
    "StowService",
    "StowUpload",
    "create_dicomweb_router",
    "dicom_json",
    "json_to_xml",
    "locate",
    "metadata",
    "render",
    "retrieve_response",
    "stow_answer",
    "stow_status",
]
