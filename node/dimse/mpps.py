"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET of MPPS instances.

A modality creates a step when it starts acquiring (IN PROGRESS) and sets it COMPLETED or
DISCONTINUED at the end, listing in its Performed Series Sequence every instance it
produced. That list is what the completion watcher needs to complete a series the moment
its last listed instance is stored, instead of waiting out a quiet period. Each step is kept
in the catalogue (UIDs and status only, no patient data), so the API and dashboard can show
what a series still misses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from sqlalchemy import delete, select, update

from node.catalogue.db import Catalogue
from node.catalogue.models import (
    CompletionSignal,
    MppsForward,
    PerformedStep,
    StepStatus,
    utcnow,
)
from node.core.status import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    UNRECOGNISED_OPERATION,
)
from node.core.uids import is_valid_uid
from node.dimse.association import Association, NormalisedAnswer, NormalisedRequest
from node.dimse.messages import N_CREATE_RQ, N_SET_RQ
from node.dimse.normalised_data import BadDataSet, decode_data_set

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = UID("1.2.840.10008.3.1.2.3.3")  # Modality Performed Procedure Step
FINAL = (StepStatus.COMPLETED, StepStatus.DISCONTINUED)
MPPS = "mpps"  # the completion signal's name


def performed_series(dataset: Dataset) -> dict[str, list[str]]:
    """Series Instance UID -> the SOP Instance UIDs a step lists for it (images and
    non-image objects, PS3.3 C.4.15)."""
    listed: dict[str, list[str]] = {}
    for item in dataset.get("PerformedSeriesSequence", []):
        series_uid = str(item.get("SeriesInstanceUID", "")).strip()
        if not is_valid_uid(series_uid):
            raise BadDataSet(INVALID_ATTRIBUTE_VALUE, "a performed series without a valid UID")
        uids = listed.setdefault(series_uid, [])
        for sequence in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            for ref in item.get(sequence, []):
                sop_uid = str(ref.get("ReferencedSOPInstanceUID", "")).strip()
                if not is_valid_uid(sop_uid):
                    raise BadDataSet(
                        INVALID_ATTRIBUTE_VALUE, "a referenced instance UID is invalid"
                    )
                uids.append(sop_uid)
    return listed


def _status(dataset: Dataset) -> StepStatus | None:
    value = str(dataset.get("PerformedProcedureStepStatus", "")).strip().upper()
    if not value:
        return None
    try:
        return StepStatus(value)
    except ValueError:
        raise BadDataSet(INVALID_ATTRIBUTE_VALUE, f"unknown step status {value[:16]!r}") from None


def _study_uid(dataset: Dataset) -> str | None:
    for item in dataset.get("ScheduledStepAttributesSequence", []):
        value = str(item.get("StudyInstanceUID", "")).strip()
        if is_valid_uid(value):
            return value
    return None


def _signals(step: PerformedStep, now: datetime) -> list[CompletionSignal]:
    """An ended step completes each series it lists once the listed instances are stored."""
    return [
        CompletionSignal(
            series_instance_uid=series_uid,
            signal=MPPS,
            at=now,
            expected={"sop_instance_uids": uids},
            source=step.sop_instance_uid,
        )
        for series_uid, uids in step.performed_series.items()
        if uids
    ]


