"""Pipeline runs: the one place where a run is created or changes state.

A run is created once per run key (series, model) when its series completes, or on purpose
as a re-run (late instances, or an admin's request); it is queued, then each stage
(prepare, analyse, report) CLAIMS it before working, and records its outcome only while it
still holds the claim. Deliveries then finish it, or a failure fails it.

A claim is a conditional UPDATE (the run in the state the stage expects, nobody holding it,
or a holder whose lease ran out because its worker died), committed before the work starts,
so it is atomic on SQLite and PostgreSQL alike. A second execution of the same stage for the
same run (a redelivered task, a time-out) finds the run held or done and does nothing: one
analysis, one report, whatever the broker delivers twice. A holder renews its claim while it
works (:func:`node.catalogue.claims.keep_alive`), so only a dead worker's claim is ever taken over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from node.catalogue.claims import LEASE, Claimed, changed, free, new_token
from node.catalogue.db import Catalogue
from node.catalogue.models import PipelineRun, Result, RunState, Series, SeriesState, utcnow
from node.delivery import deliveries

log = logging.getLogger(__name__)

Stage = Literal["prepare", "analyse", "report"]
Enqueue = Callable[[int, int], object]  # (run id, priority 0-9)


@dataclass(frozen=True)
class RunClaim:
    """One stage execution's hold on one run."""

    run_id: int
    stage: Stage
    outcome: Claimed
    token: str | None = None


@dataclass(frozen=True)
class ResultFile:
    """A DICOM object a stage wrote for a run, to be recorded with the stage's outcome."""

    kind: str  # sr | seg
    part: str  # which one of the run's objects of that kind: SR part, SEG head
    sop_instance_uid: str
    series_instance_uid: str
    path: str  # relative to the results folder
    summary: str | None = None


# --- creating and queueing ------------------------------------------------------------------


def create(session: Session, series: Series, run_key: str) -> PipelineRun | None:
    """The series' run for ``run_key``, created and queued; None when it exists already
    (the same series and model are analysed once; the key is unique, so a concurrent
    creation fails its transaction rather than make a second run)."""
    if session.scalar(select(PipelineRun.id).where(PipelineRun.run_key == run_key)) is not None:
        return None
    return _insert(session, series, run_key)


def create_rerun(
    session: Session,
    series: Series,
    reason: Literal["rerun", "late"],
    requested_by: str,
    first_key: str | None = None,
) -> PipelineRun:
    """A new run of a series that supersedes its latest one (its SR cites the one before).

    Keyed ``<first run's key>#<reason><number of runs so far>`` (``first_key`` stands in
    for a series never analysed), so two requests at the same moment cannot make two runs:
    the second fails on the unique key.
    """
    runs = sorted(series.runs, key=lambda r: r.id)
    if not runs and first_key is None:
        raise LookupError(f"series {series.series_instance_uid} has no run to supersede")
    base = runs[0].run_key if runs else first_key
    return _insert(
        session,
        series,
        f"{base}#{reason}{len(runs)}",
        rerun_of=runs[-1].id if runs else None,
        requested_by=requested_by[:64],
    )


def _insert(session: Session, series: Series, run_key: str, **fields: Any) -> PipelineRun:
    run = PipelineRun(series=series, run_key=run_key, state=RunState.QUEUED, **fields)
    session.add(run)
    session.flush()
    return run


def unsent(session: Session) -> list[int]:
    """Runs committed but never handed to the broker (a crash, or the broker was down)."""
    return list(
        session.scalars(
            select(PipelineRun.id)
            .where(PipelineRun.state == RunState.QUEUED)
            .where(PipelineRun.enqueued_at.is_(None))
            .order_by(PipelineRun.id)
        )
    )


def send(catalogue: Catalogue, run_ids: Iterable[int], enqueue: Enqueue) -> None:
    """Hand committed runs to the broker, at their series' priority, and note when.

    The run is committed before and marked after, so a crash in between leaves it unsent
    (and :func:`unsent` finds it); sending one twice is harmless, its stages are claimed.
    """
    for run_id in run_ids:
        with catalogue.session() as session:
            run = session.get(PipelineRun, run_id)
            priority = run.series.priority if run is not None else 0
        enqueue(run_id, priority or 0)
        with catalogue.session() as session:
            session.execute(
                update(PipelineRun)
                .where(PipelineRun.id == run_id)
                .values(enqueued_at=utcnow())
                .execution_options(synchronize_session=False)
            )


# --- claiming a stage -----------------------------------------------------------------------


