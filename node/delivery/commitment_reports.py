"""The storage commitment reporter: sends each pending request's N-EVENT-REPORT.

Requests are persisted by the SCP (:mod:`node.dimse.commitment`) before they are answered;
this thread claims each one that is due, decides what is committed, and reports it on a new
association to the requester (PS3.4 J.3.3: the node, as the SCP of the SOP class, proposes
the SCP role). A report the requester does not take is retried; with ``after_archived`` a
request whose instances are still on their way to the archive is looked at again until they
are there or ``archive_wait_seconds`` has passed. At start every pending request is due, so
a request answered just before a restart still gets its report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from node.catalogue.db import Catalogue
from node.catalogue.models import utcnow
from node.core.poller import Poller
from node.core.settings import CommitmentSettings
from node.core.status import SUCCESS
from node.dimse import commitment
from node.dimse.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    HeldRequest,
    Verdict,
)

log = logging.getLogger(__name__)

ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID (PS3.4 J.3.3)


class ReportError(RuntimeError):
    """The requester could not be reached or did not accept the report."""


def report_data_set(transaction_uid: str, verdict: Verdict) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if verdict.committed:
        ds.ReferencedSOPSequence = [_reference(cls, uid) for cls, uid in verdict.committed]
    if verdict.failed:
        failed = []
        for sop_class, uid, reason, _why in verdict.failed:
            item = _reference(sop_class, uid)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    return ds


def _reference(sop_class: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    return item


@dataclass
class CommitmentReporter:
    """One thread that answers pending storage commitment requests."""

    catalogue: Catalogue
    settings: CommitmentSettings
    spool_dir: Path
    calling_ae_title: str
    timeout: float = 30.0
    _poller: Poller = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._poller = Poller(
            "commitment",
            self.report_due,
            lambda: self.settings.poll_seconds,
            "storage commitment reports failed; retrying",
            join_timeout=self.timeout + 5,
        )

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._poller.wake()

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    def report_due(self) -> int:
        """Answer every due request once; return how many were answered."""
        with self.catalogue.session() as session:
            ids = commitment.due(session)
        done = 0
        for request_id in ids:
            if self._poller.stopping:
                break
            held = commitment.claim(self.catalogue, request_id)
            if held is not None and self._answer(held):
                done += 1
        return done

    def _answer(self, held: HeldRequest) -> bool:
        verdict = commitment.judge(
            self.catalogue, self.spool_dir, held.items, self.settings.after_archived
        )
        waited = (utcnow() - held.created_at).total_seconds()
        if verdict.waiting and waited < self.settings.archive_wait_seconds:
            commitment.postpone(self.catalogue, held, self.settings.poll_seconds, None)
            return False
        try:
            self._send(held, verdict)
        except ReportError as exc:
            log.warning("storage commitment report %s not delivered: %s", held.transaction_uid, exc)
            commitment.postpone(self.catalogue, held, self.settings.retry_seconds, str(exc))
            return False
        commitment.answered(self.catalogue, held, verdict.outcome())
        log.info(
            "storage commitment %s reported to %s: %d committed, %d failed",
            held.transaction_uid,
            held.calling_ae_title,
            len(verdict.committed),
            len(verdict.failed),
        )
        return True

    def _send(self, held: HeldRequest, verdict: Verdict) -> None:
        address = self.settings.report_to.get(held.calling_ae_title)
        if address is None:
            raise ReportError(f"no dicom.commitment.report_to entry for {held.calling_ae_title}")
        host = address.host or held.address
        called = address.ae_title or held.calling_ae_title
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(STORAGE_COMMITMENT_SOP_CLASS)
        role = build_role(STORAGE_COMMITMENT_SOP_CLASS, scp_role=True)
        where = f"{called}@{host}:{address.port}"
        try:
            assoc = ae.associate(host, address.port, ae_title=called, ext_neg=[role])
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot associate with {where}: {exc}") from exc
        if not assoc.is_established:
            raise ReportError(f"association with {where} was rejected or failed")
        try:
            status = assoc.send_n_event_report(
                report_data_set(held.transaction_uid, verdict),
                ALL_COMMITTED if not verdict.failed else SOME_FAILED,
                STORAGE_COMMITMENT_SOP_CLASS,
                STORAGE_COMMITMENT_INSTANCE,
            )[0]
        finally:
            if assoc.is_established:
                assoc.release()
        code = getattr(status, "Status", None)
        if code != SUCCESS:
            shown = "no response" if code is None else f"0x{code:04X}"
            raise ReportError(f"{where} answered N-EVENT-REPORT with {shown}")
