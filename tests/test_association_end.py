"""The end of an association as a completion signal, against a real node: on for a sender,
its series completes when it releases the association; off, the quiet period decides."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.env import node_env
from tests.support.modality import association, series_view, store
from tests.support.peers import Orthanc, wait_for


@pytest.mark.e2e
@pytest.mark.parametrize("on", [True, False])
def test_release_completes_the_series_of_a_sender_trusted_to_send_it_whole(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, on: bool
) -> None:
    sources = {"STORESCU": {"association_end": on}}
    env = node_env(
        tmp_path,
        orthanc,
        CURIA_COMPLETION__SERIES_QUIET_SECONDS="8",
        CURIA_COMPLETION__SOURCES=json.dumps(sources),
    )
    node = node_factory(env)
    series_uid = dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID
    with association(node, ct_series) as assoc:
        store(assoc, ct_series)
    released = time.monotonic()
    view = wait_for(
        lambda: (s := series_view(node, series_uid)) and s["state"] != "receiving" and s,
        30,
        "the series completes",
    )
    elapsed = time.monotonic() - released
    if on:
        assert view["completed_by"] == "association-end"
        assert elapsed < 5, f"completed {elapsed:.1f} s after the release, not at once"
    else:
        assert view["completed_by"] == "quiet"
        assert elapsed >= 6, "without the signal the quiet period decides"
