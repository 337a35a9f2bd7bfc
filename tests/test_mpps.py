"""MPPS SCP: a modality (pynetdicom) reports its step; the node completes the series it lists
as soon as the last listed instance is stored, without waiting for the quiet period."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

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
from tests.support.peers import Orthanc, wait_for


@pytest.mark.e2e
def test_completed_step_completes_its_series_at_the_last_listed_instance(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    # A quiet period far longer than the test: only the MPPS signal can complete the series.
    node = node_factory(node_env(tmp_path, orthanc, CURIA_COMPLETION__SERIES_QUIET_SECONDS="600"))
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
