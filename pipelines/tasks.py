"""The pipeline: analyse a series -> write its report -> dispatch the report.

Each task takes a catalogue id, does one stage, records the outcome and queues the next.
Every stage first checks what is already recorded, so a redelivered task (after a worker
was killed) finishes the work instead of repeating it: one run, one SR, one delivery.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.models import (
    Delivery,
    DeliveryState,
    Instance,
    PipelineRun,
    Result,
    RunState,
    Series,
    SeriesState,
)
from node.dispatch import DispatchError, send
from node.metrics import DELIVERY_FAILURES, STAGE_SECONDS
from node.settings import Settings
from pipelines.findings import findings_from_dict, findings_to_dict
from pipelines.runtime import Runtime

log = logging.getLogger(__name__)


def _fail_run(runtime: Runtime, run_id: int, error: str) -> None:
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None:
            return
        run.state = RunState.FAILED
        run.error = error[:2000]
        run.finished_at = datetime.now(UTC)
        run.series.state = SeriesState.FAILED


def analyse(runtime: Runtime, run_id: int) -> bool:
    """Run the backbone and heads on the run's series; False if there is nothing to do."""
    from pipelines.inference import analyse_series

    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.state == RunState.FAILED:
            return False
        if run.findings is not None:
            return True  # inferred before a crash: go on to the report
        series: Series = run.series
        rows = session.scalars(select(Instance).where(Instance.series_id == series.id)).all()
        paths = [runtime.spool.absolute(row.path) for row in rows]
        series_uid = series.series_instance_uid
        run.state = RunState.RUNNING
        run.started_at = datetime.now(UTC)
        series.state = SeriesState.PROCESSING
    started = time.perf_counter()
    findings = analyse_series(
        paths,
        runtime.backbone,
        runtime.heads,
        series_instance_uid=series_uid,
        batch_size=runtime.settings.model.batch_size,
    )
    log.info(
        "run %d: %d slices analysed in %.2f s", run_id, len(paths), time.perf_counter() - started
    )
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        run.findings = findings_to_dict(findings)
        run.backbone = f"{findings.model.name} {findings.model.version}"
        run.heads = ", ".join(f"{f.head_name} {f.head_version}" for f in findings.findings)
        run.inferred_at = datetime.now(UTC)
    return True


def report(runtime: Runtime, run_id: int) -> list[int]:
    """Write the run's SR (once) and create its deliveries; return delivery ids to send."""
    from pipelines.report import build_sr, write_sr

    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.findings is None:
            return []
        result = session.scalar(select(Result).where(Result.run_id == run_id, Result.kind == "sr"))
        if result is None:
            findings = findings_from_dict(run.findings)
            rows = session.scalars(
                select(Instance).where(Instance.series_id == run.series_id)
            ).all()
            sources = [
                dcmread(runtime.spool.absolute(row.path), stop_before_pixels=True) for row in rows
            ]
            sr = build_sr(
                sources,
                findings,
                runtime.templates,
                runtime.device_identity,
                series_description="Curia AI results",
                supersedes=_superseded_report(runtime, session, run),
            )
            relative = f"{sr.StudyInstanceUID}/{sr.SeriesInstanceUID}/{sr.SOPInstanceUID}.dcm"
            path = runtime.settings.results_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write_sr(sr, path)
            summary = "; ".join(
                f"{f.head_name}: {f.predicted.name} ({f.probabilities[f.predicted_index]:.0%})"
                for f in findings.findings
            )
            result = Result(
                run=run,
                kind="sr",
                sop_instance_uid=sr.SOPInstanceUID,
                series_instance_uid=sr.SeriesInstanceUID,
                path=relative,
                summary=summary,
            )
            session.add(result)
            session.flush()
        run.state = RunState.REPORTED
        delivery_ids = []
        for name in runtime.destinations():
            delivery = session.scalar(
                select(Delivery).where(
                    Delivery.result_id == result.id, Delivery.destination == name
                )
            )
            if delivery is None:
                delivery = Delivery(result=result, destination=name)
                session.add(delivery)
                session.flush()
            if delivery.state == DeliveryState.PENDING:
                delivery_ids.append(delivery.id)
        if not delivery_ids:
            _finish(run)
    return delivery_ids


