"""A whole CT study pushed by a real archive: every object stored, routed and accounted for.

Orthanc holds the study as a scanner and a reading room leave it (the axial series, a
localizer, the dose report, key objects, a presentation state, an RT structure set, a
secondary capture) and pushes it to the node with its C-STORE job. The node must store and
serve every object, analyse only the axial series, say why each other series was not
analysed, and forward every object of the study to a second Orthanc, once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from tests.support.env import node_env, production_env
from tests.support.peers import VENV_BIN, NodeProcess, Orthanc, free_port, wait_for
from tests.support.testdata import TEST_PATIENT_ID, TEST_PATIENT_NAME
from tests.support.whole_study import build_whole_study

RULES = """
rules:
  - name: dose-to-registry
    when: {sop_class: XRayRadiationDoseSRStorage}
    then: {forward: [registry]}
  - name: study-to-second
    then: {forward: [second]}
"""


@pytest.fixture
def second(tmp_path: Path) -> Iterator[Orthanc]:
    (tmp_path / "second").mkdir()
    server = Orthanc(tmp_path / "second", free_port(), free_port(), aet="SECOND")
    server.start()
    yield server
    server.stop()


def _api(node: NodeProcess) -> httpx.Client:
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text().strip()
    return httpx.Client(
        base_url=node.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _sop_instance_uids(orthanc: Orthanc, study_uid: str) -> set[str]:
    found = orthanc.post(
        "/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    )
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


def _series_states(api: httpx.Client, study_uid: str) -> dict[str, dict]:
    [study] = [s for s in api.get("/api/v1/studies").json() if s["study_instance_uid"] == study_uid]
    return {s["series_instance_uid"]: s for s in study["series"]}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "mode", ["embedded", pytest.param("production", marks=[pytest.mark.production])]
)
def test_orthanc_pushes_a_whole_study_every_object_is_kept_routed_and_accounted_for(
    orthanc: Orthanc,
    second: Orthanc,
    node_factory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    mode: str,
) -> None:
    if mode == "production":  # PostgreSQL catalogue, RabbitMQ, a separate worker
        env = production_env(tmp_path, orthanc, request.getfixturevalue("postgres_url"))
        node = node_factory(env, separate_worker=True)
    else:
        node = node_factory(node_env(tmp_path, orthanc))
    api = _api(node)
    for name in ("second", "registry"):  # the dose registry is the second Orthanc too
        created = api.post(
            "/api/v1/destinations",
            json={
                "name": name,
                "ae_title": second.aet,
                "host": "127.0.0.1",
                "port": second.dicom_port,
                "results": False,
            },
        )
        assert created.status_code == 201, created.text
    assert api.put("/api/v1/rules", json={"document": RULES}).status_code == 200

    study = build_whole_study(tmp_path / "study", f"whole-{uuid.uuid4()}")
    sent_uids = study.sop_instance_uids()
    orthanc_study = orthanc.upload(study.all_files)
    orthanc.set_modality("node", "CURIA", node.dicom_port)
    job = orthanc.post(
        "/modalities/node/store", json={"Resources": [orthanc_study], "Synchronous": True}
    )
    # The archive's job: every object sent, none failed.
    assert job["FailedInstancesCount"] == 0, job
    assert job["InstancesCount"] == len(sent_uids) == 26

    # Every object stored, catalogued and served by QIDO-RS and WADO-RS as it was sent.
    dicomweb = f"{node.api_url}/dicom-web/studies/{study.study_instance_uid}"
    listed = api.get(f"{dicomweb}/instances", headers={"Accept": "application/dicom+json"})
    assert listed.status_code == 200
    assert {item["00080018"]["Value"][0] for item in listed.json()} == sent_uids
    for path in study.all_files:
        sent = dcmread(path, stop_before_pixels=True)
        answer = api.get(
            f"{dicomweb}/series/{sent.SeriesInstanceUID}/instances/{sent.SOPInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert answer.status_code == 200, (path.parent.name, answer.status_code)
        body = answer.content
        start = body.index(b"DICM") - 128
        served = dcmread(DicomBytesIO(body[start:]), stop_before_pixels=True, force=True)
        assert served.SOPInstanceUID == sent.SOPInstanceUID
        assert served.SOPClassUID == sent.SOPClassUID

    # Only the axial series is analysed; every other series is "not analysed", with why.
    def settled() -> dict[str, dict] | None:
        states = _series_states(api, study.study_instance_uid)
        done = len(states) == len(study.files) and all(
            s["state"] in ("done", "not_analysed", "failed") for s in states.values()
        )
        return states if done else None

    states = wait_for(settled, 300, "the study's series did not all settle")
    by_kind = {kind: states[uid] for kind, uid in study.series.items()}
    assert by_kind["axial"]["state"] == "done", by_kind["axial"]
    assert [r["state"] for r in by_kind["axial"]["runs"]] == ["succeeded"]
    reasons = {}
    for kind, series in by_kind.items():
        if kind == "axial":
            continue
        assert series["state"] == "not_analysed", (kind, series)
        assert series["state_reason"], kind
        assert all(r["state"] == "not_analysed" for r in series["runs"]), (kind, series["runs"])
        reasons[kind] = series["state_reason"]
    assert "X-Ray Radiation Dose SR" in reasons["dose"]
    assert "RT Structure Set" in reasons["rtstruct"]
    assert "Key Object Selection" in reasons["kos"]
    assert "Grayscale Softcopy Presentation State" in reasons["gsps"]
    assert "Secondary Capture" in reasons["sc"]
    assert "locali" in reasons["localizer"].lower(), reasons["localizer"]
    analysed = [kind for kind, s in by_kind.items() if s["state"] == "done"]

    # Every object reaches the second Orthanc, once; the dose report by its own rule too.
    wait_for(
        lambda: _sop_instance_uids(second, study.study_instance_uid) == sent_uids,
        120,
        "the study did not reach the second Orthanc whole",
    )
    deliveries = [d for d in api.get("/api/v1/deliveries").json() if d["result_kind"] == "series"]
    mine = {d["series_uid"] for d in deliveries} & set(study.series.values())
    assert mine == set(study.series.values())
    routes = sorted(
        (d["destination"], d["rule"], d["state"])
        for d in deliveries
        if d["series_uid"] == study.series["dose"]
    )
    assert routes == [
        ("registry", "dose-to-registry", "sent"),
        ("second", "study-to-second", "sent"),
    ]

    # A second dose report arrives later, in another association (and the first once more):
    # it is stored and forwarded, nothing is analysed again, nothing is sent twice.
    late = dcmread(study.files["dose"][0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late_path = tmp_path / "late-dose.dcm"
    late.save_as(late_path, enforce_file_format=True)
    orthanc.upload([late_path])
    resources = [
        orthanc.post("/tools/lookup", content=uid)[0]["ID"]
        for uid in (str(late.SOPInstanceUID), str(dcmread(study.files["dose"][0]).SOPInstanceUID))
    ]
    late_job = orthanc.post(
        "/modalities/node/store", json={"Resources": resources, "Synchronous": True}
    )
    assert late_job["FailedInstancesCount"] == 0 and late_job["InstancesCount"] == 2
    all_uids = sent_uids | {str(late.SOPInstanceUID)}
    wait_for(
        lambda: _sop_instance_uids(second, study.study_instance_uid) == all_uids,
        120,
        "the late dose report did not reach the second Orthanc",
    )
    wait_for(
        lambda: all(
            d["state"] == "sent"
            for d in api.get("/api/v1/deliveries").json()
            if d["series_uid"] == study.series["dose"]
        ),
        60,
        "the dose series' forwards did not settle",
    )
    states = _series_states(api, study.study_instance_uid)
    assert [r["state"] for r in states[study.series["axial"]]["runs"]] == ["succeeded"]
    assert states[study.series["dose"]]["state"] == "not_analysed"
    sends = re.findall(r"sent (\d+) object\(s\) to second \(", node.log() + node.log("worker.log"))
    assert sum(int(n) for n in sends) == len(all_uids), sends
    forwarded = _sop_instance_uids(second, study.study_instance_uid)

    # One INFO line per series not analysed, no traceback, no patient data in the log.
    log = node.log() + node.log("worker.log")
    lines = [
        line for line in log.splitlines() if re.search(r"INFO.* series \d+ not analysed", line)
    ]
    assert len(lines) == len(study.files) - 1, lines
    assert "Traceback" not in log
    assert TEST_PATIENT_NAME not in log and TEST_PATIENT_ID not in log

    # The dashboard counts every object and shows each series' state and reason.
    overview = api.get("/api/v1/overview").json()
    assert overview["counts"]["instances_received"] >= len(sent_uids)
    assert overview["counts"]["series_by_state"]["not_analysed"] >= len(study.files) - 1
    [shown_study] = [
        s for s in overview["studies"] if s["study_instance_uid"] == study.study_instance_uid
    ]
    assert {s["uid"]: s["state_reason"] for s in shown_study["series"]} == {
        uid: states[uid]["state_reason"] for uid in states
    }

    # `curia-node status` says the same.
    shown = subprocess.run(
        [str(VENV_BIN / "curia-node"), "status", "--study", study.study_instance_uid],
        env={**os.environ, **node.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert shown.count("not analysed") >= len(study.files) - 1, shown
    assert "X-Ray Radiation Dose SR" in shown

    measured = {
        "sent_by_orthanc": job["InstancesCount"],
        "failed_at_orthanc": job["FailedInstancesCount"],
        "stored_and_served": len(sent_uids),
        "series": len(states),
        "series_analysed": analysed,
        "series_not_analysed": {kind: reasons[kind] for kind in sorted(reasons)},
        "late_dose_reports_pushed": 2,
        "forwarded_to_second_orthanc": len(forwarded),
        "objects_in_forward_sends": sum(int(n) for n in sends),
    }
    print(f"whole-study push ({mode}):", json.dumps(measured, indent=1))
