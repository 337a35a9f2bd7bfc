"""Storage Commitment Push Model SCP (PS3.4 J): the N-ACTION, and the requests' state.

A modality asks the node to take responsibility for a list of instances so that it can
free its own disk. The request is written to the catalogue before the N-ACTION is answered
with Success: once answered, a restart cannot lose it. Its N-EVENT-REPORT goes on the
requester's own association (:mod:`node.dimse.report_channels`) or on a new one
(:mod:`node.delivery.commitment_reports`), as ``dicom.commitment.report_to`` says for that
requester. This module is the one owner of a request's state: created here, claimed by one
sender at a time (the shared conditional-UPDATE claim), so the two ways never both send
it, then answered or postponed.

What is committed is decided here too, when the report is built: an instance that is
catalogued with its file in the spool (and, with ``after_archived``, whose series was
forwarded), of the SOP class the requester named. Everything else is listed as failed
with its reason; the node never commits what it could still lose.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.catalogue.claims import LEASE, changed, free, new_token
from node.catalogue.db import Catalogue
from node.catalogue.models import (
    CommitmentRequest,
    CommitmentState,
    Delivery,
    DeliveryState,
    Instance,
    utcnow,
)
from node.core.settings import CommitmentSettings, ReportAddress
from node.core.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_ACTION_TYPE,
    PROCESSING_FAILURE,
    REASON_CLASS_INSTANCE_CONFLICT,
    REASON_NO_SUCH_OBJECT,
    REASON_PROCESSING_FAILURE,
    SUCCESS,
    UNRECOGNISED_OPERATION,
)
from node.core.uids import is_valid_uid
from node.dimse.association import Association, NormalisedAnswer, NormalisedRequest
from node.dimse.messages import N_ACTION_RQ
from node.dimse.normalised_data import BadDataSet, decode_data_set

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_SOP_CLASS = UID("1.2.840.10008.1.20.1")  # Push Model
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")  # its well-known instance
REQUEST_COMMITMENT = 1  # the one Action Type ID (PS3.4 J.3.2)
MAX_INSTANCES = 100_000  # per request: more is a broken or hostile requester
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID of the report (PS3.4 J.3.3)


@dataclass
class CommitmentRequests:
    """Serves N-ACTION (Request Storage Commitment) and persists each request."""

    catalogue: Catalogue
    settings: CommitmentSettings
    on_request: list[Callable[[], object]] = field(default_factory=list)  # wake the reporter
    report_to: Mapping[str, ReportAddress] | None = None  # live; else settings.report_to

    def handle(self, association: Association, request: NormalisedRequest) -> NormalisedAnswer:
        calling = association.requestor.calling_ae_title
        if request.command != N_ACTION_RQ:
            return NormalisedAnswer(UNRECOGNISED_OPERATION, "storage commitment is N-ACTION")
        if request.action_type != REQUEST_COMMITMENT:
            return NormalisedAnswer(NO_SUCH_ACTION_TYPE, "the only action type is 1")
        if request.sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
            return NormalisedAnswer(INVALID_ATTRIBUTE_VALUE, "not the well-known SOP instance")
        report_to = self.settings.report_to if self.report_to is None else self.report_to
        if calling not in report_to:
            # Accepting would promise an answer that could never be delivered.
            log.warning(
                "storage commitment from %s refused: no dicom.commitment.report_to entry",
                calling,
            )
            return NormalisedAnswer(
                PROCESSING_FAILURE, f"no report address configured for {calling}"
            )
        try:
            transaction, items = _parse(decode_data_set(request))
        except BadDataSet as exc:
            log.warning("storage commitment from %s refused: %s", calling, exc)
            return NormalisedAnswer(exc.status, str(exc))
        with self.catalogue.session() as session:
            known = session.scalar(
                select(CommitmentRequest.id).where(CommitmentRequest.transaction_uid == transaction)
            )
            if known is None:  # a repeated N-ACTION of a known transaction is answered once
                session.add(
                    CommitmentRequest(
                        transaction_uid=transaction,
                        calling_ae_title=calling[:16],
                        address=association.requestor.address[:64],
                        instances={"items": items},
                    )
                )
        log.info("storage commitment %s from %s: %d instance(s)", transaction, calling, len(items))
        for wake in self.on_request:
            wake()
        return NormalisedAnswer(SUCCESS)


def _parse(dataset: Dataset) -> tuple[str, list[list[str]]]:
    transaction = str(dataset.get("TransactionUID", "")).strip()
    if not transaction:
        raise BadDataSet(MISSING_ATTRIBUTE, "Transaction UID missing")
    if not is_valid_uid(transaction):
        raise BadDataSet(INVALID_ATTRIBUTE_VALUE, "invalid Transaction UID")
    if "ReferencedSOPSequence" not in dataset:
        raise BadDataSet(MISSING_ATTRIBUTE, "Referenced SOP Sequence missing")
    items: list[list[str]] = []
    for item in dataset.ReferencedSOPSequence:
        sop_class = str(item.get("ReferencedSOPClassUID", "")).strip()
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_uid)):
            raise BadDataSet(INVALID_ATTRIBUTE_VALUE, "a referenced SOP UID is invalid")
        items.append([sop_class, sop_uid])
    if len(items) > MAX_INSTANCES:
        raise BadDataSet(PROCESSING_FAILURE, f"more than {MAX_INSTANCES} instances")
    return transaction, items


# --- the state of a request: one owner ---------------------------------------------------


@dataclass(frozen=True)
class HeldRequest:
    """A pending request one reporter holds: what to answer, and to whom."""

    id: int
    token: str
    transaction_uid: str
    calling_ae_title: str
    address: str
    items: list[list[str]]
    created_at: datetime


def due(
    session: Session,
    now: datetime | None = None,
    ae_title: str | None = None,
    created_before: datetime | None = None,
) -> list[tuple[int, str]]:
    """(id, calling AE title) of the pending requests whose next attempt is due, oldest
    first; only ``ae_title``'s, and only those made by ``created_before``, when given."""
    query = (
        select(CommitmentRequest.id, CommitmentRequest.calling_ae_title)
        .where(CommitmentRequest.state == CommitmentState.PENDING)
        .where(CommitmentRequest.next_attempt_at <= (now or utcnow()))
        .order_by(CommitmentRequest.id)
    )
    if ae_title is not None:
        query = query.where(CommitmentRequest.calling_ae_title == ae_title)
    if created_before is not None:
        query = query.where(CommitmentRequest.created_at <= created_before)
    return [(int(id_), str(title)) for id_, title in session.execute(query)]


