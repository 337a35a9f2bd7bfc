"""Stacks built from real scans for the stack tests: pydicom's Enhanced MR samples, the real
CT as one Legacy Converted Enhanced CT object, and coronal/sagittal slices resliced from it."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipelines.model.preprocess import load_series


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is missing: install pydicom-data"
    return Path(path)


def legacy_enhanced_ct(real_ct: list[Path], dest: Path, syntax: str) -> Path:
    """The real CT as one Legacy Converted Enhanced CT object (highdicom)."""
    sources = [pydicom.dcmread(p) for p in real_ct]
    for ds in sources:  # highdicom wants them uncompressed
        ds.decompress()
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sources,
        series_instance_uid=generate_uid(entropy_srcs=["lce", syntax]),
        series_number=3,
        sop_instance_uid=generate_uid(entropy_srcs=["lce-instance", syntax]),
        instance_number=1,
        transfer_syntax_uid=syntax,
    )
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"lce-{syntax}.dcm"
    image.save_as(path)
    return path


def resliced(real_ct: list[Path], dest: Path, plane: str, step: int = 64) -> list[Path]:
    """Coronal or sagittal slices resliced from the real CT's axial volume, stored in an
    orientation that needs a transpose and a flip (coronal) or a flip (sagittal)."""
    volume = load_series(real_ct)  # (z up, y posterior, x left): PL axial slices, feet first
    first = pydicom.dcmread(volume.paths[0])
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    dr, dc = (float(v) for v in first.PixelSpacing)
    dz = z_of(volume.paths[1]) - z_of(volume.paths[0])
    series_uid = generate_uid(entropy_srcs=["resliced", plane])
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    count = volume.pixels.shape[1 if plane == "coronal" else 2]
    for n, j in enumerate(range(0, count, step)):
        ds = pydicom.dcmread(volume.paths[0])
        ds.decompress()
        if plane == "coronal":  # rows run along +x (Left), columns along +z (Superior)
            stored = volume.pixels[:, j, :].T
            ds.ImageOrientationPatient = [0, 0, 1, 1, 0, 0]
            ds.ImagePositionPatient = [x0, y0 + j * dr, z0]
            ds.PixelSpacing = [dc, dz]
        else:  # rows run along +z, columns along +y (Posterior)
            stored = volume.pixels[:, :, j]
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, 1]
            ds.ImagePositionPatient = [x0 + j * dc, y0, z0]
            ds.PixelSpacing = [dz, dr]
        raw = np.round((stored - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        pixels = raw.astype(ds.pixel_array.dtype)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["resliced", plane, str(j)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = 100 - n  # acquisition order the reverse of the spatial one
        path = dest / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def z_of(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])
