"""Forwards the modalities' MPPS to a RIS or PACS that also wants them.

Every N-CREATE and N-SET the node accepts is queued in the catalogue by the MPPS SCP
(:mod:`node.dimse.mpps`) in the transaction that accepts it; this thread sends them in that
order, one association per batch, and retries what the peer does not take, so a peer that
is down for a while still gets every step, and a step's N-SET never overtakes its N-CREATE.
An N-CREATE the peer already has (0x0111: sent before a crash, not yet recorded) counts as
sent. Sent records are kept for ``retention_days``, then removed by the same thread (once an
hour); records not yet sent are never removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from node.catalogue.db import Catalogue
from node.core.poller import Polled, Poller
from node.core.settings import MppsForwardSettings
from node.core.status import DUPLICATE_SOP_INSTANCE, SUCCESS
from node.delivery.responses import keep_responses
from node.dimse import mpps
from node.dimse.mpps import MPPS_SOP_CLASS, PendingForward

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between two removals of old sent records


@dataclass
class MppsForwarder(Polled):
    catalogue: Catalogue
    settings: MppsForwardSettings
    calling_ae_title: str
    poll_seconds: float = 1.0
    timeout: float = 30.0
    _poller: Poller = field(init=False, repr=False)
    _pruned_at: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._poller = Poller(
            "mpps-forward",
            self.forward_due,
            lambda: self.poll_seconds,
            "MPPS forwarding failed; retrying",
            join_timeout=self.timeout + 5,
        )

    def prune(self, now: datetime | None = None) -> int:
        """Remove sent records older than ``retention_days``; return how many."""
        now = now or datetime.now(UTC)
        removed = mpps.prune_forwards(
            self.catalogue, now - timedelta(days=self.settings.retention_days)
        )
        self._pruned_at = time.monotonic()
        if removed:
            log.info("removed %d forwarded MPPS record(s) past their retention", removed)
        return removed

    def forward_due(self) -> int:
        """Send what is due, in order; return how many the peer took. Old sent records are
        removed first, at most once per :data:`PRUNE_EVERY`."""
        if self._pruned_at is None or time.monotonic() - self._pruned_at >= PRUNE_EVERY:
            self.prune()
        due = mpps.pending_forwards(self.catalogue)
        if not due:
            return 0
        where = f"{self.settings.ae_title}@{self.settings.host}:{self.settings.port}"
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(MPPS_SOP_CLASS)
        try:
            assoc = ae.associate(
                self.settings.host, self.settings.port, ae_title=self.settings.ae_title
            )
        except (OSError, ValueError) as exc:
            self._failed(due, f"cannot associate with {where}: {exc}")
            return 0
        if not assoc.is_established:
            self._failed(due, f"association with {where} was rejected or failed")
            return 0
        keep_responses(assoc)
        sent, failed_steps = 0, set()
        try:
            for item in due:
                if item.step_uid in failed_steps:
                    continue  # its earlier request failed: keep the order
                error = self._send(assoc, item)
                if error is None:
                    mpps.forward_sent(self.catalogue, item.id)
                    sent += 1
                else:
                    failed_steps.add(item.step_uid)
                    log.warning("MPPS %s not forwarded to %s: %s", item.step_uid, where, error)
                    mpps.forward_failed(self.catalogue, item.id, error, self.settings.retry_seconds)
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            log.info("forwarded %d MPPS request(s) to %s", sent, where)
        return sent

    @staticmethod
    def _send(assoc: Association, item: PendingForward) -> str | None:
        dataset = Dataset.from_json(item.data)
        if item.command == "n-create":
            status, _ = assoc.send_n_create(dataset, MPPS_SOP_CLASS, item.step_uid)
            accepted = {SUCCESS, DUPLICATE_SOP_INSTANCE}
        else:
            status, _ = assoc.send_n_set(dataset, MPPS_SOP_CLASS, item.step_uid)
            accepted = {SUCCESS}
        code = getattr(status, "Status", None)
        if code in accepted:
            return None
        return "no response" if code is None else f"answered 0x{code:04X}"

    def _failed(self, due: list[PendingForward], error: str) -> None:
        log.warning("MPPS forwarding: %s", error)
        first: dict[str, int] = {}
        for item in due:
            first.setdefault(item.step_uid, item.id)
        for forward_id in first.values():
            mpps.forward_failed(self.catalogue, forward_id, error, self.settings.retry_seconds)
