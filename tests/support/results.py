"""The results a node sends to the archive (a real Orthanc): wait for them, fetch and check them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests.support.peers import NodeProcess, Orthanc, wait_for
from tests.support.validators import (
    assert_dcentvfy_clean,
    assert_dciodvfy_clean,
    assert_dsrdump_clean,
)

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


def instance_file(orthanc: Orthanc, instance_id: str) -> bytes:
    """The bytes Orthanc holds for one instance."""
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
            path.write_bytes(instance_file(orthanc, instance_id))
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
