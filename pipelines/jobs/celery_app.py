"""The Celery application, configured from the node's settings.

Embedded mode uses kombu's SQLAlchemy transport on a SQLite file in the data folder
(durable, no server); production points ``pipeline.broker_url`` at RabbitMQ. Either way
tasks are acknowledged late, one at a time, so a killed worker's task is redelivered.
Messages carry the series' routing priority, so stat work overtakes routine work.

Start a separate worker with ``celery -A pipelines.jobs.celery_app worker --pool solo``.
"""

from __future__ import annotations

from celery import Celery

from node.core.settings import Settings
from pipelines.jobs import embedded_transport

#: Queues, in the order a run goes through them: decode (CPU), embed (GPU), SR, send.
STAGES = ("prepare", "inference", "report", "dispatch")


def queue_name(settings: Settings, stage: str) -> str:
    return f"{settings.pipeline.queue_prefix}.{stage}"


def create_app(settings: Settings) -> Celery:
    app = Celery("curia", set_as_current=False)
    if settings.is_embedded_broker:
        embedded_transport.register()
        settings.ensure_dirs()
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_default_queue=queue_name(settings, "inference"),
        task_routes={
            "curia.prepare_series": {"queue": queue_name(settings, "prepare")},
            "curia.analyse_series": {"queue": queue_name(settings, "inference")},
            "curia.write_report": {"queue": queue_name(settings, "report")},
            "curia.dispatch_result": {"queue": queue_name(settings, "dispatch")},
        },
        worker_send_task_events=False,
        # Priority 0 (routine) .. 9 (stat): RabbitMQ queues are declared with x-max-priority;
        # the embedded transport orders waiting messages by the same number.
        task_queue_max_priority=10,
        task_default_priority=0,
    )
    from pipelines.jobs.tasks import register_tasks

    register_tasks(app, settings)
    return app


#: ``celery -A`` reads this name; built on first access by the module ``__getattr__``.
app: Celery


def __getattr__(name: str) -> Celery:
    """``celery -A pipelines.jobs.celery_app`` finds ``app``: built on first use from the
    environment and ``CURIA_CONFIG``, so importing this module has no side effects."""
    if name == "app":
        global app
        app = create_app(Settings())
        app.set_default()  # the worker's threads (timer included) look tasks up in it
        return app
    raise AttributeError(name)
