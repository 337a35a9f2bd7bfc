"""Storage commitment reports on the requester's own association (PS3.4 J.3.3).

The SCP may send its N-EVENT-REPORT on an association the requester holds open, and many
modalities wait for it there. For a requester whose ``dicom.commitment.report_to`` entry
allows it (``same_association`` or ``same_then_new``), each of its open associations that
agreed on the Storage Commitment context is a :class:`ReportChannel`. The acceptor's thread
calls :meth:`ReportChannel.idle` between messages: due reports are claimed (the catalogue's
one claim, so the new-association reporter never sends the same one), sent as an
N-EVENT-REPORT-RQ, and the acceptor hands back the N-EVENT-REPORT-RSP it reads in its loop
(:meth:`ReportChannel.response`). Only a Success response marks a request answered; any
other status, or the end of the association before one, gives the claim back, and the
report goes the other way if one is allowed (``same_then_new``), or on the requester's next
association (``same_association``).

All sending stays on the acceptor's thread (a TLS socket must not be written from one
thread while another reads it): while a report waits for its instances (``after_archived``)
the acceptor waits for the peer's next bytes in steps of ``poll_seconds``, looking again
between steps, within its usual idle limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom.uid import UID
from pynetdicom.dsutils import encode
from sqlalchemy import select as sql_select
from sqlalchemy.exc import SQLAlchemyError

from node.catalogue.db import Catalogue
from node.catalogue.models import CommitmentRequest, CommitmentState, utcnow
from node.core.settings import CommitmentSettings, ReportAddress
from node.core.status import SUCCESS
from node.dimse import commitment
from node.dimse.association import Association
from node.dimse.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    HeldRequest,
    Verdict,
)
from node.dimse.messages import command_set, us, us_value
from node.dimse.pdu import AssociationAborted, Connection, p_data
from node.store.ingest import brief

log = logging.getLogger(__name__)

N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
HAS_DATA_SET = 0x0000  # Command Data Set Type: anything but 0x0101 (PS3.7 E.1)


def report_message(
    context_id: int, message_id: int, event_type: int, data: bytes, peer_max_pdu: int
) -> bytes:
    """An N-EVENT-REPORT-RQ (PS3.7 10.3.1) of the Storage Commitment SOP instance as
    P-DATA-TF PDUs: its command set, then its data set, each within the peer's maximum."""
    command = command_set(
        [
            (0x0002, STORAGE_COMMITMENT_SOP_CLASS.encode("ascii")),  # padded by command_set
            (0x0100, us(N_EVENT_REPORT_RQ)),
            (0x0110, us(message_id)),
            (0x0800, us(HAS_DATA_SET)),
            (0x1000, STORAGE_COMMITMENT_INSTANCE.encode("ascii")),
            (0x1002, us(event_type)),
        ]
    )
    return p_data(context_id, command, data, peer_max_pdu)


@dataclass
class _Sent:
    held: HeldRequest
    verdict: Verdict


