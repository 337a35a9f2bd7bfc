"""Celery bindings of the pipeline stages (:mod:`pipelines.jobs.stages`).

Each task runs one stage and queues the next; tasks are acknowledged late, so a task whose
worker was killed is redelivered and the stage finishes what was recorded as unfinished.
Stages claim their work, so a task executed twice works once: the second execution finds
the work held (and looks again a little later) or done (and queues the next stage, whose
own claim keeps it from running twice).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task
from celery.signals import worker_ready

from node.core.metrics import STAGE_SECONDS
from node.core.settings import Settings
from pipelines.jobs.runtime import Runtime
from pipelines.jobs.stages import (
    StageBusy,
    StageFailed,
    analyse,
    dispatch,
    fail_run,
    prepare,
    report,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def register_tasks(app: Celery, settings: Settings) -> None:
    """Bind the pipeline tasks to ``app``; each process builds its runtime once."""
    holder: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        if "rt" not in holder:
            holder["rt"] = Runtime(settings)
        return holder["rt"]

    app.curia_runtime = runtime

    @worker_ready.connect(weak=False)
    def load_model_when_ready(sender: Any = None, **_: Any) -> None:
        """Load the model as the worker starts, not on the first series it gets."""
        wanted = bool(app.conf.get("curia_load_model", True))
        if wanted and getattr(sender, "app", None) is app:
            log.info("model loaded: %s", runtime().backbone.identity.name)

    def run_stage(
        task: Task, stage: str, work: Callable[[Runtime, int], T], run_id: int
    ) -> T | None:
        """One stage of a run, timed; a failure fails the run (recorded, logged): None.
        Held by another execution, the task is sent again to look later: None."""
        try:
            with STAGE_SECONDS.labels(stage).time():
                return work(runtime(), run_id)
        except StageBusy as busy:
            log.info("%s; looking again in %.0f s", busy, busy.retry_in)
            task.apply_async(
                (run_id,), countdown=busy.retry_in, priority=runtime().priority_of_run(run_id)
            )
            return None
        except StageFailed:
            log.exception("run %d: %s failed", run_id, stage)
            return None
        except Exception as exc:
            log.exception("run %d: %s failed", run_id, stage)
            fail_run(runtime(), run_id, f"{type(exc).__name__}: {exc}")
            return None

    @app.task(name="curia.prepare_series", bind=True, shared=False)
    def prepare_series_task(self: Task, run_id: int) -> None:
        """Decode on a CPU worker, then hand over to inference (a GPU worker, elsewhere)."""
        if run_stage(self, "prepare", prepare, run_id):
            analyse_series_task.apply_async((run_id,), priority=runtime().priority_of_run(run_id))

    @app.task(name="curia.analyse_series", bind=True, shared=False)
    def analyse_series_task(self: Task, run_id: int) -> None:
        if run_stage(self, "analyse", analyse, run_id):
            write_report_task.apply_async((run_id,), priority=runtime().priority_of_run(run_id))

    @app.task(name="curia.write_report", bind=True, shared=False)
    def write_report_task(self: Task, run_id: int) -> None:
        delivery_ids = run_stage(self, "report", report, run_id)
        if not delivery_ids:
            return
        priority = runtime().priority_of_run(run_id)
        for delivery_id in delivery_ids:
            dispatch_task.apply_async((delivery_id,), priority=priority)

    delivery = settings.delivery

    @app.task(name="curia.dispatch_result", bind=True, shared=False)
    def dispatch_task(self: Task, delivery_id: int) -> None:
        """Send; on failure re-queue with backoff until ``max_attempts``, then dead-letter.

        Attempts are counted in the catalogue, so they survive restarts and re-queues.
        """
        try:
            with STAGE_SECONDS.labels("dispatch").time():
                failure = dispatch(runtime(), delivery_id, delivery.max_attempts)
        except StageBusy as busy:
            log.info("%s; looking again in %.0f s", busy, busy.retry_in)
            dispatch_task.apply_async((delivery_id,), countdown=busy.retry_in)
            return
        if failure is None:
            return
        if failure.final:
            log.error(
                "delivery %d dead-lettered after %d attempts: %s",
                delivery_id,
                failure.attempts,
                failure.error,
            )
            return
        delay = delivery.delay(failure.attempts)
        log.warning(
            "delivery %d failed (%s); retrying in %.1f s", delivery_id, failure.error, delay
        )
        dispatch_task.apply_async((delivery_id,), countdown=delay)