def _claimable(stage: Stage) -> ColumnElement[bool]:
    if stage == "prepare":
        return and_(PipelineRun.state == RunState.QUEUED, PipelineRun.inferred_at.is_(None))
    if stage == "analyse":
        return and_(
            PipelineRun.state.in_([RunState.QUEUED, RunState.RUNNING]),
            PipelineRun.inferred_at.is_(None),
        )
    return and_(
        PipelineRun.state.in_([RunState.QUEUED, RunState.RUNNING]),
        PipelineRun.inferred_at.is_not(None),
    )


#: Run states after which analysing has nothing left to do.
_ENDED = (RunState.REPORTED, RunState.SUCCEEDED, RunState.NOT_ANALYSED)


def _found(stage: Stage, run: PipelineRun | None) -> Claimed:
    """Why a claim was not won: done, held by a live holder, or nothing to do."""
    if run is None or run.state == RunState.FAILED:
        return Claimed.GONE
    if stage == "prepare":
        done = run.state != RunState.QUEUED or run.inferred_at is not None
    elif stage == "analyse":
        done = run.inferred_at is not None or run.state in _ENDED
    else:
        if run.inferred_at is None:
            return Claimed.GONE  # not analysed: there is nothing to report
        done = run.state in (RunState.REPORTED, RunState.SUCCEEDED)
    return Claimed.DONE if done else Claimed.BUSY


def claim(catalogue: Catalogue, run_id: int, stage: Stage, lease: timedelta = LEASE) -> RunClaim:
    """Claim the run for ``stage``; committed before returning. Analysing marks the run
    running and its series processing."""
    token = new_token()
    now = utcnow()
    values: dict[str, Any] = {"claim_stage": stage, "claim_token": token, "claimed_at": now}
    if stage == "analyse":
        values |= {"state": RunState.RUNNING, "started_at": now}
    with catalogue.session() as session:
        won = changed(
            session,
            update(PipelineRun)
            .where(PipelineRun.id == run_id)
            .where(_claimable(stage))
            .where(free(PipelineRun.claim_token, PipelineRun.claimed_at, now, lease))
            .values(**values)
            .execution_options(synchronize_session=False),
        )
        run = session.get(PipelineRun, run_id)
        if not won:
            return RunClaim(run_id, stage, _found(stage, run))
        if stage == "analyse":
            _series_state(session, run_id, SeriesState.PROCESSING)
    return RunClaim(run_id, stage, Claimed.CLAIMED, token)


def renew(catalogue: Catalogue, held: RunClaim) -> bool:
    """Extend the claim while working; False when it is no longer ours."""
    with catalogue.session() as session:
        return _holding(session, held, claimed_at=utcnow())


def release(catalogue: Catalogue, held: RunClaim) -> bool:
    """Give the claim up, the stage's work done (prepare: nothing to record)."""
    with catalogue.session() as session:
        return _holding(session, held, **_RELEASED)


_RELEASED: dict[str, Any] = {"claim_stage": None, "claim_token": None, "claimed_at": None}


def _holding(session: Session, held: RunClaim, **values: Any) -> bool:
    """Change the run only while ``held`` is still its claim; the first statement of a
    transaction, so it also takes the row's write lock for the rest of it."""
    return bool(
        changed(
            session,
            update(PipelineRun)
            .where(PipelineRun.id == held.run_id, PipelineRun.claim_token == held.token)
            .values(**values)
            .execution_options(synchronize_session="fetch"),
        )
    )


# --- recording a stage's outcome ------------------------------------------------------------


def record_inferred(
    session: Session,
    held: RunClaim,
    findings: dict[str, Any],
    backbone: str,
    heads: str,
    results: Iterable[ResultFile] = (),
) -> bool:
    """Store the findings (and the SEGs made with them) and release the claim; False, and
    nothing stored, when the claim was taken over."""
    if not _holding(
        session,
        held,
        findings=findings,
        backbone=backbone,
        heads=heads,
        inferred_at=utcnow(),
        **_RELEASED,
    ):
        return False
    _add_results(session, held.run_id, results)
    return True


def record_reported(session: Session, held: RunClaim, results: Iterable[ResultFile]) -> bool:
    """Record the run's SRs, mark it reported and release the claim; False, and nothing
    recorded, when the claim was taken over. The caller creates the deliveries and then
    calls :func:`finish_if_delivered` in the same transaction."""
    if not _holding(session, held, state=RunState.REPORTED, **_RELEASED):
        return False
    _add_results(session, held.run_id, results)
    return True


def finish_empty(session: Session, held: RunClaim) -> bool:
    """No head applies to the series: nothing to report, the run is done."""
    if not _holding(session, held, **_RELEASED):
        return False
    _finish(session, held.run_id, [RunState.RUNNING, RunState.QUEUED])
    return True