@dataclass(eq=False)
class ReportChannel:
    """One open association of a requester, as the way back for its reports."""

    paths: ReturnPaths
    association: Association
    connection: Connection
    context_id: int
    opened_at: datetime = field(default_factory=utcnow)
    refused: bool = False  # the requester answered a report with a failure: not here again
    _horizon: datetime | None = None
    _next_look: float = 0.0  # time.monotonic() of the next look at the catalogue
    _waiting: bool = False  # a request of this requester waits for its instances
    _next_id: int = 1
    _sent: dict[int, _Sent] = field(default_factory=dict)

    @property
    def ae_title(self) -> str:
        return self.association.requestor.calling_ae_title

    def answered_request(self) -> None:
        """An N-service request on this association was just answered: a storage
        commitment request it carried may be reported from now on (never before its
        N-ACTION-RSP), so look at once."""
        self._horizon = utcnow()
        self._next_look = 0.0

    def idle(self, limit: float) -> float:
        """Between messages: send what is due, and while a report waits for its instances,
        wait for the peer's next bytes in steps. Returns the seconds spent here (at most
        about ``limit``), so that the acceptor's own idle limit still holds.

        The catalogue is read at most once per ``poll_seconds`` (or at once after an
        N-ACTION on this association): a C-STORE between two looks costs nothing here.
        """
        started = time.monotonic()
        while not self.refused:
            now = time.monotonic()
            if now >= self._next_look:
                self._waiting = self._look()
                now = time.monotonic()
                self._next_look = now + self.paths.settings.poll_seconds
            spent = now - started
            if not self._waiting or spent >= limit:
                return spent
            if self.connection.readable(min(self._next_look - now, limit - spent)):
                break
        return time.monotonic() - started

    def _look(self) -> bool:
        """:meth:`_send_due`, and a catalogue that cannot be read is only logged: the
        association goes on, and the requests stay pending for the next look."""
        try:
            return self._send_due()
        except SQLAlchemyError as exc:
            log.error("cannot look for storage commitment reports to send: %s", brief(exc))
            return False

    def _send_due(self) -> bool:
        """Send each due report; whether some request still waits for its instances."""
        paths = self.paths
        horizon = max(self.opened_at, self._horizon or self.opened_at)
        with paths.catalogue.session() as session:
            requests = commitment.due(session, ae_title=self.ae_title, created_before=horizon)
            pending = session.scalar(
                sql_select(CommitmentRequest.id)
                .where(CommitmentRequest.state == CommitmentState.PENDING)
                .where(CommitmentRequest.calling_ae_title == self.ae_title)
                .where(CommitmentRequest.created_at <= horizon)
                .where(CommitmentRequest.claim_token.is_(None))
                .limit(1)
            )
        for request_id, _ in requests:
            held = commitment.claim(paths.catalogue, request_id)
            if held is None:
                continue  # another association or the reporter holds it
            verdict = commitment.ready_verdict(
                paths.catalogue, paths.spool_dir, held, paths.settings
            )
            if verdict is None:
                continue
            self._send(held, verdict)
        return pending is not None

    def _send(self, held: HeldRequest, verdict: Verdict) -> None:
        message_id, self._next_id = self._next_id, self._next_id % 0xFFFF + 1
        context = self.association.contexts[self.context_id]
        syntax = UID(str(context.transfer_syntax[0]))
        data = encode(
            commitment.report_data_set(held.transaction_uid, verdict),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
        )
        assert data is not None
        message = report_message(
            self.context_id,
            message_id,
            commitment.event_type(verdict),
            data,
            self.association.peer_max_pdu,
        )
        self._sent[message_id] = _Sent(held, verdict)
        try:
            self.connection.send(message)
        except AssociationAborted:
            self._sent.pop(message_id, None)
            commitment.release(self.paths.catalogue, held, "the association ended")
            raise
        log.info(
            "storage commitment %s reported to %s on its association (message %d)",
            held.transaction_uid,
            self.ae_title,
            message_id,
        )

    def response(self, fields: dict[int, bytes]) -> bool:
        """An N-EVENT-REPORT-RSP the acceptor read: True if it answers one of ours."""
        if us_value(fields, 0x0100) != N_EVENT_REPORT_RSP:
            return False
        sent = self._sent.pop(us_value(fields, 0x0120), None)
        if sent is None:
            return False
        status = us_value(fields, 0x0900) if 0x0900 in fields else None
        try:
            self._record(sent, status)
        except SQLAlchemyError as exc:  # the claim lapses; the report is sent again later
            log.error("cannot record a storage commitment report's answer: %s", brief(exc))
        return True

    def _record(self, sent: _Sent, status: int | None) -> None:
        catalogue, held = self.paths.catalogue, sent.held
        if status == SUCCESS:
            if commitment.answered(catalogue, held, sent.verdict.outcome()):
                log.info(
                    "storage commitment %s taken by %s: %d committed, %d failed",
                    held.transaction_uid,
                    self.ae_title,
                    len(sent.verdict.committed),
                    len(sent.verdict.failed),
                )
            return
        shown = "no status" if status is None else f"0x{status:04X}"
        log.warning(
            "%s answered storage commitment report %s with %s on its association",
            self.ae_title,
            held.transaction_uid,
            shown,
        )
        self.refused = True  # not on this association again; the other way, if allowed
        commitment.postpone(
            catalogue, held, self.paths.settings.retry_seconds, f"{shown} on the association"
        )
        self.paths.changed()

    def close(self) -> None:
        """The association ended: reports still unanswered on it are due again."""
        try:
            for sent in self._sent.values():
                commitment.release(
                    self.paths.catalogue, sent.held, "the association ended before the answer"
                )
        except SQLAlchemyError as exc:  # the claims lapse instead
            log.error("cannot give back storage commitment reports: %s", brief(exc))
        finally:
            self._sent.clear()
            self.paths.closed(self)


@dataclass(eq=False)
class ReturnPaths:
    """The requesters' open associations that may carry their reports."""

    catalogue: Catalogue
    settings: CommitmentSettings
    spool_dir: Path
    on_change: list[Callable[[], object]] = field(default_factory=list)  # wake the reporter
    report_to: Mapping[str, ReportAddress] | None = None  # live; else settings.report_to
    _open: list[ReportChannel] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, association: Association, connection: Connection) -> ReportChannel | None:
        """A channel for this association if its requester takes reports on its own
        associations and the Storage Commitment context was agreed with the node as SCP."""
        context_id = next(
            (
                context_id
                for context_id, context in association.contexts.items()
                if str(context.abstract_syntax) == STORAGE_COMMITMENT_SOP_CLASS and context.as_scp
            ),
            None,
        )
        if context_id is None:  # most associations: looked at before the live settings
            return None
        report_to = self.settings.report_to if self.report_to is None else self.report_to
        address = report_to.get(association.requestor.calling_ae_title)
        if address is None or not address.on_requester_association:
            return None
        channel = ReportChannel(self, association, connection, context_id)
        with self._lock:
            self._open.append(channel)
        return channel

    def closed(self, channel: ReportChannel) -> None:
        with self._lock:
            if channel in self._open:
                self._open.remove(channel)
        self.changed()

    def changed(self) -> None:
        for wake in self.on_change:
            wake()

    def usable(self, ae_title: str) -> bool:
        """Whether a requester holds an association that can carry its reports now."""
        with self._lock:
            return any(c.ae_title == ae_title and not c.refused for c in self._open)
