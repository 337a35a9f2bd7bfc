"""Real test data fetched at test time into an ignored cache (never committed).

The TotalSegmentator sdist on PyPI ships a real 20-slice abdominal CT (JPEG 2000 lossless)
whose SOP Class/Instance, Study and Series UIDs are present but empty. The repair below is
explicit and deterministic per ``label``, so each test gets its own study.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CACHE = Path(os.environ.get("CURIA_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
TOTALSEG = "totalsegmentator==2.18.0"
TOTALSEG_DICOM = "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom"
TEST_PATIENT_NAME = "CURIATEST^PATIENT"
TEST_PATIENT_ID = "CURIA-TEST-4711"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def totalseg_ct_dir() -> Path:
    """The unpacked sample CT folder, downloading the sdist once."""
    root = CACHE / "testdata"
    folder = root / TOTALSEG_DICOM
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archives = list(root.glob("totalsegmentator-2.18.0.tar.gz"))
    if not archives:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                TOTALSEG,
                "-d",
                str(root),
            ],
            check=True,
        )
        archives = list(root.glob("totalsegmentator-2.18.0.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(TOTALSEG_DICOM)]
        tar.extractall(root, members=members, filter="data")
    return folder


def repaired_ct_series(dest: Path, label: str) -> list[Path]:
    """Copy the sample CT into ``dest`` with valid, deterministic UIDs for ``label``.

    Repaired: SOPClassUID (from the file meta), SOPInstanceUID, StudyInstanceUID,
    SeriesInstanceUID, and a test patient's name and ID (so log tests can look for them).
    """
    dest.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[label, "study"])
    series_uid = generate_uid(entropy_srcs=[label, "series"])
    paths = []
    for source in sorted(totalseg_ct_dir().iterdir()):
        ds = dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[label, source.name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.PatientName = TEST_PATIENT_NAME
        ds.PatientID = TEST_PATIENT_ID
        path = dest / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_sr(study_uid: str, path: Path) -> Dataset:
    """A small text SR such as the node writes for a study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber = "SR", "Curia AI results", 99
    ds.PatientID, ds.InstanceNumber = TEST_PATIENT_ID, 1
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds
