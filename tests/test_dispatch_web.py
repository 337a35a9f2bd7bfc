"""HTTP destinations against real peers: Orthanc's DICOMweb plugin and REST API, and the
node's own STOW-RS service (which checks the bearer token)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.delivery.orthanc import OrthancRestDestination
from node.delivery.stow import StowRsDestination
from node.delivery.transport import DispatchError
from tests.support.api_server import RunningNode, running_node
from tests.support.peers import Orthanc, free_port
from tests.support.testdata import make_sr


def fresh_ct_small(folder: Path) -> Path:
    """pydicom's CT_small with new UIDs, so each test's object is new to the shared Orthanc."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def in_orthanc(orthanc: Orthanc, sop_uid: str) -> bool:
    query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    return bool(orthanc.post("/tools/find", json=query))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    with running_node(tmp_path_factory.mktemp("node")) as running:
        yield running


def test_stow_rs_destination_stores_in_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    ct = fresh_ct_small(tmp_path)
    sr = tmp_path / "sr.dcm"
    report = make_sr(dcmread(ct).StudyInstanceUID, sr)
    StowRsDestination("orthanc-web", f"{orthanc.url}/dicom-web").send([ct, sr])
    assert in_orthanc(orthanc, dcmread(ct).SOPInstanceUID)
    assert in_orthanc(orthanc, report.SOPInstanceUID)


def test_orthanc_rest_destination_stores_in_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    sr = tmp_path / "sr.dcm"
    report = make_sr(generate_uid(), sr)
    OrthancRestDestination("orthanc-rest", orthanc.url).send([sr, sr])
    assert in_orthanc(orthanc, report.SOPInstanceUID)


def test_stow_rs_destination_sends_its_token(node: RunningNode, tmp_path: Path) -> None:
    ct = fresh_ct_small(tmp_path)
    with pytest.raises(DispatchError, match="HTTP 401"):
        StowRsDestination("peer", node.dicomweb, token="wrong").send([ct])
    StowRsDestination("peer", node.dicomweb, token=node.token).send([ct])
    assert node.catalogued([dcmread(ct).SOPInstanceUID])


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_stow_rs_refusal_names_the_failure(node: RunningNode, tmp_path: Path) -> None:
    """A STOW-RS service that stores nothing is a failed send, with its failure reasons."""
    ds = dcmread(fresh_ct_small(tmp_path))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.04"  # zero-padded
    bad = tmp_path / "bad-uid.dcm"
    ds.save_as(bad, enforce_file_format=True)
    with pytest.raises(DispatchError, match=r"HTTP 409 \(failure reasons 0xA900\)"):
        StowRsDestination("peer", node.dicomweb, node.token).send([bad])


@pytest.mark.parametrize(
    "destination",
    [
        lambda port: StowRsDestination("down", f"http://127.0.0.1:{port}/dicom-web", timeout=5),
        lambda port: OrthancRestDestination("down", f"http://127.0.0.1:{port}", timeout=5),
    ],
    ids=["stow-rs", "orthanc-rest"],
)
def test_a_down_destination_raises(destination, tmp_path: Path) -> None:
    with pytest.raises(DispatchError, match=r"down .* unreachable"):
        destination(free_port()).send([fresh_ct_small(tmp_path)])


def test_orthanc_refusing_a_file_raises(orthanc: Orthanc, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file")
    with pytest.raises(DispatchError, match="refused an instance with HTTP 400"):
        OrthancRestDestination("orthanc-rest", orthanc.url).send([junk])


def test_invalid_destinations_are_refused_and_secrets_not_shown() -> None:
    with pytest.raises(ValueError, match="http"):
        StowRsDestination("x", "ftp://pacs/dicom-web")
    with pytest.raises(ValueError, match="both"):
        OrthancRestDestination("x", "http://pacs", username="u")
    assert "s3cret" not in repr(StowRsDestination("x", "http://pacs", token="s3cret"))
    assert "s3cret" not in repr(OrthancRestDestination("x", "http://pacs", "u", "s3cret"))
