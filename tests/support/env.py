"""Environments for node processes under test, and the services and tools they need."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.support.peers import Orthanc, free_port

POSTGRES_ADMIN_URL = os.environ.get(
    "CURIA_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
RABBITMQ_URL = os.environ.get("CURIA_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command (it installs it)")
    return path


def node_env(root: Path, orthanc: Orthanc, **extra: str) -> dict[str, str]:
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_ARCHIVE__AE_TITLE": orthanc.aet,
        "CURIA_ARCHIVE__PORT": str(orthanc.dicom_port),
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": "2",
        "CURIA_COMPLETION__POLL_SECONDS": "0.2",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{uuid.uuid4().hex[:8]}",
    }
    env.update(extra)
    return env


def production_env(root: Path, orthanc: Orthanc, postgres_url: str, **extra: str) -> dict[str, str]:
    """Production mode: PostgreSQL catalogue, RabbitMQ broker, workers as separate processes."""
    return node_env(
        root,
        orthanc,
        CURIA_DATABASE_URL=postgres_url,
        CURIA_PIPELINE__BROKER_URL=RABBITMQ_URL,
        CURIA_PIPELINE__EMBEDDED_WORKER="false",
        **extra,
    )
