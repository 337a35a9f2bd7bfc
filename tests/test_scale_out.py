"""Scale-out: workers on separate queues against the real RabbitMQ (production mode).

One worker takes only inference (where a GPU would be, one process per GPU), another the
CPU and network stages: prepare (decoding), report and dispatch. Each stage must run in the
worker of its queue, the CPU worker must not load the model, and the study's results reach
the archive once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.broker import delete_queues
from tests.support.env import production_env
from tests.support.node_api import runs_of
from tests.support.peers import VENV_BIN, Orthanc, wait_for
from tests.support.results import EXPECTED, download_results
from tests.support.storescu import send_to_node


@pytest.mark.e2e
@pytest.mark.production
def test_inference_and_cpu_workers_on_separate_queues(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = production_env(tmp_path, orthanc, postgres_url)
    node = node_factory(env)
    worker = str(VENV_BIN / "curia-node")
    gpu = node._spawn([worker, "worker", "--queues", "inference"], "gpu-worker.log")
    cpu = node._spawn([worker, "worker", "--queues", "prepare,report,dispatch"], "cpu-worker.log")
    try:
        for name in ("gpu-worker.log", "cpu-worker.log"):
            wait_for(lambda n=name: " ready." in node.log(n), 120, f"{name}: not ready")
        send_to_node(node, ct_series)
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        download_results(orthanc, study_uid, tmp_path / "results", EXPECTED)
        wait_for(lambda: runs_of(node)[0]["state"] == "succeeded", 60, "the run did not finish")

        gpu_log, cpu_log = node.log("gpu-worker.log"), node.log("cpu-worker.log")

        def ran(task: str, log: str) -> bool:  # "Task curia.x[<id>] succeeded in ..."
            return f"Task {task}[" in log

        assert ran("curia.analyse_series", gpu_log) and "model loaded" in gpu_log
        for task in ("curia.prepare_series", "curia.write_report", "curia.dispatch_result"):
            assert ran(task, cpu_log) and not ran(task, gpu_log), task
        assert not ran("curia.analyse_series", cpu_log)
        # the series was decoded on the CPU worker: the GPU worker read the prepared pixels
        decoded = "stack(s) decoded in"  # the prepare stage's line: "N slices of K stack(s) ..."
        assert decoded in cpu_log and decoded not in gpu_log
        prepared = Path(env["CURIA_DATA_DIR"]) / "prepared"
        assert not list(prepared.glob("*")), "prepared pixels are removed after inference"
        assert "model loaded" not in cpu_log, "a report/dispatch worker does not load the model"
    finally:
        for proc in (gpu, cpu):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])


@pytest.mark.slow
def test_a_worker_refuses_an_unknown_stage() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "curia-node"), "worker", "--queues", "inference,gpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown stage(s) gpu; stages: prepare, inference, report, dispatch" in result.stderr
