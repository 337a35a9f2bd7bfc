"""The storage commitment reporter: sends pending requests' N-EVENT-REPORT on a new association.

Requests are persisted by the SCP (:mod:`node.dimse.commitment`) before they are answered;
this thread claims each one that is due, decides what is committed, and reports it on a new
association to the requester (PS3.4 J.3.3: the node, as the SCP of the SOP class, proposes
the SCP role). Requesters that take reports on their own associations are served by
:mod:`node.dimse.report_channels`: this thread leaves their requests alone
(``same_association``), or leaves them while the requester holds an association that can
carry them (``same_then_new``); the claim in the catalogue keeps the two from both sending.
A report the requester does not take is retried; with ``after_archived`` a request whose
instances are still on their way to the archive is looked at again until they are there or
``archive_wait_seconds`` has passed. At start every pending request is due, so
a request answered just before a restart still gets its report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, build_role

from node.catalogue.db import Catalogue
from node.core.poller import Polled, Poller
from node.core.settings import CommitmentSettings, ReportAddress
from node.core.status import SUCCESS
from node.delivery.responses import keep_responses
from node.dimse import commitment
from node.dimse.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    HeldRequest,
    Verdict,
    event_type,
    report_data_set,
)
from node.dimse.report_channels import ReturnPaths

log = logging.getLogger(__name__)


class ReportError(RuntimeError):
    """The requester could not be reached or did not accept the report."""


@dataclass
class CommitmentReporter(Polled):
    """One thread that answers pending storage commitment requests."""

    catalogue: Catalogue
    settings: CommitmentSettings
    spool_dir: Path
    calling_ae_title: str
    timeout: float = 30.0
    paths: ReturnPaths | None = None  # requesters' own associations, where they take reports
    report_to: Mapping[str, ReportAddress] | None = None  # live; else settings.report_to
    _poller: Poller = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._poller = Poller(
            "commitment",
            self.report_due,
            lambda: self.settings.poll_seconds,
            "storage commitment reports failed; retrying",
            join_timeout=self.timeout + 5,
        )

    def report_due(self) -> int:
        """Answer every due request once; return how many were answered."""
        with self.catalogue.session() as session:
            requests = commitment.due(session)
        done = 0
        for request_id, ae_title in requests:
            if self._poller.stopping:
                break
            if not self._ours(ae_title):
                continue
            held = commitment.claim(self.catalogue, request_id)
            if held is not None and self._answer(held):
                done += 1
        return done

    def _addresses(self) -> Mapping[str, ReportAddress]:
        return self.settings.report_to if self.report_to is None else self.report_to

    def _ours(self, ae_title: str) -> bool:
        """Whether this requester's report goes on a new association now."""
        address = self._addresses().get(ae_title)
        if address is None:
            return True  # its entry is gone: the attempt says so in last_error
        if not address.on_new_association:
            return False
        if address.on_requester_association and self.paths is not None:
            return not self.paths.usable(ae_title)
        return True

    def _answer(self, held: HeldRequest) -> bool:
        verdict = commitment.ready_verdict(self.catalogue, self.spool_dir, held, self.settings)
        if verdict is None:
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
        address = self._addresses().get(held.calling_ae_title)
        if address is None:
            raise ReportError(f"no dicom.commitment.report_to entry for {held.calling_ae_title}")
        if address.port is None:
            raise ReportError(f"no port to report to {held.calling_ae_title} on")
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
        keep_responses(assoc)
        try:
            status = assoc.send_n_event_report(
                report_data_set(held.transaction_uid, verdict),
                event_type(verdict),
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