@dataclass
class PerformedSteps:
    """Serves N-CREATE / N-SET on MPPS instances against the catalogue; with ``forward``,
    each accepted request is also queued for the configured RIS/PACS in the same
    transaction."""

    catalogue: Catalogue
    forward: bool = False

    def handle(self, association: Association, request: NormalisedRequest) -> NormalisedAnswer:
        try:
            dataset = decode_data_set(request)
            if request.command == N_CREATE_RQ:
                return self._create(association, request, dataset)
            if request.command == N_SET_RQ:
                return self._set(request, dataset)
        except BadDataSet as exc:
            log.warning(
                "MPPS request from %s refused: %s", association.requestor.calling_ae_title, exc
            )
            return NormalisedAnswer(exc.status, str(exc))
        return NormalisedAnswer(UNRECOGNISED_OPERATION, "MPPS takes N-CREATE and N-SET only")

    def _create(
        self, association: Association, request: NormalisedRequest, dataset: Dataset
    ) -> NormalisedAnswer:
        uid = request.sop_instance_uid
        if not uid:  # the SCU may leave the UID to the SCP (PS3.4 F.7.2.1)
            uid = generate_uid(prefix="2.25.")
        if not is_valid_uid(uid):
            return NormalisedAnswer(INVALID_ATTRIBUTE_VALUE, "invalid SOP Instance UID")
        status = _status(dataset)
        if status != StepStatus.IN_PROGRESS:
            return NormalisedAnswer(
                INVALID_ATTRIBUTE_VALUE, "a new step's status must be IN PROGRESS"
            )
        now = datetime.now(UTC)
        with self.catalogue.session() as session:
            known = session.scalar(
                select(PerformedStep.id).where(PerformedStep.sop_instance_uid == uid)
            )
            if known is not None:
                return NormalisedAnswer(DUPLICATE_SOP_INSTANCE, "this step exists already")
            session.add(
                PerformedStep(
                    sop_instance_uid=uid,
                    calling_ae_title=association.requestor.calling_ae_title[:16],
                    status=status,
                    study_instance_uid=_study_uid(dataset),
                    performed_series=performed_series(dataset),
                    created_at=now,
                    updated_at=now,
                )
            )
            if self.forward:
                session.add(MppsForward(step_uid=uid, command="n-create", data=_json(dataset)))
        log.info("MPPS %s created by %s", uid, association.requestor.calling_ae_title)
        return NormalisedAnswer(SUCCESS, sop_instance_uid=uid)

    def _set(self, request: NormalisedRequest, dataset: Dataset) -> NormalisedAnswer:
        uid = request.sop_instance_uid
        status = _status(dataset)
        listed = performed_series(dataset) if "PerformedSeriesSequence" in dataset else None
        now = datetime.now(UTC)
        with self.catalogue.session() as session:
            step = session.scalar(
                select(PerformedStep).where(PerformedStep.sop_instance_uid == uid).with_for_update()
            )
            if step is None:
                return NormalisedAnswer(NO_SUCH_SOP_INSTANCE, "no such performed procedure step")
            if step.status in FINAL:
                # PS3.4 F.7.2.2.2: a step that ended may no longer be updated
                return NormalisedAnswer(PROCESSING_FAILURE, "the step has ended already")
            if status is not None:
                step.status = status
            if listed is not None:
                step.performed_series = listed  # N-SET replaces a sequence whole
            study = _study_uid(dataset)
            if study is not None:
                step.study_instance_uid = study
            step.updated_at = now
            if step.status in FINAL:
                step.ended_at = now
                session.add_all(_signals(step, now))
            if self.forward:
                session.add(MppsForward(step_uid=uid, command="n-set", data=_json(dataset)))
            outcome = step.status
        log.info("MPPS %s set %s", uid, outcome)
        return NormalisedAnswer(SUCCESS)


def _json(dataset: Dataset) -> dict[str, object]:
    return dict(dataset.to_json_dict())


# --- forwards to a RIS/PACS: the one owner of their state ---------------------------------


@dataclass(frozen=True)
class PendingForward:
    id: int
    step_uid: str
    command: str
    data: dict[str, object]


def pending_forwards(catalogue: Catalogue, limit: int = 100) -> list[PendingForward]:
    """Forwards not yet sent whose next attempt is due, in the order they were accepted.
    A step with an earlier forward still pending is not skipped past: its later ones wait."""
    now = utcnow()
    with catalogue.session() as session:
        rows = session.scalars(
            select(MppsForward)
            .where(MppsForward.sent_at.is_(None))
            .order_by(MppsForward.id)
            .limit(limit)
        ).all()
        due, blocked = [], set()
        for row in rows:
            ready = _aware(row.next_attempt_at) <= now
            if row.step_uid not in blocked and ready:
                due.append(PendingForward(row.id, row.step_uid, row.command, dict(row.data)))
            else:
                blocked.add(row.step_uid)
        return due


def forward_sent(catalogue: Catalogue, forward_id: int) -> None:
    with catalogue.session() as session:
        session.execute(
            update(MppsForward)
            .where(MppsForward.id == forward_id, MppsForward.sent_at.is_(None))
            .values(sent_at=utcnow(), attempts=MppsForward.attempts + 1, last_error=None)
        )


def forward_failed(catalogue: Catalogue, forward_id: int, error: str, delay: float) -> None:
    with catalogue.session() as session:
        session.execute(
            update(MppsForward)
            .where(MppsForward.id == forward_id, MppsForward.sent_at.is_(None))
            .values(
                attempts=MppsForward.attempts + 1,
                last_error=error[:500],
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )
        )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def prune_forwards(catalogue: Catalogue, before: datetime) -> int:
    """Remove the records of forwards sent before ``before``; those not yet sent stay,
    however old. Returns how many were removed."""
    with catalogue.session() as session:
        result = session.execute(
            delete(MppsForward)
            .where(MppsForward.sent_at.is_not(None))
            .where(MppsForward.sent_at < before)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
