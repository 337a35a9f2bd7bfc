"""The DIMSE listener: C-ECHO and C-STORE SCP bound to the ingest path.

Handlers are plain functions bound to pynetdicom events; storage and cataloguing live in
:mod:`node.ingest` so they can be tested without a network.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.models import AssociationRecord
from node.ingest import CANNOT_UNDERSTAND, Ingestor, brief
from node.metrics import ASSOCIATIONS, BYTES_RECEIVED, INSTANCES_RECEIVED, STORE_FAILURES
from node.peers import SourcePolicy
from node.settings import DicomSettings, TlsSettings

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


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


@dataclass
class _Tally:
    """What happened on one association, kept on the association object."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    clock: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes_received: int = 0
    statuses: Counter[str] = field(default_factory=Counter)


def _tally(event: Event) -> _Tally:
    return event.assoc.__dict__.setdefault("_curia_tally", _Tally())


class AssociationHandlers:
    """pynetdicom event handlers: admission, storage, and a record of every association."""

    def __init__(self, ingestor: Ingestor, policy: SourcePolicy) -> None:
        self.ingestor = ingestor
        self.policy = policy

    def bindings(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
        ]

    def on_requested(self, event: Event) -> None:
        """Refuse everyone while the disk is below its watermark, unknown senders always, and
        called AE titles that are not the node's."""
        requestor = event.assoc.requestor
        calling = (requestor.primitive.calling_ae_title if requestor.primitive else "").strip()
        guard = self.ingestor.guard
        if guard is not None and not guard.can_accept():
            self._reject(event, calling, REJECT_TEMPORARY_CONGESTION, "disk below watermark")
            return
        called = (requestor.primitive.called_ae_title if requestor.primitive else "").strip()
        try:
            allowed = self.policy.allows(calling, requestor.address)
            ours = allowed and self.policy.answers_to(called)
        except Exception as exc:
            # pynetdicom logs an exception here and goes on to accept the association: a
            # sender that cannot be checked (the catalogue is down) is refused, transiently.
            log.error("cannot read the allow-list: %s", brief(exc))
            self._reject(event, calling, REJECT_TEMPORARY_CONGESTION, "allow-list unavailable")
            return
        if not allowed:
            self._reject(event, calling, REJECT_CALLING_AE_NOT_RECOGNISED, "not in allow-list")
            return
        if not ours:
            self._reject(
                event, calling, REJECT_CALLED_AE_NOT_RECOGNISED, f"called AE {called!r} unknown"
            )

    def _reject(self, event: Event, calling: str, rsd: tuple[int, int, int], why: str) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "refused association from AE %r at %s: %s%s",
            calling,
            requestor.address,
            why,
            " (add it with `curia-node ae source add`)" if why == "not in allow-list" else "",
        )
        self._record(event, calling, "rejected", why)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()

    def on_accepted(self, event: Event) -> None:
        _tally(event)
        requestor = event.assoc.requestor
        log.info(
            "association accepted from %s (%s:%s)",
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )

    def on_store(self, event: Event) -> int:
        calling = event.assoc.requestor.ae_title
        tally = _tally(event)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("cannot encode the received data set from %s", calling)
            tally.failed += 1
            tally.statuses[f"0x{CANNOT_UNDERSTAND:04X}"] += 1
            return CANNOT_UNDERSTAND
        outcome = self.ingestor.ingest(
            data, calling, expected_sop_uid=event.request.AffectedSOPInstanceUID
        )
        tally.bytes_received += len(data)
        if outcome.status == 0:
            tally.stored += 1
            INSTANCES_RECEIVED.labels("dimse").inc()
            BYTES_RECEIVED.labels("dimse").inc(len(data))
        else:
            tally.failed += 1
            STORE_FAILURES.labels("dimse", f"0x{outcome.status:04X}").inc()
        tally.statuses[f"0x{outcome.status:04X}"] += 1
        return outcome.status

    def on_released(self, event: Event) -> None:
        self._closed(event, "released")

    def on_aborted(self, event: Event) -> None:
        self._closed(event, "aborted")

    def _closed(self, event: Event, outcome: str) -> None:
        tally = _tally(event)
        log.info(
            "association from %s %s: %d stored, %d failed, %.2f s",
            event.assoc.requestor.ae_title,
            outcome,
            tally.stored,
            tally.failed,
            time.monotonic() - tally.clock,
        )
        self._record(event, event.assoc.requestor.ae_title, outcome, None)

    def _record(self, event: Event, calling: str, outcome: str, reason: str | None) -> None:
        tally = _tally(event)
        requestor = event.assoc.requestor
        ASSOCIATIONS.labels(outcome).inc()
        try:
            with self.ingestor.catalogue.session() as session:
                session.add(
                    AssociationRecord(
                        calling_ae_title=calling[:16],
                        address=str(requestor.address)[:64],
                        port=requestor.port,
                        outcome=outcome,
                        reason=reason,
                        stored=tally.stored,
                        failed=tally.failed,
                        statuses=dict(tally.statuses),
                        bytes_received=tally.bytes_received,
                        started_at=tally.started,
                        ended_at=datetime.now(UTC),
                    )
                )
        except SQLAlchemyError as exc:  # the database is down: one line, not a traceback
            log.error("cannot record the association in the catalogue: %s", brief(exc))
        except Exception:
            log.exception("cannot record the association in the catalogue")


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    # The called AE title is checked in the A-ASSOCIATE handler: the configured title or a
    # local one from the catalogue (added while the node runs).
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server context for DICOM TLS: TLS 1.2+, optional client-certificate verification."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca_file is None:
        context.verify_mode = ssl.CERT_NONE
    return context


def start_listener(
    settings: DicomSettings, ingestor: Ingestor, policy: SourcePolicy
) -> ThreadedAssociationServer:
    """Start the C-ECHO/C-STORE SCP in background threads and return its server."""
    ae = build_ae(settings)
    if policy.ae_title is None:
        policy.ae_title = settings.ae_title
    handlers = AssociationHandlers(ingestor, policy).bindings()
    context = tls_context(settings.tls) if settings.tls.enabled else None
    server = ae.start_server(
        (settings.host, settings.port), block=False, evt_handlers=handlers, ssl_context=context
    )
    log.info(
        "DICOM listener %s on %s:%d%s",
        settings.ae_title,
        settings.host,
        settings.port,
        " (TLS)" if context else "",
    )
    return server
