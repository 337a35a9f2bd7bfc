"""Claims: how one worker takes a row (a run's stage, a delivery) for itself, atomically.

A claim is a conditional UPDATE: the row in the state the work expects, and nobody holding
it or a holder whose lease ran out because its worker died. It is committed before the
work starts, so it is atomic on SQLite and PostgreSQL alike, and the outcome is recorded
only by an UPDATE that still finds the holder's token. The run and delivery owners
(:mod:`node.workflow.runs`, :mod:`node.delivery.deliveries`) build their claims from these
pieces.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Update, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

log = logging.getLogger(__name__)

#: How long a claim stands without being renewed; a holder renews it every third of that.
LEASE = timedelta(seconds=30)
RENEW_EVERY = LEASE.total_seconds() / 3


class Claimed(StrEnum):
    """What an attempt to claim a row found."""

    CLAIMED = "claimed"  # ours to work on
    DONE = "done"  # the work is recorded (a stage's outcome, a send): go on
    BUSY = "busy"  # another execution holds it and is alive: wait for its outcome
    GONE = "gone"  # unknown, failed, dead-lettered, or not ready: nothing to do


def new_token() -> str:
    """A holder's token: the outcome is recorded only where the row still carries it."""
    return uuid.uuid4().hex


def free(
    token: InstrumentedAttribute[str | None],
    claimed_at: InstrumentedAttribute[datetime | None],
    now: datetime,
    lease: timedelta,
) -> ColumnElement[bool]:
    """The condition of a claimable row: nobody holds it, or its holder's lease ran out."""
    return or_(token.is_(None), claimed_at < now - lease)


def changed(session: Session, statement: Update) -> int:
    """How many rows a conditional UPDATE changed: 0 when its condition no longer held."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


@contextmanager
def keep_alive(
    renew_claim: Callable[[], bool], every: float = RENEW_EVERY
) -> Iterator[threading.Event]:
    """Renew a claim every ``every`` seconds while the block runs, so that only a dead
    holder's claim runs out. The event yielded is set once the claim was lost."""
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                if not renew_claim():
                    lost.set()
                    return
            except Exception as exc:  # the catalogue unreachable for a moment: try again
                log.warning("could not renew a claim: %s", exc)

    thread = threading.Thread(target=beat, name="claim-renewal", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
