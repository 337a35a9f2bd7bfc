"""RabbitMQ stops while studies arrive, then comes back (production mode).

The listener keeps accepting (Success means stored and catalogued, not queued); the series
that complete while the broker is down are sent as soon as it is back, and their results
reach the archive once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.broker import delete_queues
from tests.support.env import production_env
from tests.support.node_api import runs_of
from tests.support.peers import Orthanc, port_open, wait_for
from tests.support.results import EXPECTED, download_results
from tests.support.storescu import send_to_node


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.e2e
@pytest.mark.production
def test_studies_received_while_rabbitmq_is_down_are_processed_when_it_returns(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = production_env(tmp_path, orthanc, postgres_url)
    node = node_factory(env, separate_worker=True)
    wait_for(lambda: "ready" in node.log("worker.log"), 120, "the worker did not start")
    _rabbitmqctl("stop_app")
    try:
        wait_for(lambda: not port_open(5672), 60, "RabbitMQ did not stop")
        send_to_node(node, ct_series)  # storescu fails unless every instance got Success
        wait_for(lambda: "completion check failed" in node.log(), 60, "the node noticed the outage")
        assert [r["state"] for r in runs_of(node)] == ["queued"], "recorded, waiting to be sent"
    finally:
        _rabbitmqctl("start_app")
    wait_for(lambda: port_open(5672), 60, "RabbitMQ did not come back")
    try:
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        download_results(orthanc, study_uid, tmp_path / "results", EXPECTED)
        wait_for(lambda: runs_of(node)[0]["state"] == "succeeded", 120, "the run did not finish")
        assert len(runs_of(node)) == 1
        assert "completion checks work again" in node.log()
    finally:
        delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])
