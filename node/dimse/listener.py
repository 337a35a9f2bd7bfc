"""The DIMSE listener: C-ECHO and C-STORE SCP bound to the ingest path.

The upper layer is :mod:`node.dimse.acceptor`; this module says what the node does on each
association (who is admitted, where a C-STORE goes, what is recorded). Storage and
cataloguing live in :mod:`node.store.ingest` so they can be tested without a network.
"""

from __future__ import annotations

import logging
import ssl
import time
from datetime import UTC, datetime

from pydicom.uid import UID, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.models import AssociationRecord
from node.core.metrics import ASSOCIATIONS, BYTES_RECEIVED, INSTANCES_RECEIVED, STORE_FAILURES
from node.core.settings import DicomSettings, TlsSettings
from node.core.status import SUCCESS
from node.dimse.acceptor import Listener
from node.dimse.allow_list import SourcePolicy
from node.dimse.association import Association, Limits, Refusal, Requestor, StoreRequest
from node.store.ingest import Ingestor, brief

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")  # the Verification SOP Class, PS3.4 A.4
#: Every storage SOP class of PS3.4 (pynetdicom's full list): a PACS pushes a study whole,
#: dose reports, key objects, presentation states and RT objects with the images, and a
#: study whose objects are refused fails whole at the sender.
STORAGE_SOP_CLASSES = [UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts]


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


class AssociationHandlers:
    """What the node does on each association: admission, storage, and a record of it."""

    def __init__(self, ingestor: Ingestor, policy: SourcePolicy) -> None:
        self.ingestor = ingestor
        self.policy = policy

    def admit(self, requestor: Requestor) -> Refusal | None:
        """Refuse everyone while the disk is below its watermark, unknown senders always, and
        called AE titles that are not the node's."""
        guard = self.ingestor.guard
        if guard is not None and not guard.can_accept():
            return Refusal(*REJECT_TEMPORARY_CONGESTION, "disk below watermark")
        calling, called = requestor.calling_ae_title, requestor.called_ae_title
        try:
            allowed = self.policy.allows(calling, requestor.address)
            ours = allowed and self.policy.answers_to(called)
        except Exception as exc:
            # A sender that cannot be checked (the catalogue is down) is refused, transiently.
            log.error("cannot read the allow-list: %s", brief(exc))
            return Refusal(*REJECT_TEMPORARY_CONGESTION, "allow-list unavailable")
        if not allowed:
            return Refusal(
                *REJECT_CALLING_AE_NOT_RECOGNISED,
                "not in allow-list",
                hint=" (add it with `curia-node ae source add`)",
            )
        if not ours:
            return Refusal(*REJECT_CALLED_AE_NOT_RECOGNISED, f"called AE {called!r} unknown")
        return None

    def accepted(self, association: Association) -> None:
        requestor = association.requestor
        log.info(
            "association accepted from %s (%s:%s)",
            requestor.calling_ae_title,
            requestor.address,
            requestor.port,
        )

    def store(self, association: Association, request: StoreRequest) -> tuple[int, str]:
        outcome = self.ingestor.ingest(
            request.data,
            association.requestor.calling_ae_title,
            expected_sop_uid=request.sop_instance_uid,
            expected_sop_class=request.sop_class_uid,
        )
        if outcome.status == SUCCESS:
            INSTANCES_RECEIVED.labels("dimse").inc()
            BYTES_RECEIVED.labels("dimse").inc(len(request.data))
        else:
            STORE_FAILURES.labels("dimse", f"0x{outcome.status:04X}").inc()
        return outcome.status, outcome.reason

    def closed(self, association: Association, outcome: str, reason: str | None) -> None:
        requestor = association.requestor
        if outcome != "rejected":
            log.log(
                logging.INFO if outcome == "released" else logging.WARNING,
                "association from %s %s: %d stored, %d failed, %.2f s%s",
                requestor.calling_ae_title,
                outcome,
                association.stored,
                association.failed,
                time.monotonic() - association.clock,
                f" ({reason})" if reason else "",
            )
        ASSOCIATIONS.labels(outcome).inc()
        try:
            with self.ingestor.catalogue.session() as session:
                session.add(
                    AssociationRecord(
                        calling_ae_title=requestor.calling_ae_title[:16],
                        address=requestor.address[:64],
                        port=requestor.port,
                        outcome=outcome,
                        reason=reason,
                        stored=association.stored,
                        failed=association.failed,
                        statuses=dict(association.statuses),
                        bytes_received=association.bytes_received,
                        started_at=association.started,
                        ended_at=datetime.now(UTC),
                    )
                )
        except SQLAlchemyError as exc:  # the database is down: one line, not a traceback
            log.error("cannot record the association in the catalogue: %s", brief(exc))
        except Exception:
            log.exception("cannot record the association in the catalogue")


def supported_contexts() -> list[PresentationContext]:
    """Verification, and every storage SOP class in every transfer syntax pynetdicom knows."""
    contexts = [build_context(VERIFICATION)]
    contexts += [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]
    return contexts


def unknown_storage_contexts(requested: list[PresentationContext]) -> list[PresentationContext]:
    """Contexts for the proposed abstract syntaxes that no DICOM dictionary knows: a vendor's
    private storage class. Known UIDs are left to :func:`supported_contexts` (a known
    service the node does not offer, query or retrieve, stays refused)."""
    known = set(STORAGE_SOP_CLASSES) | {VERIFICATION}
    unknown = {
        str(cx.abstract_syntax)
        for cx in requested
        if cx.abstract_syntax is not None
        and cx.abstract_syntax not in known
        and cx.abstract_syntax not in UID_dictionary
        and cx.abstract_syntax.is_valid
    }
    return [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in sorted(unknown)]


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


def start_listener(settings: DicomSettings, ingestor: Ingestor, policy: SourcePolicy) -> Listener:
    """Start the C-ECHO/C-STORE SCP in background threads and return it."""
    if policy.ae_title is None:
        policy.ae_title = settings.ae_title
    limits = Limits(
        max_associations=settings.max_associations,
        max_pdu=settings.max_pdu,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
    )
    context = tls_context(settings.tls) if settings.tls.enabled else None
    server = Listener(
        (settings.host, settings.port),
        supported_contexts(),
        AssociationHandlers(ingestor, policy),
        limits,
        ssl_context=context,
        also_accept=unknown_storage_contexts if settings.accept_unknown_storage else None,
    ).start()
    log.info(
        "DICOM listener %s on %s:%d%s",
        settings.ae_title,
        settings.host,
        settings.port,
        " (TLS)" if context else "",
    )
    return server