def claim(catalogue: Catalogue, request_id: int, lease: timedelta = LEASE) -> HeldRequest | None:
    """Take a pending request for one report attempt, or None if someone else holds it."""
    token, now = new_token(), utcnow()
    with catalogue.session() as session:
        taken = changed(
            session,
            update(CommitmentRequest)
            .where(CommitmentRequest.id == request_id)
            .where(CommitmentRequest.state == CommitmentState.PENDING)
            .where(free(CommitmentRequest.claim_token, CommitmentRequest.claimed_at, now, lease))
            .values(claim_token=token, claimed_at=now),
        )
    if not taken:
        return None
    with catalogue.session() as session:
        row = session.get(CommitmentRequest, request_id)
        assert row is not None
        return HeldRequest(
            row.id,
            token,
            row.transaction_uid,
            row.calling_ae_title,
            row.address,
            list(row.instances.get("items", [])),
            row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC),
        )


def answered(catalogue: Catalogue, held: HeldRequest, outcome: dict[str, Any]) -> bool:
    """Record that the requester accepted the report; False if the claim was lost."""
    with catalogue.session() as session:
        return bool(
            changed(
                session,
                update(CommitmentRequest)
                .where(CommitmentRequest.id == held.id)
                .where(CommitmentRequest.claim_token == held.token)
                .values(
                    state=CommitmentState.ANSWERED,
                    outcome=outcome,
                    answered_at=utcnow(),
                    attempts=CommitmentRequest.attempts + 1,
                    last_error=None,
                    claim_token=None,
                    claimed_at=None,
                ),
            )
        )


