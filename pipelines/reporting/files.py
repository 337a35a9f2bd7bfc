"""Writing a result object (SR or SEG) to disk so that no reader sees half of it.

Results are read by other processes (delivery) while more are being written, and a worker
can be killed mid-write: a file appears under its final name complete or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["write_dataset"]


def write_dataset(ds: Dataset, path: Path | str) -> Path:
    """Write ``ds`` as a DICOM file (Explicit VR Little Endian), atomically and durably.

    A temp file in the same folder, fsync, rename, then fsync of the folder: a reader (or
    a crash) never sees a half-written object under the final name, and a written one
    survives a power cut.
    """
    path = Path(path)
    meta = FileMetaDataset(ds.file_meta) if hasattr(ds, "file_meta") else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            pydicom.dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
