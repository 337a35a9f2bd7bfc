"""The DIMSE listener: C-ECHO and C-STORE SCP bound to the ingest path, and the MPPS and
Storage Commitment SCPs (:mod:`node.dimse.mpps`, :mod:`node.dimse.commitment`).

The upper layer is :mod:`node.dimse.server` (the socket) and :mod:`node.dimse.acceptor` (one
association); this module says what the node does on each association (who is admitted,
where a C-STORE goes, what is recorded). Storage and cataloguing live in
:mod:`node.store.ingest` so they can be tested without a network.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydicom.uid import UID, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.models import AssociationRecord
from node.core.metrics import ASSOCIATIONS, BYTES_RECEIVED, INSTANCES_RECEIVED, STORE_FAILURES
from node.core.settings import DicomSettings, SourceSignals, TlsSettings
from node.core.status import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from node.dimse.allow_list import SourcePolicy
from node.dimse.association import (
    Association,
    Limits,
    NormalisedAnswer,
    NormalisedRequest,
    Refusal,
    Requestor,
    StoreRequest,
)
from node.dimse.association_end import record_association_end
from node.dimse.refusals import RefusalTally
from node.dimse.report_channels import ReturnPaths
from node.dimse.server import Listener
from node.store.buffers import size_of
from node.store.header import InstanceHeader, RejectedInstance, header_from, parse_header
from node.store.ingest import Ingestor, IngestOutcome, brief
from node.store.journal import Reservation
from node.store.spool import StagedFile

log = logging.getLogger(__name__)
# This transport's counters, looked up once: labels() costs more than the increment.
_INSTANCES_RECEIVED = INSTANCES_RECEIVED.labels("dimse")
_BYTES_RECEIVED = BYTES_RECEIVED.labels("dimse")

VERIFICATION = UID("1.2.840.10008.1.1")  # the Verification SOP Class, PS3.4 A.4
#: Every storage SOP class of PS3.4 (pynetdicom's full list): a PACS pushes a study whole,
#: dose reports, key objects, presentation states and RT objects with the images, and a
#: study whose objects are refused fails whole at the sender.
STORAGE_SOP_CLASSES = [UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts]


class NormalisedService(Protocol):
    """The SCP of one DIMSE-N SOP class (MPPS, Storage Commitment)."""

    def handle(self, association: Association, request: NormalisedRequest) -> NormalisedAnswer: ...


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


class AssociationHandlers:
    """What the node does on each association: admission, storage, and a record of it."""

    def __init__(
        self,
        ingestor: Ingestor,
        policy: SourcePolicy,
        refusal_retention: timedelta | None = None,
        services: Mapping[str, NormalisedService] | None = None,
        sources: Mapping[str, SourceSignals] | None = None,
        on_signal: Callable[[], object] | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.policy = policy
        self.refusals = RefusalTally(ingestor.catalogue, refusal_retention or timedelta(days=90))
        self.services = dict(services or {})
        self.sources: Mapping[str, SourceSignals] = sources if sources is not None else {}
        self.on_signal = on_signal  # wakes the completion watcher

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

    def stage(self) -> StagedFile:
        """A staged file in the spool for a data set too large to hold in memory."""
        return self.ingestor.spool.stage()

    def look_ahead(self, sop_instance_uid: str) -> int | None:
        return self.ingestor.look_ahead(sop_instance_uid)

    def reserve(self, size_hint: int) -> Reservation | None:
        return self.ingestor.reserve(size_hint)

    def store(self, association: Association, request: StoreRequest) -> tuple[int, str]:
        calling = association.requestor.calling_ae_title
        if request.staged is not None:
            outcome = self._ingest_staged(
                request.staged, calling, request.sop_instance_uid, request.sop_class_uid
            )
        else:
            outcome = self.ingestor.ingest(
                request.data,
                calling,
                expected_sop_uid=request.sop_instance_uid,
                expected_sop_class=request.sop_class_uid,
                crc32=request.crc32,
                ahead=request.ahead,
                reserved=request.reserved,
                header=request.header,
                answer=request.answer,
            )
        if outcome.status == SUCCESS:
            if outcome.series_uid:
                association.series_uids.add(outcome.series_uid)
            _INSTANCES_RECEIVED.inc()
            size = request.staged.size if request.staged is not None else size_of(request.data)
            _BYTES_RECEIVED.inc(size)
        else:
            STORE_FAILURES.labels("dimse", f"0x{outcome.status:04X}").inc()
        return outcome.status, outcome.reason

    def _ingest_staged(
        self, staged: StagedFile, calling: str, expected_sop_uid: str, expected_sop_class: str
    ) -> IngestOutcome:
        """A spilled data set: synced, its header read from the file (the same checks as
        in-memory bytes get), then placed and catalogued by ingest."""
        header: InstanceHeader | RejectedInstance
        try:
            staged.sync()
            header = header_from(parse_header(staged.path))
            if header.sop_instance_uid != expected_sop_uid:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID in the data set differs from the request's",
                )
            if header.sop_class_uid != expected_sop_class:
                raise RejectedInstance(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"SOPClassUID {header.sop_class_uid} in the data set differs from the "
                    f"request's {expected_sop_class}",
                )
        except RejectedInstance as exc:
            header = exc
        return self.ingestor.ingest_staged([(staged, header)], calling)[0]

    def normalised(self, association: Association, request: NormalisedRequest) -> NormalisedAnswer:
        """N-CREATE / N-SET / N-ACTION, to the SCP of the request's SOP class."""
        service = self.services.get(request.sop_class_uid)
        if service is None:
            return NormalisedAnswer(SOP_CLASS_NOT_SUPPORTED, "SOP class not served")
        # An MPPS step's end or a commitment request speaks of instances already answered:
        # they are in the catalogue before it is handled.
        self.ingestor.settle()
        try:
            answer = service.handle(association, request)
        except SQLAlchemyError as exc:  # the catalogue is down: one line, the sender retries
            log.error("cannot record an N-service request: %s", brief(exc))
            return NormalisedAnswer(PROCESSING_FAILURE, "catalogue unavailable")
        if answer.status == SUCCESS and self.on_signal is not None:
            self.on_signal()  # an MPPS step may have ended
        return answer

    def releasing(self, association: Association) -> None:
        """Before the A-RELEASE-RP: nothing to wait for. Every instance answered Success is
        in the journal; their filing into spool and catalogue follows the sender's stream
        (:mod:`node.store.write_ahead`) and is waited for after the release is answered, in
        :meth:`closed`, not while the sender waits for the answer."""

    def closed(self, association: Association, outcome: str, reason: str | None) -> None:
        if association.series_uids:
            self.ingestor.settle()  # its instances are catalogued before its end is a signal
        try:
            record_association_end(self.ingestor.catalogue, association, outcome, self.sources)
        except Exception as exc:  # the quiet period still completes the series
            log.error("cannot record the end of an association: %s", brief(exc))
        if association.series_uids and self.on_signal is not None:
            self.on_signal()  # its end, or its last instance, may complete a series
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
        if outcome == "rejected":  # counted, not recorded one by one (anyone can repeat it)
            self.refusals.add(requestor.calling_ae_title, requestor.address, reason or "")
            return
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


