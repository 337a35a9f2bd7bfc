"""RabbitMQ clean-up after production-mode tests."""

from __future__ import annotations

from kombu import Connection

from pipelines.jobs.celery_app import STAGES
from tests.support.env import RABBITMQ_URL


def delete_queues(prefix: str) -> None:
    """Delete the stage queues a test node declared, so the broker does not collect them."""
    with Connection(RABBITMQ_URL) as conn:
        channel = conn.channel()
        for stage in STAGES:
            channel.queue_delete(f"{prefix}.{stage}")
