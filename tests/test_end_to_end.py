"""One real CT study: Orthanc -> C-STORE -> node -> Curia -> SR -> C-STORE -> Orthanc.

Run in both modes the node supports: embedded (SQLite + SQLite broker + in-process worker)
and production (PostgreSQL + RabbitMQ + a separate `celery worker` process).
"""

from __future__ import annotations

import os
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.broker import delete_queues
from tests.support.env import node_env, production_env
from tests.support.peers import VENV_BIN, Orthanc, wait_for
from tests.support.results import EXPECTED, instance_file, push_and_wait_for_sr, sr_series_of
from tests.support.testdata import TEST_PATIENT_ID, TEST_PATIENT_NAME
from tests.support.validators import assert_dciodvfy_clean, assert_dsrdump_clean

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def assert_no_patient_data_in_logs(*logs: str) -> None:
    """The sample's test patient name and ID must appear in no log line."""
    for text in logs:
        for secret in (TEST_PATIENT_ID, TEST_PATIENT_NAME, *TEST_PATIENT_NAME.split("^")):
            assert secret not in text, f"patient data {secret!r} leaked into a log"


def assert_sr_belongs_to(sr_path: Path, ct_series: list[Path]) -> None:
    sr = dcmread(sr_path)
    source = dcmread(ct_series[0], stop_before_pixels=True)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentSequence, "the SR has content"
    text = str(sr)
    assert "demo" in text.lower(), "an SR made with demo weights must say so"


@pytest.mark.e2e
def test_embedded_mode_returns_a_valid_sr_to_the_archive(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    node = node_factory(node_env(tmp_path, orthanc))
    sr_path, elapsed = push_and_wait_for_sr(orthanc, node, ct_series, tmp_path)
    print(f"embedded: last instance -> SR in Orthanc: {elapsed:.1f} s")
    assert_no_patient_data_in_logs(node.log())
    assert_sr_belongs_to(sr_path, ct_series)
    assert_dciodvfy_clean(sr_path)
    assert_dsrdump_clean(sr_path)

    study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
    node.stop()
    node.start()  # a restart must not send the same result again
    time.sleep(3)
    assert len(sr_series_of(orthanc, study_uid)) == EXPECTED["SR"], "a restart sent an SR again"
    earlier_uids = {
        dcmread(BytesIO(instance_file(orthanc, i)), stop_before_pixels=True).SOPInstanceUID
        for s in sr_series_of(orthanc, study_uid)
        for i in s["Instances"]
    }
    earlier_series = {s["ID"] for s in sr_series_of(orthanc, study_uid)}

    series_uid = dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID
    rerun = subprocess.run(
        [str(VENV_BIN / "curia-node"), "results", "rerun", series_uid],
        env={**os.environ, **node.env},
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    wait_for(
        lambda: len(sr_series_of(orthanc, study_uid)) == 2 * EXPECTED["SR"],
        120,
        "re-run SRs arrive",
    )
    newer = [s for s in sr_series_of(orthanc, study_uid) if s["ID"] not in earlier_series]
    for series in newer:
        for instance_id in series["Instances"]:
            second = dcmread(BytesIO(instance_file(orthanc, instance_id)))
            cited = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
            assert cited.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in earlier_uids


@pytest.mark.e2e
@pytest.mark.production
def test_production_mode_rabbitmq_postgres_separate_worker(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = production_env(tmp_path, orthanc, postgres_url)
    node = node_factory(env, separate_worker=True)
    try:
        sr_path, elapsed = push_and_wait_for_sr(orthanc, node, ct_series, tmp_path)
    except AssertionError:
        print(node.log("worker.log")[-4000:])
        raise
    print(f"production: last instance -> SR in Orthanc: {elapsed:.1f} s")
    assert_no_patient_data_in_logs(node.log(), node.log("worker.log"))
    assert_sr_belongs_to(sr_path, ct_series)
    assert_dciodvfy_clean(sr_path)
    assert_dsrdump_clean(sr_path)
    assert "curia.analyse_series" in node.log("worker.log"), "the separate worker ran the task"
    delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])
