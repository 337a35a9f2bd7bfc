"""MPPS SCP: a modality (pynetdicom) reports its step; the node completes the series it lists
as soon as the last listed instance is stored, without waiting for the quiet period."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from tests.support.env import node_env
from tests.support.modality import (
    MPPS,
    api_get,
    association,
    series_view,
    step_ended,
    step_in_progress,
    store,
)
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for


@pytest.mark.e2e
def test_completed_step_completes_its_series_at_the_last_listed_instance(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    # A quiet period far longer than the test: only the MPPS signal can complete the series.
    env = node_env(tmp_path, orthanc, CURIA_COMPLETION__SERIES_QUIET_SECONDS="600")
    completed_step_completes_its_series(node_factory(env), ct_series)


@pytest.mark.e2e
@pytest.mark.production
def test_completed_step_completes_its_series_with_a_postgresql_catalogue(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = node_env(
        tmp_path,
        orthanc,
        CURIA_COMPLETION__SERIES_QUIET_SECONDS="600",
        CURIA_DATABASE_URL=postgres_url,
    )
    completed_step_completes_its_series(node_factory(env), ct_series)


def completed_step_completes_its_series(node: NodeProcess, ct_series: list[Path]) -> None:
    header = dcmread(ct_series[0], stop_before_pixels=True)
    step_uid = generate_uid()
    with association(node, ct_series) as assoc:
        status, _ = assoc.send_n_create(step_in_progress(header.StudyInstanceUID), MPPS, step_uid)
        assert status.Status == 0x0000
        again, _ = assoc.send_n_create(step_in_progress(header.StudyInstanceUID), MPPS, step_uid)
        assert again.Status == 0x0111, "a second N-CREATE of one step is a duplicate"
        unknown, _ = assoc.send_n_set(step_ended("COMPLETED", ct_series), MPPS, generate_uid())
        assert unknown.Status == 0x0112, "N-SET of an unknown step"

        steps = api_get(node, "/api/v1/performed-steps")
        assert [(s["sop_instance_uid"], s["status"]) for s in steps] == [(step_uid, "IN PROGRESS")]

        store(assoc, ct_series[:-1])
        status, _ = assoc.send_n_set(step_ended("COMPLETED", ct_series), MPPS, step_uid)
        assert status.Status == 0x0000
        last = dcmread(ct_series[-1], stop_before_pixels=True).SOPInstanceUID

        waiting = wait_for(
            lambda: (series_view(node, header.SeriesInstanceUID) or {}).get("waiting_for"),
            20,
            "the series shows what the step still misses",
        )
        assert waiting["missing"] == 1 and waiting["missing_uids"] == [last]
        assert series_view(node, header.SeriesInstanceUID)["state"] == "receiving"

        store(assoc, ct_series[-1:])
        stored = time.monotonic()
        view = wait_for(
            lambda: (
                (s := series_view(node, header.SeriesInstanceUID))
                and s["state"] != "receiving"
                and s
            ),
            30,
            "the series completes once its last listed instance is stored",
        )
        print(f"last listed instance -> series complete: {time.monotonic() - stored:.2f} s")
        assert view["completed_by"] == "mpps"
        assert view["waiting_for"] is None

        closed, _ = assoc.send_n_set(step_ended("COMPLETED", ct_series), MPPS, step_uid)
        assert closed.Status == 0x0110, "an ended step may no longer be updated"
    steps = api_get(node, "/api/v1/performed-steps")
    assert steps[0]["status"] == "COMPLETED"
    assert steps[0]["series"] == {header.SeriesInstanceUID: len(ct_series)}
    assert steps[0]["study_instance_uid"] == header.StudyInstanceUID


@pytest.mark.e2e
def test_discontinued_step_listing_a_missing_instance_waits_for_the_quiet_period(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    node = node_factory(node_env(tmp_path, orthanc, CURIA_COMPLETION__SERIES_QUIET_SECONDS="8"))
    header = dcmread(ct_series[0], stop_before_pixels=True)
    step_uid = generate_uid()
    never_sent = generate_uid()
    with association(node, ct_series) as assoc:
        status, _ = assoc.send_n_create(step_in_progress(header.StudyInstanceUID), MPPS, step_uid)
        assert status.Status == 0x0000
        store(assoc, ct_series)
        ended = step_ended("DISCONTINUED", ct_series, extra_uids=[never_sent])
        status, _ = assoc.send_n_set(ended, MPPS, step_uid)
        assert status.Status == 0x0000
    waiting = wait_for(
        lambda: (series_view(node, header.SeriesInstanceUID) or {}).get("waiting_for"),
        6,
        "the series shows the instance the step listed and never came",
    )
    assert waiting == {
        "signal": "mpps",
        "step": step_uid,
        "missing": 1,
        "missing_uids": [never_sent],
    }
    view = wait_for(
        lambda: (
            (s := series_view(node, header.SeriesInstanceUID)) and s["state"] != "receiving" and s
        ),
        30,
        "the quiet period completes it in the end",
    )
    assert view["completed_by"] == "quiet"
    assert api_get(node, "/api/v1/performed-steps")[0]["status"] == "DISCONTINUED"


@pytest.mark.e2e
def test_steps_are_forwarded_in_order_once_the_ris_answers(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    """The RIS is down while the modality reports; both requests reach it later, in order."""
    port = free_port()
    forward = {"ae_title": "RIS", "host": "127.0.0.1", "port": port, "retry_seconds": 1}
    env = node_env(tmp_path, orthanc, CURIA_DICOM__MPPS_FORWARD=json.dumps(forward))
    node = node_factory(env)
    header = dcmread(ct_series[0], stop_before_pixels=True)
    step_uid = generate_uid()
    with association(node, ct_series) as assoc:
        status, _ = assoc.send_n_create(step_in_progress(header.StudyInstanceUID), MPPS, step_uid)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_set(step_ended("COMPLETED", ct_series), MPPS, step_uid)
        assert status.Status == 0x0000
    wait_for(lambda: "MPPS forwarding: association with RIS" in node.log(), 20, "a failed try")

    received: list[tuple[str, str, str]] = []

    def on_create(event: evt.Event) -> tuple[int, Dataset]:
        attributes = event.attribute_list
        received.append(
            (
                "create",
                event.request.AffectedSOPInstanceUID,
                attributes.PerformedProcedureStepStatus,
            )
        )
        return 0x0000, attributes

    def on_set(event: evt.Event) -> tuple[int, Dataset]:
        changes = event.modification_list
        received.append(
            ("set", event.request.RequestedSOPInstanceUID, changes.PerformedProcedureStepStatus)
        )
        return 0x0000, changes

    ris = AE(ae_title="RIS")
    ris.add_supported_context(MPPS)
    server = ris.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)],
    )
    try:
        wait_for(lambda: len(received) == 2, 30, "both MPPS requests reach the RIS")
    finally:
        server.shutdown()
    assert received == [
        ("create", step_uid, "IN PROGRESS"),
        ("set", step_uid, "COMPLETED"),
    ]
