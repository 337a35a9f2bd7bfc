"""Stat work overtakes routine work waiting in a queue: embedded broker and RabbitMQ."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from node.core.settings import Settings
from pipelines.jobs.celery_app import create_app, queue_name
from tests.support.env import RABBITMQ_URL


def _order_consumed(settings: Settings, priorities: list[int]) -> list[int]:
    """Publish analyse tasks (run id = position) with these priorities while no worker
    runs, then take them off the queue one by one; return the run ids in that order."""
    app = create_app(settings)
    name = queue_name(settings, "inference")
    task = app.tasks["curia.analyse_series"]
    for run_id, priority in enumerate(priorities):
        task.apply_async((run_id,), priority=priority)
    order = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues[name](conn.default_channel)
        try:
            for _ in priorities:
                message = None
                for _attempt in range(50):  # RabbitMQ may need a moment to route
                    message = queue.get(no_ack=True)
                    if message is not None:
                        break
                    time.sleep(0.1)
                assert message is not None, "a published task went missing"
                order.append(message.headers["argsrepr"])
        finally:
            if not settings.is_embedded_broker:
                queue.delete()
    return [int(args.strip("(),")) for args in order]


def test_embedded_broker_serves_stat_first(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    # Routine 0, 1, 2 wait; 3 is stat, 4 urgent: 3 first, then 4, then FIFO among routine.
    assert _order_consumed(settings, [0, 0, 0, 9, 5]) == [3, 4, 0, 1, 2]


@pytest.mark.production
def test_rabbitmq_serves_stat_first(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        pipeline={"broker_url": RABBITMQ_URL, "queue_prefix": f"prio-{uuid.uuid4().hex[:8]}"},
    )
    assert _order_consumed(settings, [0, 0, 0, 9, 5]) == [3, 4, 0, 1, 2]
