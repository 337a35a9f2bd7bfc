"""Deliveries: the one place where a delivery is created or changes state.

A delivery sends one result, or one forwarded series, to one destination. It is created
once (unique per result or series and destination, however often the stage that asks for it
runs), sent by whoever holds its claim, and then marked sent, or failed and retried until it
is dead-lettered; an admin may re-queue a dead-lettered one, and a late-instance re-run
sends the forwards again.

The claim is a conditional UPDATE on the row (state still pending, nobody holding it, or a
holder whose lease ran out because its worker died), so two executions of one send task, on
two workers, send once: the loser sees that someone else holds or has finished it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from node.catalogue.claims import LEASE, Claimed, changed, free, new_token
from node.catalogue.db import Catalogue
from node.catalogue.models import (
    Delivery,
    DeliveryState,
    Instance,
    PipelineRun,
    Result,
    utcnow,
)
from node.core.metrics import DELIVERY_FAILURES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryClaim:
    """One sender's hold on one delivery, and what it is to send where."""

    delivery_id: int
    outcome: Claimed
    token: str | None = None
    destination: str = ""
    result_path: str | None = None  # relative to the results folder
    series_paths: tuple[str, ...] = ()  # relative to the spool, in instance order
    series_instances: tuple[int, ...] = ()  # their catalogue ids, recorded as sent


def create_forwards(session: Session, series_id: int, forward: Mapping[str, str]) -> list[int]:
    """A delivery of the original series to each forward destination (``{name: rule}``),
    created once; return the ids of those still pending."""
    ids = []
    for destination, rule in forward.items():
        delivery = session.scalar(
            select(Delivery).where(
                Delivery.series_id == series_id, Delivery.destination == destination
            )
        )
        if delivery is None:
            delivery = Delivery(series_id=series_id, destination=destination, rule=rule)
            session.add(delivery)
            session.flush()
        if delivery.state in (None, DeliveryState.PENDING):
            ids.append(delivery.id)
    return ids


def create_for_results(
    session: Session,
    results: Iterable[Result],
    destinations: Iterable[str],
    rules: Mapping[str, str],
) -> list[int]:
    """A delivery of each result to each destination, created once (``rules`` names the
    routing rule that asked for a destination); return the ids of those still pending."""
    ids = []
    names = list(destinations)
    for result in results:
        for name in names:
            delivery = session.scalar(
                select(Delivery).where(
                    Delivery.result_id == result.id, Delivery.destination == name
                )
            )
            if delivery is None:
                delivery = Delivery(result_id=result.id, destination=name, rule=rules.get(name))
                session.add(delivery)
                session.flush()
            if delivery.state == DeliveryState.PENDING:
                ids.append(delivery.id)
    return ids


def all_sent(session: Session, run_id: int) -> bool:
    """Whether every delivery of the run's results has been sent (true when it has none)."""
    unsent = session.scalar(
        select(Delivery.id)
        .join(Result, Delivery.result_id == Result.id)
        .where(Result.run_id == run_id, Delivery.state != DeliveryState.SENT)
        .limit(1)
    )
    return unsent is None


def never_tried(session: Session, run_id: int | None = None) -> list[int]:
    """Deliveries recorded but never tried (a crash between commit and queueing), all of
    them or those of one run (its results and its series' forwards)."""
    query = select(Delivery.id).where(
        Delivery.state == DeliveryState.PENDING, Delivery.attempts == 0
    )
    if run_id is not None:
        results = select(Result.id).where(Result.run_id == run_id)
        series = select(PipelineRun.series_id).where(PipelineRun.id == run_id)
        query = query.where(or_(Delivery.result_id.in_(results), Delivery.series_id.in_(series)))
    return list(session.scalars(query.order_by(Delivery.id)))


def reset_forwards(session: Session, series_id: int) -> None:
    """Send the series' forwards again: its late instances go, what was sent stays sent."""
    session.execute(
        update(Delivery)
        .where(Delivery.series_id == series_id)
        .values(state=DeliveryState.PENDING, attempts=0, claim_token=None, claimed_at=None)
        .execution_options(synchronize_session="fetch")
    )


def claim(catalogue: Catalogue, delivery_id: int, lease: timedelta = LEASE) -> DeliveryClaim:
    """Take the delivery for one send, counting the attempt; committed before returning,
    so every other sender sees it. Only a pending delivery that nobody holds (or whose
    holder's lease ran out) is claimed."""
    token = new_token()
    now = utcnow()
    with catalogue.session() as session:
        won = changed(
            session,
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .where(Delivery.state == DeliveryState.PENDING)
            .where(free(Delivery.claim_token, Delivery.claimed_at, now, lease))
            .values(claim_token=token, claimed_at=now, attempts=Delivery.attempts + 1)
            .execution_options(synchronize_session=False),
        )
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return DeliveryClaim(delivery_id, Claimed.GONE)
        if not won:
            if delivery.state == DeliveryState.SENT:
                return DeliveryClaim(delivery_id, Claimed.DONE)
            if delivery.state == DeliveryState.FAILED:
                return DeliveryClaim(delivery_id, Claimed.GONE)
            return DeliveryClaim(delivery_id, Claimed.BUSY)
        session.refresh(delivery)
        if delivery.result is not None:
            return DeliveryClaim(
                delivery_id,
                Claimed.CLAIMED,
                token,
                delivery.destination,
                result_path=delivery.result.path,
            )
        sent = set(delivery.sent_instances or [])
        rows = [
            (instance_id, path)
            for instance_id, path in session.execute(
                select(Instance.id, Instance.path)
                .where(Instance.series_id == delivery.series_id)
                .order_by(Instance.instance_number, Instance.id)
            )
            if instance_id not in sent
        ]
        if not rows:  # every object went already (an earlier send, other associations)
            delivery.state, delivery.sent_at = DeliveryState.SENT, utcnow()
            delivery.claim_token = delivery.claimed_at = None
            return DeliveryClaim(delivery_id, Claimed.DONE)
        return DeliveryClaim(
            delivery_id,
            Claimed.CLAIMED,
            token,
            delivery.destination,
            series_paths=tuple(path for _, path in rows),
            series_instances=tuple(instance_id for instance_id, _ in rows),
        )


