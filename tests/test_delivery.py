"""Delivery faults end to end: the archive (a real Orthanc) is down, then comes back.

Results are delivered after it returns, by the automatic backoff or, once dead-lettered,
by a re-queue from the API or the CLI; and exactly one SR reaches the archive.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.support.env import node_env
from tests.support.peers import VENV_BIN, NodeProcess, Orthanc, free_port, wait_for
from tests.support.storescu import send_to_node


def _sr_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return [
        s for s in orthanc.series_of_study(study_uid) if s["MainDicomTags"].get("Modality") == "SR"
    ]


def _deliveries(node: NodeProcess, state: str | None = None) -> list[dict]:
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text()
    response = httpx.get(
        f"{node.api_url}/api/v1/deliveries",
        params={"state": state} if state else {},
        headers={"Authorization": f"Bearer {token}"},
    )
    response.raise_for_status()
    return response.json()


@pytest.fixture
def archive_down(tmp_path: Path) -> Orthanc:
    """An Orthanc whose ports are fixed but which is not started yet."""
    (tmp_path / "archive").mkdir()
    return Orthanc(tmp_path / "archive", free_port(), free_port())


@pytest.mark.e2e
def test_results_reach_an_archive_that_comes_back(
    archive_down: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    env = node_env(
        tmp_path,
        archive_down,
        CURIA_DELIVERY__MAX_ATTEMPTS="30",
        CURIA_DELIVERY__BACKOFF_SECONDS="0.5",
        CURIA_DELIVERY__BACKOFF_MAX_SECONDS="1",
    )
    node = node_factory(env)
    send_to_node(node, ct_series)
    wait_for(
        lambda: any(d["attempts"] >= 2 for d in _deliveries(node, "pending")),
        120,
        "the node keeps retrying while the archive is down",
    )
    archive_down.start()
    try:
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        wait_for(lambda: _sr_series(archive_down, study_uid), 60, "SR delivered after return")
        wait_for(
            lambda: all(d["state"] == "sent" for d in _deliveries(node)), 60, "all results sent"
        )
        assert len(_deliveries(node)) == 3, "a SEG and two SRs, each delivered once"
        assert len(_sr_series(archive_down, study_uid)) == 2  # two SRs, one series each
    finally:
        archive_down.stop()


@pytest.mark.e2e
def test_dead_lettered_delivery_is_requeued_and_sent_once(
    archive_down: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    env = node_env(
        tmp_path,
        archive_down,
        CURIA_DELIVERY__MAX_ATTEMPTS="2",
        CURIA_DELIVERY__BACKOFF_SECONDS="0.2",
    )
    node = node_factory(env)
    send_to_node(node, ct_series)
    dead = wait_for(
        lambda: (f := _deliveries(node, "failed")) and len(f) == 3 and f,
        120,
        "all three deliveries dead-lettered",
    )[0]
    assert dead["attempts"] == 2 and dead["last_error"]

    cli = subprocess.run(
        [str(VENV_BIN / "curia-node"), "results", "deliveries", "--state", "failed"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "failed" in cli.stdout

    archive_down.start()
    try:
        retry = subprocess.run(
            [str(VENV_BIN / "curia-node"), "results", "retry", "--all-failed"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert retry.returncode == 0, retry.stderr
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        wait_for(
            lambda: all(d["state"] == "sent" for d in _deliveries(node)), 60, "sent after re-queue"
        )
        assert len(_sr_series(archive_down, study_uid)) == 2  # two SRs, one series each

        again = subprocess.run(
            [str(VENV_BIN / "curia-node"), "results", "retry", str(dead["id"])],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert again.returncode == 2 and "not failed" in again.stderr, "a sent one is not resent"
        assert len(_sr_series(archive_down, study_uid)) == 2  # two SRs, one series each

        shown = subprocess.run(
            [str(VENV_BIN / "curia-node"), "results", "show", study_uid],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert shown.returncode == 0, shown.stderr
        assert "Imaging Measurement Report" in shown.stdout
        assert "demo" in shown.stdout.lower()
    finally:
        archive_down.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["stow-rs", "orthanc-rest"])
def test_results_delivered_over_http_destinations(
    protocol: str, orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    url = f"{orthanc.url}/dicom-web" if protocol == "stow-rs" else orthanc.url
    env = node_env(tmp_path, orthanc, CURIA_ARCHIVE__PROTOCOL=protocol, CURIA_ARCHIVE__URL=url)
    node = node_factory(env)
    send_to_node(node, ct_series)
    study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
    wait_for(
        lambda: (d := _deliveries(node)) and len(d) == 3 and all(x["state"] == "sent" for x in d),
        120,
        f"all results sent over {protocol}",
    )
    assert len(_sr_series(orthanc, study_uid)) == 2  # two SRs, one series each