def _superseded_report(runtime: Runtime, session: Session, run: PipelineRun) -> Dataset | None:
    """For a requested re-run: the header of the SR it replaces, so the new SR cites it."""
    if run.rerun_of is None:
        return None
    earlier = session.scalar(
        select(Result).where(Result.run_id == run.rerun_of, Result.kind == "sr")
    )
    if earlier is None:
        return None
    return dcmread(runtime.settings.results_dir / earlier.path, stop_before_pixels=True)


def _finish(run: PipelineRun) -> None:
    run.state = RunState.SUCCEEDED
    run.finished_at = datetime.now(UTC)
    run.series.state = SeriesState.DONE


def dispatch(runtime: Runtime, delivery_id: int) -> None:
    """Send one result to one destination; raise DispatchError to be retried."""
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return
        destination = runtime.destinations().get(delivery.destination)
        path = runtime.settings.results_dir / delivery.result.path
        delivery.attempts += 1
    if destination is None:
        raise DispatchError(f"destination {delivery.destination!r} is no longer configured")
    send(destination, [path])
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        delivery.state = DeliveryState.SENT
        delivery.sent_at = datetime.now(UTC)
        delivery.last_error = None
        run = delivery.result.run
        pending = [d for r in run.results for d in r.deliveries if d.state != DeliveryState.SENT]
        if not pending:
            _finish(run)


def _record_delivery_failure(
    runtime: Runtime, delivery_id: int, error: str, max_attempts: int
) -> tuple[int, bool]:
    """Record a failed send; return (attempts so far, whether it is now dead-lettered)."""
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return 0, True
        delivery.last_error = error[:2000]
        final = delivery.attempts >= max_attempts
        if final:
            delivery.state = DeliveryState.FAILED
            delivery.result.run.state = RunState.FAILED
            delivery.result.run.error = f"delivery to {delivery.destination} failed: {error}"
        return delivery.attempts, final


def register_tasks(app: Celery, settings: Settings) -> None:
    """Bind the pipeline tasks to ``app``; each process builds its runtime once."""
    holder: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        if "rt" not in holder:
            holder["rt"] = Runtime(settings)
        return holder["rt"]

    app.curia_runtime = runtime  # type: ignore[attr-defined]

    @worker_ready.connect(weak=False)
    def load_model_when_ready(sender: Any = None, **_: Any) -> None:
        """Load the model as the worker starts, not on the first series it gets."""
        if getattr(sender, "app", None) is app:
            log.info("model loaded: %s", runtime().backbone.identity.name)

    @app.task(name="curia.analyse_series", bind=True)
    def analyse_series_task(self: Task, run_id: int) -> None:
        try:
            with STAGE_SECONDS.labels("analyse").time():
                proceed = analyse(runtime(), run_id)
        except Exception as exc:
            log.exception("run %d: analysis failed", run_id)
            _fail_run(runtime(), run_id, f"{type(exc).__name__}: {exc}")
            return
        if proceed:
            write_report_task.delay(run_id)

    @app.task(name="curia.write_report", bind=True)
    def write_report_task(self: Task, run_id: int) -> None:
        try:
            with STAGE_SECONDS.labels("report").time():
                delivery_ids = report(runtime(), run_id)
        except Exception as exc:
            log.exception("run %d: report failed", run_id)
            _fail_run(runtime(), run_id, f"{type(exc).__name__}: {exc}")
            return
        for delivery_id in delivery_ids:
            dispatch_task.delay(delivery_id)

    delivery = settings.delivery

    @app.task(name="curia.dispatch_result", bind=True)
    def dispatch_task(self: Task, delivery_id: int) -> None:
        """Send; on failure re-queue with backoff until ``max_attempts``, then dead-letter.

        Attempts are counted in the catalogue, so they survive restarts and re-queues.
        """
        try:
            with STAGE_SECONDS.labels("dispatch").time():
                dispatch(runtime(), delivery_id)
        except (DispatchError, OSError) as exc:
            DELIVERY_FAILURES.labels("any").inc()
            attempts, final = _record_delivery_failure(
                runtime(), delivery_id, str(exc), delivery.max_attempts
            )
            if final:
                log.error(
                    "delivery %d dead-lettered after %d attempts: %s", delivery_id, attempts, exc
                )
                return
            delay = delivery.delay(attempts)
            log.warning("delivery %d failed (%s); retrying in %.1f s", delivery_id, exc, delay)
            dispatch_task.apply_async((delivery_id,), countdown=delay)
