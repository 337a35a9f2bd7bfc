"""Slice orientation: how a stored axial slice maps onto Curia's "PL" layout.

Curia was trained on axial slices with array axis 0 towards the patient's Posterior and axis
1 towards the Left (ImageOrientationPatient [1,0,0,0,1,0]). This module turns a series'
ImageOrientationPatient into the transpose and flips that reach that layout, and refuses
planes Curia's heads were not trained on. It is pure geometry (numpy only), so key regions and
masks can map PL grids back to stored pixels without reading any file.

:class:`SeriesError` lives here, at the bottom of series reading, so every step from
orientation to decoding refuses a series with the same exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Largest angle (degrees) between a slice's row/column direction and the nearest patient
#: axis for the series to count as axial; covers gantry tilt, refuses true obliques.
MAX_OBLIQUITY_DEG = 25.0

_AXES = ("x (patient Left)", "y (patient Posterior)", "z (patient Superior)")


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


def orientation_to_pl(iop: Sequence[float], source: str = "series") -> Reorientation:
    """The reorientation that maps an axial slice with this ImageOrientationPatient to PL.

    In DICOM the first IOP triplet is the direction along a row (increasing column index),
    the second the direction down a column (increasing row index), in LPS patient axes. PL
    wants the row direction to be +x (Left) and the column direction +y (Posterior).
    Coronal, sagittal and oblique stacks are refused: Curia's released heads are axial and
    their other planes need a different layout ("IL", "IP").
    """
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    if values.shape != (6,):
        raise SeriesError(f"{source}: ImageOrientationPatient must have 6 values, got {list(iop)}")
    row_dir, col_dir = _unit(values[:3], source), _unit(values[3:], source)
    normal_axis, _, normal_angle = _nearest_axis(np.cross(row_dir, col_dir))
    if normal_angle > MAX_OBLIQUITY_DEG:
        raise SeriesError(
            f"{source}: oblique slices (normal {normal_angle:.0f} degrees from the nearest "
            "patient axis) are not supported; only axial series are"
        )
    if normal_axis != 2:
        plane = "sagittal" if normal_axis == 0 else "coronal"
        raise SeriesError(
            f"{source}: {plane} series (ImageOrientationPatient {list(np.round(values, 4))}) "
            "are not supported yet; only axial series are"
        )
    row_axis, row_sign, row_angle = _nearest_axis(row_dir)
    col_axis, col_sign, col_angle = _nearest_axis(col_dir)
    if max(row_angle, col_angle) > MAX_OBLIQUITY_DEG or {row_axis, col_axis} != {0, 1}:
        raise SeriesError(
            f"{source}: in-plane rotation of ImageOrientationPatient {list(values)} is too "
            "oblique to map onto the axial PL layout"
        )
    transpose = row_axis == 1  # rows run along y: swap so rows run along x
    if transpose:
        row_sign, col_sign = col_sign, row_sign
    return Reorientation(transpose=transpose, flip_rows=col_sign < 0, flip_cols=row_sign < 0)


def _unit(vector: np.ndarray, source: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not norm > 0:
        raise SeriesError(f"{source}: ImageOrientationPatient has a zero direction vector")
    return vector / norm
