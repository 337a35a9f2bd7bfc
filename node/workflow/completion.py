"""The study-completion watcher: when a series is complete, and what then.

A series is complete after a quiet period (per series, and optionally per study), once its
study has the series the configuration requires (or a force timeout has passed). The
routing rules on DICOM attributes then decide its priority, whether it is discarded and
where the original is forwarded (forwards go at once, not after inference), and a pipeline
run is queued.

A series holding nothing a head reads (a dose report, key objects, a presentation state,
an RT structure set: :mod:`node.core.sop_classes`) is routed and forwarded like any other,
then marked "not analysed" with its reason; no run is created for it. A SEG or RTSTRUCT
completing after the image series it lies on was analysed may re-run that series
(:mod:`node.workflow.segmentations`).

Late instances (arriving after completion) follow ``completion.late_instances``: ``rerun``
queues one new run once the series is quiet again and its current run has ended, whose SR
supersedes the previous one (unless only objects no head reads came late); ``append`` only
stores them. Either way the series' forwards send the late objects on, the decision is
recorded on the series and ``completed_at`` moves to it, so it is taken once.

Runs and deliveries are created and queued through :mod:`node.workflow.runs` and
:mod:`node.delivery.deliveries`, the only code that changes their state. The run row is
committed before the task is sent and marked sent afterwards, so a crash between the two is
repaired at start by re-sending every run that was never sent.

Each series' first header (what routing rules read) is read once per pass and handed on.

Before the quiet period, the senders' own completion signals (:mod:`node.workflow.signals`:
MPPS, the end of an association, a stated instance count, a complete multi-frame stack)
complete a series at once; ``completed_by`` records which one did.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.db import Catalogue
from node.catalogue.models import Instance, Series, SeriesState
from node.core import sop_classes
from node.core.rules import Condition, matches
from node.core.settings import CompletionSettings
from node.delivery import deliveries
from node.workflow import runs
from node.workflow.routing import Router, facts_for, first_header, series_sop_classes
from node.workflow.segmentations import rerun_for_late_segmentation
from node.workflow.signals import FORCED, QUIET, Signals, consumed, lock, receiving

log = logging.getLogger(__name__)

Enqueue = runs.Enqueue  # (run id, priority 0-9)
EnqueueDelivery = Callable[[int], object]
Verdict = Literal["ready", "wait", "forced", "discard"]


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


#: Series states after which instances arriving are late.
_ENDED = [SeriesState.DONE, SeriesState.FAILED, SeriesState.NOT_ANALYSED]


def _not_analysed(session: Session, series: Series) -> bool:
    """Mark a series with nothing a head reads (a dose report, key objects, an RT
    structure set...) "not analysed" with the reason, at once: no run is created."""
    reason = sop_classes.not_analysed_reason(series_sop_classes(session, series))
    if reason is None:
        return False
    if series.state != SeriesState.NOT_ANALYSED:
        log.info("series %d not analysed: %s", series.id, reason)
    series.state, series.state_reason = SeriesState.NOT_ANALYSED, reason
    return True


def _late_images(session: Session, series: Series, since: datetime | None) -> bool:
    """Whether what arrived in the series after ``since`` may change its analysis: False
    only when every late object is one no head reads (a dose report, a presentation
    state arriving late does not re-run the analysis)."""
    query = select(Instance.sop_class_uid).where(Instance.series_id == series.id)
    if since is not None:
        query = query.where(Instance.received_at > since)
    late = set(session.scalars(query.distinct()))
    return not late or not late.isdisjoint(sop_classes.ANALYSABLE)


class CompletionWatcher:
    def __init__(
        self,
        catalogue: Catalogue,
        enqueue: Enqueue,
        run_key: Callable[[Series], str],
        quiet_seconds: float | None = None,
        poll_seconds: float | None = None,
        router: Router | None = None,
        enqueue_delivery: EnqueueDelivery | None = None,
        policy: CompletionSettings | None = None,
        signals: Signals | None = None,
    ) -> None:
        policy = policy or CompletionSettings()
        if quiet_seconds is not None:
            policy = policy.model_copy(update={"series_quiet_seconds": quiet_seconds})
        if poll_seconds is not None:
            policy = policy.model_copy(update={"poll_seconds": poll_seconds})
        if policy.required_series and router is None:
            raise ValueError("required_series needs a router to read series attributes")
        self.catalogue = catalogue
        self.enqueue = enqueue
        self.run_key = run_key
        self.policy = policy
        self.required = [Condition.model_validate(c) for c in policy.required_series]
        self.router = router
        self.enqueue_delivery = enqueue_delivery
        self.signals = signals
        self.quiet = timedelta(seconds=policy.series_quiet_seconds)
        self.poll_seconds = policy.poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._headers: dict[int, Dataset | None] = {}

    def _header(self, session: Session, series: Series) -> Dataset | None:
        """The series' first header, read once per completion pass (rules read it)."""
        if series.id not in self._headers:
            assert self.router is not None
            self._headers[series.id] = first_header(session, self.router.spool_dir, series)
        return self._headers[series.id]

    def complete_quiet_series(self, now: datetime | None = None) -> list[int]:
        """Complete what is ready, handle late instances, send the runs; return run ids."""
        now = now or datetime.now(UTC)
        cutoff = now - self.quiet
        run_ids: list[int] = []
        forward_ids: list[int] = []
        self._headers = {}
        with self.catalogue.session() as session:
            if self.signals is not None:
                self._complete_signalled(session, now, run_ids, forward_ids)
            quiet = session.scalars(
                select(Series)
                .where(Series.state == SeriesState.RECEIVING)
                .where(Series.last_received_at <= cutoff)
                .with_for_update(skip_locked=True)
            ).all()
            by_study: dict[int, list[Series]] = defaultdict(list)
            for series in quiet:
                by_study[series.study_id].append(series)
            for group in by_study.values():
                verdict = self._study_verdict(session, group[0], now)
                if verdict == "wait":
                    continue
                for series in group:
                    self._complete(session, series, verdict, now, run_ids, forward_ids)
            for series in self._late(session, cutoff):
                self._late_instances(session, series, now, run_ids, forward_ids)
        self._headers = {}
        self._send(run_ids)
        if self.enqueue_delivery is not None:
            for delivery_id in forward_ids:
                self.enqueue_delivery(delivery_id)
        return run_ids

    def _complete_signalled(
        self, session: Session, now: datetime, run_ids: list[int], forward_ids: list[int]
    ) -> None:
        """Complete the receiving series a sender's signal completes, without a quiet
        period (a study's required series are still waited for)."""
        assert self.signals is not None
        ready = self.signals.ready(session, receiving(session))
        for series in lock(session, list(ready)):
            signal = ready[series.id]
            verdict = self._study_verdict(session, series, now) if self.required else "ready"
            if verdict == "wait":
                continue
            series.completed_by = signal
            self._complete(session, series, verdict, now, run_ids, forward_ids)
        self.signals.forget(list(ready))

    def _study_verdict(self, session: Session, series: Series, now: datetime) -> Verdict:
        siblings = series.study.series
        study_quiet = timedelta(seconds=self.policy.study_quiet_seconds)
        if study_quiet and any(_aware(s.last_received_at) > now - study_quiet for s in siblings):
            return "wait"
        if not self.required:
            return "ready"
        assert self.router is not None
        facts = [
            facts_for(session, self.router.spool_dir, s, header=self._header(session, s))
            for s in siblings
        ]
        if all(any(matches(c, f) for f in facts) for c in self.required):
            return "ready"
        first = min(_aware(s.first_received_at) for s in siblings)
        force = self.policy.force_seconds
        if force is not None and now - first >= timedelta(seconds=force):
            return "forced" if self.policy.force_action == "process" else "discard"
        return "wait"

    def _complete(
        self,
        session: Session,
        series: Series,
        verdict: Verdict,
        now: datetime,
        run_ids: list[int],
        forward_ids: list[int],
    ) -> None:
        series.state = SeriesState.COMPLETE
        series.completed_at = now
        if series.completed_by is None:
            series.completed_by = FORCED if verdict in ("forced", "discard") else QUIET
        consumed(session, series)
        if verdict in ("forced", "discard"):
            series.routing = {
                **(series.routing or {}),
                "completion": f"required series missing after {self.policy.force_seconds} s: "
                f"{'processed anyway' if verdict == 'forced' else 'discarded'}",
            }
        if verdict == "discard":
            series.state = SeriesState.DONE
            log.info("series %d discarded: required series never arrived", series.id)
            return
        if self.router is not None:
            decision = self.router.decide(session, series, header=self._header(session, series))
            if decision.discard:
                series.state = SeriesState.DONE
                log.info("series %d discarded by rule(s) %s", series.id, decision.fired)
                return
            forward_ids += deliveries.create_forwards(session, series.id, decision.forward)
        if _not_analysed(session, series):
            if self.router is not None:  # a segmentation of a series analysed without it
                run_ids += rerun_for_late_segmentation(
                    session,
                    series,
                    self.router.spool_dir,
                    self.policy.late_instances,
                    self.run_key,
                )
            return
        run = runs.create(session, series, self.run_key(series))
        if run is None:
            return
        run_ids.append(run.id)
        log.info("series %d complete (%d instances)", series.id, series.instance_count)

    @staticmethod
    def _late(session: Session, cutoff: datetime) -> list[Series]:
        """Series that received instances after they were completed and are quiet again,
        with no run in progress."""
        return list(
            session.scalars(
                select(Series)
                .where(Series.state.in_(_ENDED))
                .where(Series.completed_at.is_not(None))
                .where(Series.last_received_at > Series.completed_at)
                .where(Series.last_received_at <= cutoff)
                .with_for_update(skip_locked=True)
            )
        )

    def _late_instances(
        self,
        session: Session,
        series: Series,
        now: datetime,
        run_ids: list[int],
        forward_ids: list[int],
    ) -> None:
        policy = self.policy.late_instances
        previous = series.completed_at
        notes = list((series.routing or {}).get("late", []))
        notes.append({"at": now.isoformat(), "instances": series.instance_count, "then": policy})
        series.routing = {**(series.routing or {}), "late": notes}
        series.completed_at = now
        if (series.routing or {}).get("attributes", {}).get("discard"):
            log.info("series %d: late instances stored (discarded series)", series.id)
            return
        if self.router is not None:  # the forwards send what the destination lacks
            decision = self.router.decide(session, series, header=self._header(session, series))
            deliveries.reset_forwards(session, series.id)
            forward_ids += deliveries.create_forwards(session, series.id, decision.forward)
        if policy == "append":
            log.info("series %d: late instances stored (%s)", series.id, policy)
            return
        if _not_analysed(session, series):
            return
        if not _late_images(session, series, previous):
            log.info("series %d: late objects no head reads stored", series.id)
            return
        series.state = SeriesState.COMPLETE
        run = runs.create_rerun(
            session, series, "late", "late-instances", first_key=self.run_key(series)
        )
        run_ids.append(run.id)
        log.info("series %d: late instances, re-run %d queued", series.id, run.id)

    def _resend_runs(self) -> list[int]:
        """Send runs committed but never handed to the broker (a crash, or the broker was
        down when they completed: they go as soon as it is back)."""
        with self.catalogue.session() as session:
            run_ids = runs.unsent(session)
        self._send(run_ids)
        return run_ids

    def resend_unsent(self) -> list[int]:
        """At start: send unsent runs, and deliveries recorded but never tried."""
        run_ids = self._resend_runs()
        if self.enqueue_delivery is not None:
            # Deliveries recorded but never tried (a crash between commit and send). One may
            # also still be in the broker: dispatch skips a delivery that is already sent.
            with self.catalogue.session() as session:
                pending = deliveries.never_tried(session)
            for delivery_id in pending:
                self.enqueue_delivery(delivery_id)
        return run_ids

    def _send(self, run_ids: list[int]) -> None:
        runs.send(self.catalogue, run_ids, self.enqueue)

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if failing:
                    self.resend_unsent()
                self.complete_quiet_series()
                if failing:
                    log.info("completion checks work again; unsent runs were sent")
                failing = False
            except Exception as exc:
                if not failing:
                    log.error(
                        "completion check failed (%s); retrying", type(exc).__name__, exc_info=True
                    )
                failing = True

    def wake(self) -> None:
        """A sender signalled (an association ended, an MPPS step ended): look now rather
        than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self.resend_unsent()
        self._thread = threading.Thread(target=self._loop, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
