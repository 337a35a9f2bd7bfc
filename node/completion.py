"""The study-completion watcher: a series is complete after a quiet period.

It turns a quiet series into a queued pipeline run, after the routing rules on its DICOM
attributes have decided its priority, whether it is discarded, and where the original is
forwarded (forwards are sent at once, not after inference). The run row is committed
before the task is sent and marked sent afterwards, so a crash between the two is repaired
at start by re-sending every run that was never sent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import (
    Delivery,
    DeliveryState,
    PipelineRun,
    RunState,
    Series,
    SeriesState,
)
from node.router import Router, forward_deliveries

log = logging.getLogger(__name__)

Enqueue = Callable[[int, int], object]  # (run id, priority 0-9)
EnqueueDelivery = Callable[[int], object]


class CompletionWatcher:
    def __init__(
        self,
        catalogue: Catalogue,
        enqueue: Enqueue,
        run_key: Callable[[Series], str],
        quiet_seconds: float,
        poll_seconds: float,
        router: Router | None = None,
        enqueue_delivery: EnqueueDelivery | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.router = router
        self.enqueue_delivery = enqueue_delivery
        self.enqueue = enqueue
        self.run_key = run_key
        self.quiet = timedelta(seconds=quiet_seconds)
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def complete_quiet_series(self, now: datetime | None = None) -> list[int]:
        """Mark quiet series complete, create their runs and send them; return run ids."""
        cutoff = (now or datetime.now(UTC)) - self.quiet
        run_ids: list[int] = []
        forward_ids: list[int] = []
        with self.catalogue.session() as session:
            quiet = session.scalars(
                select(Series)
                .where(Series.state == SeriesState.RECEIVING)
                .where(Series.last_received_at <= cutoff)
                .with_for_update(skip_locked=True)
            ).all()
            for series in quiet:
                series.state = SeriesState.COMPLETE
                series.completed_at = datetime.now(UTC)
                if self.router is not None:
                    decision = self.router.decide(session, series)
                    if decision.discard:
                        series.state = SeriesState.DONE
                        log.info("series %d discarded by rule(s) %s", series.id, decision.fired)
                        continue
                    forward_ids += forward_deliveries(session, series, decision)
                key = self.run_key(series)
                existing = session.scalar(select(PipelineRun).where(PipelineRun.run_key == key))
                if existing is not None:
                    continue
                run = PipelineRun(series=series, run_key=key, state=RunState.QUEUED)
                session.add(run)
                session.flush()
                run_ids.append(run.id)
                log.info("series %d complete (%d instances)", series.id, series.instance_count)
        self._send(run_ids)
        if self.enqueue_delivery is not None:
            for delivery_id in forward_ids:
                self.enqueue_delivery(delivery_id)
        return run_ids

    def resend_unsent(self) -> list[int]:
        """Send runs that were committed but never handed to the broker (crash recovery)."""
        with self.catalogue.session() as session:
            run_ids = list(
                session.scalars(
                    select(PipelineRun.id)
                    .where(PipelineRun.state == RunState.QUEUED)
                    .where(PipelineRun.enqueued_at.is_(None))
                )
            )
        self._send(run_ids)
        if self.enqueue_delivery is not None:
            # Deliveries recorded but never tried (a crash between commit and send). One may
            # also still be in the broker: dispatch skips a delivery that is already sent.
            with self.catalogue.session() as session:
                pending = list(
                    session.scalars(
                        select(Delivery.id)
                        .where(Delivery.state == DeliveryState.PENDING)
                        .where(Delivery.attempts == 0)
                    )
                )
            for delivery_id in pending:
                self.enqueue_delivery(delivery_id)
        return run_ids

    def _send(self, run_ids: list[int]) -> None:
        for run_id in run_ids:
            with self.catalogue.session() as session:
                run = session.get(PipelineRun, run_id)
                priority = run.series.priority if run is not None else 0
            self.enqueue(run_id, priority or 0)
            with self.catalogue.session() as session:
                run = session.get(PipelineRun, run_id)
                if run is not None:
                    run.enqueued_at = datetime.now(UTC)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.complete_quiet_series()
            except Exception:
                log.exception("completion check failed; retrying")

    def start(self) -> None:
        self.resend_unsent()
        self._thread = threading.Thread(target=self._loop, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
