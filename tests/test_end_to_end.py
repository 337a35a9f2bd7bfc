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

import httpx
import pytest
from pydicom import dcmread

from pipelines.jobs.celery_app import STAGES
from tests.conftest import RABBITMQ_URL, node_env, production_env
from tests.peers import VENV_BIN, NodeProcess, Orthanc, wait_for
from tests.testdata import TEST_PATIENT_ID, TEST_PATIENT_NAME
from tests.validators import assert_dcentvfy_clean, assert_dciodvfy_clean, assert_dsrdump_clean

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# With the demo heads: one SEG (mask head) and two SRs (series-level heads; mask head + SEG),
# each in its own series (a viewer such as OHIF shows one SR per series)
EXPECTED = {"SR": 2, "SEG": 1}


def series_of_modality(orthanc: Orthanc, study_uid: str, modality: str) -> list[dict]:
    return [
        s
        for s in orthanc.series_of_study(study_uid)
        if s["MainDicomTags"].get("Modality") == modality
    ]


def sr_series_of(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return series_of_modality(orthanc, study_uid, "SR")


def _file(orthanc: Orthanc, instance_id: str) -> bytes:
    return httpx.get(f"{orthanc.url}/instances/{instance_id}/file", timeout=60).content


def download_results(
    orthanc: Orthanc, study_uid: str, folder: Path, expected: dict[str, int]
) -> dict[str, list[Path]]:
    """Wait until the archive holds ``expected`` result instances per modality; fetch them."""

    def complete() -> dict[str, list[str]] | None:
        found = {
            modality: [
                i for s in series_of_modality(orthanc, study_uid, modality) for i in s["Instances"]
            ]
            for modality in expected
        }
        return found if all(len(found[m]) >= n for m, n in expected.items()) else None

    found = wait_for(complete, 300, f"results {expected} did not all reach the archive")
    assert {m: len(ids) for m, ids in found.items()} == expected, "each result sent once"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    for modality, ids in found.items():
        for instance_id in ids:
            path = folder / f"{instance_id}.dcm"
            path.write_bytes(_file(orthanc, instance_id))
            files.setdefault(modality, []).append(path)
    return files


def push_and_wait_for_sr(
    orthanc: Orthanc, node: NodeProcess, ct_series: list[Path], tmp_path: Path
) -> tuple[Path, float]:
    """Have Orthanc push the study to the node; return the SR Orthanc got back and the time
    from the end of the push (last instance received) to the SR stored in Orthanc."""
    study = dcmread(ct_series[0], stop_before_pixels=True)
    orthanc_study = orthanc.upload(ct_series)
    orthanc.set_modality("node", "CURIA", node.dicom_port)
    orthanc.post("/modalities/node/store", json={"Resources": [orthanc_study], "Synchronous": True})
    pushed = time.monotonic()

    wait_for(
        lambda: sr_series_of(orthanc, study.StudyInstanceUID),
        300,
        f"no SR reached Orthanc; node log:\n{node.log()[-4000:]}",
    )
    elapsed = time.monotonic() - pushed
    results = download_results(orthanc, study.StudyInstanceUID, tmp_path / "results", EXPECTED)
    assert len(sr_series_of(orthanc, study.StudyInstanceUID)) == EXPECTED["SR"], (
        "each SR in its own series"
    )
    for path in results["SR"] + results["SEG"]:
        assert_dciodvfy_clean(path)
    for path in results["SR"]:
        assert_dsrdump_clean(path)
    assert_dcentvfy_clean(ct_series, results["SR"] + results["SEG"])
    assert_round_trip_through_dicomweb(orthanc, node, results["SR"] + results["SEG"])
    return results["SR"][0], elapsed


def assert_round_trip_through_dicomweb(
    orthanc: Orthanc, node: NodeProcess, received: list[Path]
) -> None:
    """Each result read back through Orthanc's DICOMweb (WADO-RS) says what the node wrote."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    results_dir = Path(node.env["CURIA_DATA_DIR"]) / "results"
    for path in received:
        header = dcmread(path, stop_before_pixels=True)
        via_web = client.retrieve_instance(
            header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID
        )
        written = dcmread(
            results_dir
            / header.StudyInstanceUID
            / header.SeriesInstanceUID
            / f"{header.SOPInstanceUID}.dcm"
        )
        assert via_web.SOPClassUID == written.SOPClassUID
        if "ContentSequence" in written:
            assert via_web.ContentSequence == written.ContentSequence, "SR content differs"
        if "PixelData" in written:
            assert via_web.PixelData == written.PixelData, "SEG frames differ"
            assert via_web.SegmentSequence == written.SegmentSequence


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
        dcmread(BytesIO(_file(orthanc, i)), stop_before_pixels=True).SOPInstanceUID
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
            second = dcmread(BytesIO(_file(orthanc, instance_id)))
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
    _delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])


def _delete_queues(prefix: str) -> None:
    from kombu import Connection

    with Connection(RABBITMQ_URL) as conn:
        channel = conn.channel()
        for stage in STAGES:
            channel.queue_delete(f"{prefix}.{stage}")