def release(catalogue: Catalogue, held: HeldRequest, error: str) -> None:
    """Give the claim back at once (the association that carried the report ended before
    its answer): the request is due again, for whichever way may still send it."""
    postpone(catalogue, held, 0.0, error)


def postpone(catalogue: Catalogue, held: HeldRequest, delay: float, error: str | None) -> None:
    """Release the claim and try again after ``delay`` seconds (a failed send, or instances
    still on their way to the archive)."""
    with catalogue.session() as session:
        values: dict[str, Any] = {
            "next_attempt_at": utcnow() + timedelta(seconds=delay),
            "claim_token": None,
            "claimed_at": None,
        }
        if error is not None:
            values["last_error"] = error[:500]
            values["attempts"] = CommitmentRequest.attempts + 1
        session.execute(
            update(CommitmentRequest)
            .where(CommitmentRequest.id == held.id)
            .where(CommitmentRequest.claim_token == held.token)
            .values(**values)
        )


# --- what is committed --------------------------------------------------------------------


@dataclass
class Verdict:
    """The report's content: committed instances, failed ones with a reason, and those
    still waiting for the archive (only with ``after_archived``)."""

    committed: list[list[str]] = field(default_factory=list)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)
    waiting: int = 0

    def outcome(self) -> dict[str, Any]:
        return {
            "committed": len(self.committed),
            "failed": [
                {"sop_instance_uid": uid, "reason": f"0x{code:04X}", "why": why}
                for _, uid, code, why in self.failed
            ],
        }


def judge(
    catalogue: Catalogue, spool_dir: Path, items: list[list[str]], after_archived: bool
) -> Verdict:
    """Which of ``items`` the node commits to, and why the others fail."""
    verdict = Verdict()
    uids = [uid for _, uid in items]
    with catalogue.session() as session:
        rows: dict[str, Instance] = {}
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            for stored in session.scalars(
                select(Instance).where(Instance.sop_instance_uid.in_(chunk))
            ):
                rows[stored.sop_instance_uid] = stored
        archived: set[int] = set()
        if after_archived:
            series_ids = {row.series_id for row in rows.values()}
            archived = set(
                session.scalars(
                    select(Delivery.series_id)
                    .where(Delivery.series_id.in_(series_ids))
                    .where(Delivery.state == DeliveryState.SENT)
                )
            )
        for sop_class, uid in items:
            row = rows.get(uid)
            if row is None:
                verdict.failed.append((sop_class, uid, REASON_NO_SUCH_OBJECT, "not received"))
            elif row.sop_class_uid != sop_class:
                verdict.failed.append(
                    (sop_class, uid, REASON_CLASS_INSTANCE_CONFLICT, "stored with another class")
                )
            elif not (spool_dir / row.path).is_file():
                verdict.failed.append(
                    (sop_class, uid, REASON_PROCESSING_FAILURE, "file missing from the spool")
                )
            elif after_archived and row.series_id not in archived:
                verdict.waiting += 1
                verdict.failed.append(
                    (sop_class, uid, REASON_PROCESSING_FAILURE, "not yet in the archive")
                )
            else:
                verdict.committed.append([sop_class, uid])
    return verdict


def ready_verdict(
    catalogue: Catalogue, spool_dir: Path, held: HeldRequest, settings: CommitmentSettings
) -> Verdict | None:
    """The report to send for a held request, or None when, with ``after_archived``, its
    instances are still on their way to the archive (the claim is then given back and the
    request looked at again after ``poll_seconds``, until ``archive_wait_seconds``)."""
    verdict = judge(catalogue, spool_dir, held.items, settings.after_archived)
    waited = (utcnow() - held.created_at).total_seconds()
    if verdict.waiting and waited < settings.archive_wait_seconds:
        postpone(catalogue, held, settings.poll_seconds, None)
        return None
    return verdict


def event_type(verdict: Verdict) -> int:
    return ALL_COMMITTED if not verdict.failed else SOME_FAILED


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
