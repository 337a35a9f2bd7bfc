"""A pipeline worker killed with SIGKILL mid-analysis (production mode: RabbitMQ + PostgreSQL).

Tasks are acknowledged late, so RabbitMQ redelivers the analysis to the next worker; the
stages check what is recorded, so the run finishes once: one run, one set of results, each
delivered once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.broker import delete_queues
from tests.support.env import production_env
from tests.support.node_api import runs_of
from tests.support.peers import VENV_BIN, NodeProcess, Orthanc, wait_for
from tests.support.results import EXPECTED, download_results
from tests.support.storescu import send_to_node


def _worker_args(node: NodeProcess) -> list[str]:
    prefix = node.env["CURIA_PIPELINE__QUEUE_PREFIX"]
    return [
        str(VENV_BIN / "celery"),
        "-A",
        "pipelines.jobs.celery_app",
        "worker",
        "--pool=solo",
        "--loglevel=INFO",
        "-Q",
        ",".join(f"{prefix}.{stage}" for stage in ("inference", "report", "dispatch")),
    ]


@pytest.mark.e2e
@pytest.mark.production
def test_worker_killed_mid_analysis_is_finished_by_the_next_worker_once(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = production_env(
        tmp_path,
        orthanc,
        postgres_url,
        CURIA_COMPLETION__POLL_SECONDS="0.1",
    )
    node = node_factory(env, separate_worker=True)
    wait_for(lambda: "ready" in node.log("worker.log"), 120, "the worker did not start")
    try:
        send_to_node(node, ct_series)
        running = wait_for(
            lambda: next((r for r in runs_of(node) if r["state"] == "running"), None),
            60,
            "the analysis never showed as running",
            interval=0.05,
        )
        assert node.worker is not None
        os.killpg(node.worker.pid, signal.SIGKILL)
        node.worker.wait(10)
        assert runs_of(node)[0]["state"] == "running", "killed while the analysis ran"

        node.worker = node._spawn(_worker_args(node), "worker2.log")
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        download_results(orthanc, study_uid, tmp_path / "results", EXPECTED)
        wait_for(lambda: runs_of(node)[0]["state"] == "succeeded", 60, "the run did not finish")
        runs = runs_of(node)
        assert [r["id"] for r in runs] == [running["id"]], "one run, not a second one"
        deliveries = [d for r in runs[0]["results"] for d in r["deliveries"]]
        assert len(deliveries) == 3 and {d["state"] for d in deliveries} == {"sent"}
        assert all(d["attempts"] == 1 for d in deliveries), "each result sent once"
        assert "curia.analyse_series" in node.log("worker2.log"), "the new worker finished it"
    finally:
        delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])