def renew(catalogue: Catalogue, held: DeliveryClaim) -> bool:
    """Extend the claim while sending; False when it is no longer ours."""
    with catalogue.session() as session:
        return bool(
            changed(
                session,
                update(Delivery)
                .where(Delivery.id == held.delivery_id, Delivery.claim_token == held.token)
                .values(claimed_at=utcnow())
                .execution_options(synchronize_session=False),
            )
        )


def release(catalogue: Catalogue, held: DeliveryClaim) -> None:
    """Give the claim up without an outcome (the send broke off unexpectedly): the
    delivery stays pending for the next attempt."""
    with catalogue.session() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == held.delivery_id, Delivery.claim_token == held.token)
            .values(claim_token=None, claimed_at=None)
            .execution_options(synchronize_session=False)
        )


def mark_sent(session: Session, held: DeliveryClaim) -> int | None:
    """Record the send and release the claim; return the id of the run whose result it was
    (None for a forwarded series, whose objects sent are recorded: each goes once, however
    many times late objects send the series' forwards again). A claim that was taken over
    meanwhile is logged: the destination got the object, and the holder records its own
    outcome."""
    values: dict[str, object] = {}
    if held.series_instances:
        before = session.scalar(
            select(Delivery.sent_instances).where(Delivery.id == held.delivery_id)
        )
        values["sent_instances"] = sorted(set(before or []) | set(held.series_instances))
    done = changed(
        session,
        update(Delivery)
        .where(Delivery.id == held.delivery_id, Delivery.claim_token == held.token)
        .values(
            state=DeliveryState.SENT,
            sent_at=utcnow(),
            last_error=None,
            claim_token=None,
            claimed_at=None,
            **values,
        )
        .execution_options(synchronize_session=False),
    )
    if not done:
        log.warning("delivery %d: sent, but its claim had been taken over", held.delivery_id)
    return _run_of(session, held.delivery_id)


@dataclass(frozen=True)
class Failure:
    """A failed send as recorded: attempts so far, and whether it is now dead-lettered."""

    attempts: int
    final: bool
    error: str = ""
    destination: str = ""
    run_id: int | None = None  # the run whose result it was


def record_failure(
    session: Session, held: DeliveryClaim, error: str, max_attempts: int
) -> Failure | None:
    """Record a failed send and release the claim, dead-lettering it after ``max_attempts``;
    None when the claim was taken over meanwhile (the new holder records the outcome)."""
    delivery = session.get(Delivery, held.delivery_id)
    if delivery is None:
        return Failure(0, True, error)
    final = delivery.attempts >= max_attempts
    done = changed(
        session,
        update(Delivery)
        .where(Delivery.id == held.delivery_id, Delivery.claim_token == held.token)
        .values(
            last_error=error[:2000],
            state=DeliveryState.FAILED if final else DeliveryState.PENDING,
            claim_token=None,
            claimed_at=None,
        )
        .execution_options(synchronize_session="fetch"),
    )
    if not done:
        return None
    DELIVERY_FAILURES.labels(delivery.destination).inc()
    return Failure(
        delivery.attempts, final, error, delivery.destination, _run_of(session, delivery.id)
    )


def requeue_failed(session: Session, delivery_id: int) -> tuple[dict[str, object], int | None]:
    """Put a dead-lettered delivery back to pending with the full retry budget; return what
    it was (for the audit trail) and the run whose result it is. Only a failed one: a sent
    one is never sent again (ValueError), an unknown one is a LookupError."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise LookupError(f"no delivery {delivery_id}")
    if delivery.state != DeliveryState.FAILED:
        raise ValueError(f"delivery {delivery_id} is {delivery.state.value}, not failed")
    before: dict[str, object] = {
        "state": "failed",
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
    }
    requeued = changed(
        session,
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.FAILED)
        .values(state=DeliveryState.PENDING, attempts=0, claim_token=None, claimed_at=None)
        .execution_options(synchronize_session="fetch"),
    )
    if not requeued:  # re-queued by someone else in between
        raise ValueError(f"delivery {delivery_id} is pending, not failed")
    return before, _run_of(session, delivery_id)


def _run_of(session: Session, delivery_id: int) -> int | None:
    return session.scalar(
        select(Result.run_id)
        .join(Delivery, Delivery.result_id == Result.id)
        .where(Delivery.id == delivery_id)
    )
