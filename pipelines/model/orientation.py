"""Slice orientation: how a stored slice maps onto Curia's layout of its plane.

Curia's image processor lays out axial slices "PL" (array axis 0 towards the patient's
Posterior, axis 1 towards the Left: ImageOrientationPatient [1,0,0,0,1,0]), coronal slices
"IL" (Inferior, Left) and sagittal slices "IP" (Inferior, Posterior). This module finds a
stack's plane from its ImageOrientationPatient and the transpose and flips that reach that
layout; slices within :data:`MAX_OBLIQUITY_DEG` of a plane are snapped to it, true obliques
are refused. It is pure geometry (numpy only), so key regions and
masks can map PL grids back to stored pixels without reading any file.

:class:`SeriesError` lives here, at the bottom of series reading, so every step from
orientation to decoding refuses a series with the same exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

#: Largest angle (degrees) between a slice's row/column direction and the nearest patient
#: axis for the series to count as axial; covers gantry tilt, refuses true obliques.
MAX_OBLIQUITY_DEG = 25.0

#: The patient planes Curia lays out; a head card names those it accepts.
Plane = Literal["axial", "coronal", "sagittal"]


class SeriesError(ValueError):
    """A series the node cannot turn into Curia input; the message says why."""


@dataclass(frozen=True)
class Reorientation:
    """How to turn a stored slice into Curia's PL layout: an optional transpose, then flips.

    ``transpose`` swaps the array axes (rows run left-right instead of posterior-anterior);
    ``flip_rows`` / ``flip_cols`` reverse axis 0 / axis 1 afterwards.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Reorient the last two axes of ``pixels`` (a slice or a stack of slices)."""
        out = np.swapaxes(pixels, -1, -2) if self.transpose else pixels
        if self.flip_rows:
            out = np.flip(out, axis=-2)
        if self.flip_cols:
            out = np.flip(out, axis=-1)
        return np.ascontiguousarray(out)

    def undo(self, pixels: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`apply`: PL layout back to the stored layout.

        ``apply`` transposes, then flips; so the inverse flips (flips commute and are their
        own inverse), then transposes.
        """
        out = pixels
        if self.flip_cols:
            out = np.flip(out, axis=-1)
        if self.flip_rows:
            out = np.flip(out, axis=-2)
        if self.transpose:
            out = np.swapaxes(out, -1, -2)
        return np.ascontiguousarray(out)

    def output_shape(self, rows: int, columns: int) -> tuple[int, int]:
        return (columns, rows) if self.transpose else (rows, columns)


def _nearest_axis(direction: np.ndarray) -> tuple[int, float, float]:
    """(axis index, sign, angle in degrees) of the patient axis closest to ``direction``."""
    axis = int(np.argmax(np.abs(direction)))
    cosine = min(1.0, abs(float(direction[axis])))
    return axis, float(np.sign(direction[axis])), float(np.degrees(np.arccos(cosine)))


#: Curia's layout of each plane: (patient axis, sign) that array axis 0 (down the rows) and
#: axis 1 (along a row) must point to, in LPS axes (x Left, y Posterior, z Superior).
#: Axial "PL" (Posterior, Left), coronal "IL" (Inferior, Left), sagittal "IP" (Inferior,
#: Posterior), as Curia's image processor lays them out.
LAYOUTS: dict[Plane, tuple[tuple[int, float], tuple[int, float]]] = {
    "axial": ((1, 1.0), (0, 1.0)),
    "coronal": ((2, -1.0), (0, 1.0)),
    "sagittal": ((2, -1.0), (1, 1.0)),
}

#: The plane whose slices are perpendicular to each patient axis (the normal's axis).
_PLANE_OF_NORMAL: dict[int, Plane] = {0: "sagittal", 1: "coronal", 2: "axial"}


class ObliqueStack(SeriesError):
    """Slices too far from every patient plane for any of Curia's layouts."""


def plane_of(iop: Sequence[float], source: str = "series") -> Plane:
    """The patient plane of slices with this ImageOrientationPatient (normal's nearest axis).

    Refuses (:class:`ObliqueStack`) a normal more than :data:`MAX_OBLIQUITY_DEG` from every
    patient axis: such slices are in none of the planes Curia was trained on.
    """
    row_dir, col_dir = _directions(iop, source)
    normal_axis, _, normal_angle = _nearest_axis(np.cross(row_dir, col_dir))
    if normal_angle > MAX_OBLIQUITY_DEG:
        raise ObliqueStack(
            f"{source}: oblique slices (normal {normal_angle:.0f} degrees from the nearest "
            "patient axis); Curia reads axial, coronal and sagittal slices"
        )
    return _PLANE_OF_NORMAL[normal_axis]


def reorientation_for(iop: Sequence[float], source: str = "series") -> tuple[Plane, Reorientation]:
    """The plane of these slices and how to lay them out as Curia does (PL, IL or IP).

    In DICOM the first IOP triplet is the direction along a row (array axis 1), the second
    the direction down a column (array axis 0), in LPS patient axes. The layout is reached
    by a transpose (when the stored rows run along the axis the layout wants down the
    columns) and flips; an in-plane rotation beyond the obliquity tolerance is refused.
    """
    plane = plane_of(iop, source)
    row_dir, col_dir = _directions(iop, source)
    row_axis, row_sign, row_angle = _nearest_axis(row_dir)
    col_axis, col_sign, col_angle = _nearest_axis(col_dir)
    (want0, sign0), (want1, sign1) = LAYOUTS[plane]
    if max(row_angle, col_angle) > MAX_OBLIQUITY_DEG or {row_axis, col_axis} != {want0, want1}:
        raise ObliqueStack(
            f"{source}: in-plane rotation of ImageOrientationPatient "
            f"{[round(float(v), 4) for v in iop]} is too oblique to map onto the {plane} layout"
        )
    transpose = col_axis != want0  # stored rows run along the axis axis 0 must follow
    axis0_sign, axis1_sign = (row_sign, col_sign) if transpose else (col_sign, row_sign)
    return plane, Reorientation(
        transpose=transpose, flip_rows=axis0_sign != sign0, flip_cols=axis1_sign != sign1
    )


def orientation_to_pl(iop: Sequence[float], source: str = "series") -> Reorientation:
    """The reorientation that maps an axial slice with this ImageOrientationPatient to PL.

    Coronal and sagittal slices are refused here; :func:`reorientation_for` lays out every
    plane.
    """
    plane, reorientation = reorientation_for(iop, source)
    if plane != "axial":
        raise SeriesError(
            f"{source}: {plane} slices (ImageOrientationPatient "
            f"{[round(float(v), 4) for v in iop]}) are not axial"
        )
    return reorientation


def _directions(iop: Sequence[float], source: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    if values.shape != (6,):
        raise SeriesError(f"{source}: ImageOrientationPatient must have 6 values, got {list(iop)}")
    return _unit(values[:3], source), _unit(values[3:], source)


def _unit(vector: np.ndarray, source: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not norm > 0:
        raise SeriesError(f"{source}: ImageOrientationPatient has a zero direction vector")
    return vector / norm
