"""Storage Commitment Push Model SCP against a real requester: Orthanc asks the node to
commit instances (REST route and ``StorageCommitment`` on a store job); the node answers
on a new association with an N-EVENT-REPORT."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.env import node_env
from tests.support.modality import api_get
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for


def reports_to(
    orthanc: Orthanc, port: int | None = None, association: str = "new_association"
) -> dict[str, str]:
    """The node's settings that send Orthanc's reports to its DICOM port (or ``port``)."""
    address = {"host": "127.0.0.1", "port": port or orthanc.dicom_port}
    address["association"] = association
    return {"CURIA_DICOM__COMMITMENT__REPORT_TO": json.dumps({orthanc.aet: address})}


def request_commitment(orthanc: Orthanc, items: list[tuple[str, str]]) -> str:
    answer = orthanc.post(
        "/modalities/node/storage-commitment",
        json={
            "DicomInstances": [
                {"SOPClassUID": sop_class, "SOPInstanceUID": uid} for sop_class, uid in items
            ],
            "Timeout": 30,
        },
    )
    return answer["ID"]


def report_of(orthanc: Orthanc, transaction: str) -> dict:
    """Orthanc's record of the report, once it is no longer pending."""

    def done() -> dict | None:
        report = orthanc.get(f"/storage-commitment/{transaction}")
        return report if report["Status"] != "Pending" else None

    return wait_for(done, 30, f"no storage commitment report for {transaction}")


def push(orthanc: Orthanc, node: NodeProcess, ct_series: list[Path]) -> list[tuple[str, str]]:
    study = orthanc.upload(ct_series)
    orthanc.set_modality("node", "CURIA", node.dicom_port)
    orthanc.post("/modalities/node/store", json={"Resources": [study], "Synchronous": True})
    headers = [dcmread(f, stop_before_pixels=True) for f in ct_series]
    return [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers]


@pytest.mark.e2e
def test_stored_instances_are_committed_and_unknown_ones_fail(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    node = node_factory(node_env(tmp_path, orthanc, **reports_to(orthanc)))
    items = push(orthanc, node, ct_series)

    report = report_of(orthanc, request_commitment(orthanc, items))
    assert report["Status"] == "Success"
    assert sorted(i["SOPInstanceUID"] for i in report["Success"]) == sorted(u for _, u in items)
    assert report["Failures"] == []

    unknown = generate_uid()
    report = report_of(orthanc, request_commitment(orthanc, [items[0], (items[0][0], unknown)]))
    assert report["Status"] == "Failure"
    assert [i["SOPInstanceUID"] for i in report["Success"]] == [items[0][1]]
    assert [(i["SOPInstanceUID"], i["FailureReason"]) for i in report["Failures"]] == [
        (unknown, 0x0112)
    ]
    commitments = api_get(node, "/api/v1/commitments")
    assert [c["state"] for c in commitments] == ["answered", "answered"]
    assert commitments[0]["outcome"]["failed"][0]["sop_instance_uid"] == unknown


@pytest.mark.e2e
def test_same_then_new_still_reaches_a_requester_that_releases_at_once(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    # Orthanc releases its association right after the N-ACTION-RSP: whatever it does with
    # a report sent there, the answer reaches it, once.
    env = node_env(tmp_path, orthanc, **reports_to(orthanc, association="same_then_new"))
    node = node_factory(env)
    items = push(orthanc, node, ct_series)
    report = report_of(orthanc, request_commitment(orthanc, items))
    assert report["Status"] == "Success"
    assert sorted(i["SOPInstanceUID"] for i in report["Success"]) == sorted(u for _, u in items)
    (commitment,) = api_get(node, "/api/v1/commitments")
    assert commitment["state"] == "answered"


@pytest.mark.e2e
def test_store_job_with_storage_commitment(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    node = node_factory(node_env(tmp_path, orthanc, **reports_to(orthanc)))
    study = orthanc.upload(ct_series)
    orthanc.set_modality("node", "CURIA", node.dicom_port)
    job = orthanc.post(
        "/modalities/node/store",
        json={"Resources": [study], "StorageCommitment": True, "Synchronous": False},
    )
    content = wait_for(
        lambda: (j := orthanc.get(f"/jobs/{job['ID']}"))["State"] == "Success" and j,
        60,
        "Orthanc's store job finishes",
    )["Content"]
    transaction = content["StorageCommitmentTransactionUID"]
    report = report_of(orthanc, transaction)
    assert report["Status"] == "Success"
    assert len(report["Success"]) == len(ct_series)


@pytest.mark.e2e
def test_a_request_answered_before_a_restart_is_reported_after_it(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    # First the report cannot be delivered (nothing listens where it goes); the request is
    # in the catalogue, and the node stops while it is still pending.
    env = node_env(tmp_path, orthanc, **reports_to(orthanc, port=free_port()))
    node = node_factory(env)
    items = push(orthanc, node, ct_series)
    transaction = request_commitment(orthanc, items)
    wait_for(
        lambda: api_get(node, "/api/v1/commitments")[0]["attempts"] >= 1,
        30,
        "the node tried to report",
    )
    assert orthanc.get(f"/storage-commitment/{transaction}")["Status"] == "Pending"
    node.stop()

    node.env.update(reports_to(orthanc))
    node.start()
    report = report_of(orthanc, transaction)
    assert report["Status"] == "Success"
    assert len(report["Success"]) == len(ct_series)
    assert api_get(node, "/api/v1/commitments")[0]["state"] == "answered"


@pytest.mark.e2e
def test_a_requester_without_a_report_address_is_refused(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    node = node_factory(node_env(tmp_path, orthanc))
    items = push(orthanc, node, ct_series[:1])
    with pytest.raises(httpx.HTTPStatusError):  # Orthanc: the N-ACTION failed
        request_commitment(orthanc, items)
    assert (
        "storage commitment from ORTHANC refused: no dicom.commitment.report_to entry" in node.log()
    )
    assert api_get(node, "/api/v1/commitments") == []