def not_analysed(session: Session, held: RunClaim, reason: str) -> bool:
    """No head applies to the run's series (not an image, a localizer, a stack no head
    accepts): the run ends ``not_analysed`` and its series too, with ``reason``.

    Terminal and not a failure: no error, no retry, nothing counted as failed, one INFO
    line. False, and nothing changed, when the claim was taken over (its holder decides).
    """
    if not _holding(
        session, held, state=RunState.NOT_ANALYSED, finished_at=utcnow(), error=None, **_RELEASED
    ):
        return False
    _series_state(session, held.run_id, SeriesState.NOT_ANALYSED, reason)
    series_id = session.scalar(select(PipelineRun.series_id).where(PipelineRun.id == held.run_id))
    log.info("series %s not analysed (run %d): %s", series_id, held.run_id, reason)
    return True


def finish_if_delivered(session: Session, run_id: int | None) -> None:
    """Mark a reported run succeeded (and its series done) once all its results are sent."""
    if run_id is not None and deliveries.all_sent(session, run_id):
        _finish(session, run_id, [RunState.REPORTED])


def _finish(session: Session, run_id: int, states: list[RunState]) -> None:
    finished = changed(
        session,
        update(PipelineRun)
        .where(PipelineRun.id == run_id, PipelineRun.state.in_(states))
        .values(state=RunState.SUCCEEDED, finished_at=utcnow())
        .execution_options(synchronize_session="fetch"),
    )
    if finished:
        _series_state(session, run_id, SeriesState.DONE, _set_aside(session, run_id))


def _set_aside(session: Session, run_id: int) -> str | None:
    """What of a partly analysed series no head read (a localizer, a sagittal stack when
    every head is axial-only), said on the series beside its done state, as a series
    that nothing could be read of says it in its not-analysed reason."""
    findings = session.scalar(select(PipelineRun.findings).where(PipelineRun.id == run_id))
    aside = [str(item) for item in (findings or {}).get("set_aside", [])]
    return "not analysed: " + "; ".join(aside) if aside else None


def fail(catalogue: Catalogue, run_id: int, error: str, held: RunClaim | None = None) -> bool:
    """Fail the run (and its series) with ``error``. With a claim, only while it is still
    ours: a stage execution that lost its claim does not fail the run its holder works on."""
    values: dict[str, Any] = {
        "state": RunState.FAILED,
        "error": error[:2000],
        "finished_at": utcnow(),
        **_RELEASED,
    }
    with catalogue.session() as session:
        query = update(PipelineRun).where(PipelineRun.id == run_id)
        if held is not None and held.token is not None:
            query = query.where(PipelineRun.claim_token == held.token)
        failed = changed(
            session, query.values(**values).execution_options(synchronize_session=False)
        )
        if failed:
            _series_state(session, run_id, SeriesState.FAILED)
        return bool(failed)


def fail_delivery(session: Session, run_id: int | None, destination: str, error: str) -> None:
    """A result's delivery was dead-lettered: the run failed (a re-queue reopens it)."""
    if run_id is None:
        return
    session.execute(
        update(PipelineRun)
        .where(PipelineRun.id == run_id)
        .values(state=RunState.FAILED, error=f"delivery to {destination} failed: {error}"[:2000])
        .execution_options(synchronize_session="fetch")
    )


def reopen(session: Session, run_id: int | None) -> None:
    """A dead-lettered delivery of the run was re-queued: it is reported again, awaiting it."""
    if run_id is None:
        return
    session.execute(
        update(PipelineRun)
        .where(PipelineRun.id == run_id)
        .values(state=RunState.REPORTED, error=None)
        .execution_options(synchronize_session="fetch")
    )


def _add_results(session: Session, run_id: int, results: Iterable[ResultFile]) -> None:
    for item in results:
        session.add(
            Result(
                run_id=run_id,
                kind=item.kind,
                part=item.part,
                sop_instance_uid=item.sop_instance_uid,
                series_instance_uid=item.series_instance_uid,
                path=item.path,
                summary=item.summary,
            )
        )
    session.flush()


def _series_state(
    session: Session, run_id: int, state: SeriesState, reason: str | None = None
) -> None:
    """Set the run's series' state; the reason of an earlier state goes with it."""
    series_id = select(PipelineRun.series_id).where(PipelineRun.id == run_id).scalar_subquery()
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(state=state, state_reason=reason[:2000] if reason else None)
        .execution_options(synchronize_session="fetch")
    )
