"""NIfTI volumes as training series: read with nibabel, laid out like a sorted DICOM series.

nibabel is optional: it is imported only when a NIfTI volume is actually read, so the node
runs (and trains on DICOM) without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipelines.model.orientation import MAX_OBLIQUITY_DEG, SeriesError


def nifti_to_pl(data: np.ndarray, affine: np.ndarray, source: str = "volume") -> np.ndarray:
    """A NIfTI volume as axial PL slices (S, H, W), feet to head, like a sorted DICOM series.

    NIfTI's world is RAS (+x Right, +y Anterior, +z Superior). Each array axis is matched to
    its nearest world axis from the affine; the volume is transposed to (z, y, x) and flipped
    so slices run inferior to superior, rows towards Posterior and columns towards Left.
    """
    if data.ndim != 3:
        raise SeriesError(f"{source}: expected a 3D volume, got shape {data.shape}")
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    world_of_axis, sign_of_axis = [], []
    for axis in range(3):
        column = directions[:, axis]
        norm = float(np.linalg.norm(column))
        if not norm > 0:
            raise SeriesError(f"{source}: affine has a zero column for array axis {axis}")
        world = int(np.argmax(np.abs(column)))
        angle = math.degrees(math.acos(min(1.0, abs(float(column[world])) / norm)))
        if angle > MAX_OBLIQUITY_DEG:
            raise SeriesError(f"{source}: array axis {axis} is {angle:.0f} degrees oblique")
        world_of_axis.append(world)
        sign_of_axis.append(float(np.sign(column[world])))
    if sorted(world_of_axis) != [0, 1, 2]:
        raise SeriesError(f"{source}: two array axes map onto the same patient axis")
    axis_of_world = {w: a for a, w in enumerate(world_of_axis)}
    volume = np.transpose(data, (axis_of_world[2], axis_of_world[1], axis_of_world[0]))
    if sign_of_axis[axis_of_world[2]] < 0:  # slices must run towards Superior
        volume = volume[::-1]
    if sign_of_axis[axis_of_world[1]] > 0:  # rows must run towards Posterior (-y in RAS)
        volume = volume[:, ::-1]
    if sign_of_axis[axis_of_world[0]] > 0:  # columns must run towards Left (-x in RAS)
        volume = volume[:, :, ::-1]
    return np.ascontiguousarray(volume, dtype=np.float32)


def load_nifti(path: Path) -> np.ndarray:
    """Read a NIfTI volume (scaled values: HU for CT) as PL slices (S, H, W)."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: cannot read NIfTI: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return nifti_to_pl(data, image.affine, str(path))
