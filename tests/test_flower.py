"""Flower, Celery's monitor, works with the node's Celery app and sees its workers and tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from pipelines.jobs.celery_app import STAGES
from tests.support.env import RABBITMQ_URL
from tests.support.peers import VENV_BIN, free_port, wait_for


@pytest.mark.production
def test_flower_lists_the_worker_and_its_pipeline_tasks(tmp_path: Path) -> None:
    prefix = f"flower-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_PIPELINE__BROKER_URL": RABBITMQ_URL,
        "CURIA_PIPELINE__QUEUE_PREFIX": prefix,
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    port = free_port()
    processes = []
    try:
        for args, log in (
            ([str(VENV_BIN / "curia-node"), "worker"], "worker.log"),
            (
                [
                    str(VENV_BIN / "celery"),
                    "-A",
                    "pipelines.jobs.celery_app",
                    "flower",
                    f"--port={port}",
                    "--address=127.0.0.1",
                ],
                "flower.log",
            ),
        ):
            processes.append(
                subprocess.Popen(
                    args,
                    env=env,
                    stdout=(tmp_path / log).open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def workers() -> dict | None:
            response = httpx.get(
                f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"}, timeout=30
            )
            response.raise_for_status()
            found = response.json()
            return found or None

        found = wait_for(workers, 120, "Flower did not see the node's worker", interval=2)
        registered = {task for info in found.values() for task in info.get("registered", [])}
        assert {
            "curia.prepare_series",
            "curia.analyse_series",
            "curia.write_report",
            "curia.dispatch_result",
        } <= registered
        queues = {q["name"] for info in found.values() for q in info.get("active_queues", [])}
        assert {f"{prefix}.{stage}" for stage in STAGES} <= queues
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
