"""Routing end to end: a real node, rules and destinations set while it runs, two Orthancs.

The archive (session Orthanc) gets the results as always; a second Orthanc plays the
neuro reading room: the rules forward the original CT there at completion (before any
inference) and, on a finding, send the results there too. A localiser is discarded.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.support.env import node_env
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for
from tests.support.storescu import send_to_node
from tests.support.testdata import TEST_PATIENT_ID, TEST_PATIENT_NAME, repaired_ct_series

RULES = """
rules:
  - name: skip-localisers
    when: {max_slices: 3}
    then: {discard: true, stop: true}
  - name: ct-to-neuro
    when: {modality: CT, min_slices: 4}
    then: {priority: stat, forward: [neuro]}
  - name: region-known
    when:
      finding: {head: body-region}
    then: {results_to: [neuro]}
"""


@pytest.fixture
def neuro(tmp_path: Path) -> Iterator[Orthanc]:
    (tmp_path / "neuro").mkdir()
    server = Orthanc(tmp_path / "neuro", free_port(), free_port(), aet="NEURO")
    server.start()
    yield server
    server.stop()


def _api(node: NodeProcess) -> httpx.Client:
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text()
    return httpx.Client(
        base_url=node.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _modalities(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series in orthanc.series_of_study(study_uid):
        modality = series["MainDicomTags"].get("Modality", "?")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


@pytest.mark.e2e
def test_rules_forward_the_original_and_route_results_by_findings(
    orthanc: Orthanc, neuro: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    env = node_env(tmp_path, orthanc, CURIA_LOG_FORMAT="json")
    node = node_factory(env)
    api = _api(node)

    # Configured while the node runs: a destination, then rules that name it.
    created = api.post(
        "/api/v1/destinations",
        json={
            "name": "neuro",
            "ae_title": neuro.aet,
            "host": "127.0.0.1",
            "port": neuro.dicom_port,
            "results": False,
        },
    )
    assert created.status_code == 201, created.text
    assert api.post("/api/v1/destinations/neuro/test").json()["ok"]
    refused = api.put("/api/v1/rules", json={"document": RULES.replace("[neuro]", "[nobody]")})
    assert refused.status_code == 422 and "unknown destination(s): nobody" in refused.text
    saved = api.put("/api/v1/rules", json={"document": RULES})
    assert saved.status_code == 200, saved.text

    study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
    send_to_node(node, ct_series)
    localiser = repaired_ct_series(tmp_path / "scout", f"scout-{uuid.uuid4()}")[:2]
    send_to_node(node, localiser)

    # The original series reaches the neuro room whole, and the results follow it there.
    wait_for(
        lambda: _modalities(neuro, study_uid).get("CT") == len(ct_series),
        120,
        "the CT series was not forwarded to the neuro destination",
    )
    wait_for(
        lambda: (
            _modalities(neuro, study_uid).get("SR") == 2
            and _modalities(orthanc, study_uid).get("SR") == 2
        ),
        300,
        "results did not reach both the archive and the neuro destination",
    )
    deliveries = api.get("/api/v1/deliveries").json()
    forwards = [d for d in deliveries if d["result_kind"] == "series"]
    assert [(d["destination"], d["rule"], d["state"]) for d in forwards] == [
        ("neuro", "ct-to-neuro", "sent")
    ]
    to_neuro = [
        d for d in deliveries if d["result_kind"] != "series" and d["destination"] == "neuro"
    ]
    assert to_neuro and {d["rule"] for d in to_neuro} == {"region-known"}

    # The rule tester explains the stored study without changing anything.
    tested = api.post("/api/v1/rules/test", json={"study_instance_uid": study_uid}).json()
    [decision] = [item["decision"] for item in tested["series"]]
    assert decision["fired"] == ["ct-to-neuro", "region-known"]
    assert decision["priority_name"] == "stat" and decision["phase"] == "findings"
    scout_study = dcmread(localiser[0], stop_before_pixels=True).StudyInstanceUID
    tested = api.post("/api/v1/rules/test", json={"study_instance_uid": scout_study}).json()
    [decision] = [item["decision"] for item in tested["series"]]
    assert decision["discard"] and decision["fired"] == ["skip-localisers"]

    # The localiser was discarded: never analysed, never forwarded.
    scout_uid = dcmread(localiser[0], stop_before_pixels=True).SeriesInstanceUID
    studies = api.get("/api/v1/studies").json()
    scout = next(s for st in studies for s in st["series"] if s["series_instance_uid"] == scout_uid)
    assert scout["state"] == "done" and scout["runs"] == []
    assert not any(d["series_uid"] == scout_uid for d in deliveries)

    # Structured logs: one JSON object per line, and no patient data in any of them.
    entries = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    assert len(entries) >= 5 and {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(
        e["logger"] == "node.service" and e["message"] == "Curia Node ready" for e in entries
    )
    text = node.log()
    assert TEST_PATIENT_NAME not in text and TEST_PATIENT_ID not in text