def normalised_contexts(sop_classes: list[str]) -> list[PresentationContext]:
    """MPPS and Storage Commitment, in the uncompressed transfer syntaxes (PS3.5 10)."""
    return [build_context(UID(uid)) for uid in sop_classes]


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
    settings: DicomSettings,
    ingestor: Ingestor,
    policy: SourcePolicy,
    services: Mapping[str, NormalisedService] | None = None,
    sources: Mapping[str, SourceSignals] | None = None,
    on_signal: Callable[[], object] | None = None,
    return_paths: ReturnPaths | None = None,
) -> Listener:
    """Start the SCPs in background threads and return the listener.

    ``services`` maps an MPPS / Storage Commitment SOP class to its SCP; ``sources`` says
    which senders' association end completes their series; ``on_signal`` is called when a
    sender may have signalled a series complete; ``return_paths`` carries storage commitment
    reports on the requesters' own associations.
    """
    if policy.ae_title is None:
        policy.ae_title = settings.ae_title
    limits = Limits(
        max_associations=settings.max_associations,
        max_connections=settings.max_connections,
        max_connections_per_address=settings.max_connections_per_address,
        max_pdu=settings.max_pdu,
        max_instance_bytes=settings.max_instance_mb << 20,
        instance_memory_bytes=settings.instance_memory_mb << 20,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
    )
    context = tls_context(settings.tls) if settings.tls.enabled else None
    server = Listener(
        (settings.host, settings.port),
        supported_contexts() + normalised_contexts(sorted(services or {})),
        AssociationHandlers(
            ingestor,
            policy,
            timedelta(days=settings.refusal_retention_days),
            services,
            sources,
            on_signal,
        ),
        limits,
        ssl_context=context,
        also_accept=unknown_storage_contexts if settings.accept_unknown_storage else None,
        return_paths=return_paths,
    ).start()
    log.info(
        "DICOM listener %s on %s:%d%s",
        settings.ae_title,
        settings.host,
        settings.port,
        " (TLS)" if context else "",
    )
    return server
