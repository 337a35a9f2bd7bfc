"""The DIMSE listener: C-ECHO and C-STORE SCP bound to the ingest path.

Handlers are plain functions bound to pynetdicom events; storage and cataloguing live in
:mod:`node.ingest` so they can be tested without a network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node.ingest import CANNOT_UNDERSTAND, Ingestor
from node.peers import SourcePolicy
from node.settings import DicomSettings

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = [
    CTImageStorage,
    MRImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
    SecondaryCaptureImageStorage,
]


def handle_echo(event: Event) -> int:
    return 0x0000


def make_store_handler(ingestor: Ingestor) -> Callable[[Event], int]:
    def handle_store(event: Event) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("cannot encode the received data set from %s", calling)
            return CANNOT_UNDERSTAND
        outcome = ingestor.ingest(
            data, calling, expected_sop_uid=event.request.AffectedSOPInstanceUID
        )
        stats = event.assoc.__dict__.setdefault("_curia_stats", {"ok": 0, "failed": 0})
        stats["ok" if outcome.status == 0 else "failed"] += 1
        return outcome.status

    return handle_store


def handle_accepted(event: Event) -> None:
    event.assoc.__dict__["_curia_started"] = time.monotonic()
    log.info(
        "association accepted from %s (%s:%s)",
        event.assoc.requestor.ae_title,
        event.assoc.requestor.address,
        event.assoc.requestor.port,
    )


def handle_closed(event: Event) -> None:
    stats = event.assoc.__dict__.get("_curia_stats", {"ok": 0, "failed": 0})
    started = event.assoc.__dict__.get("_curia_started")
    elapsed = time.monotonic() - started if started else 0.0
    log.info(
        "association from %s closed: %d stored, %d failed, %.2f s",
        event.assoc.requestor.ae_title,
        stats["ok"],
        stats["failed"],
        elapsed,
    )


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)


def make_request_handler(policy: SourcePolicy) -> Callable[[Event], None]:
    """Refuse senders that are not in the allow-list, before any negotiation."""

    def handle_requested(event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title if requestor.primitive else ""
        if policy.allows(calling, requestor.address):
            return
        log.warning(
            "refused association from AE %r at %s: not in the source allow-list "
            "(add it with `curia-node ae source add`)",
            calling,
            requestor.address,
        )
        event.assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()

    return handle_requested


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


def start_listener(
    settings: DicomSettings, ingestor: Ingestor, policy: SourcePolicy
) -> ThreadedAssociationServer:
    """Start the C-ECHO/C-STORE SCP in background threads and return its server."""
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, make_request_handler(policy)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, make_store_handler(ingestor)),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_RELEASED, handle_closed),
        (evt.EVT_ABORTED, handle_closed),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    log.info("DICOM listener %s on %s:%d", settings.ae_title, settings.host, settings.port)
    return server
