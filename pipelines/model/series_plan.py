"""Planning a series from its headers: sorted, checked and oriented before any pixel is read.

Headers are read with ``stop_before_pixels``, so a 2,000-slice CT is sorted and checked
without decoding it. A planned series (or one already decoded into a prepared folder, see
:mod:`pipelines.model.prepared`) is the *source* that decoding and inference take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.model.orientation import Reorientation, SeriesError, orientation_to_pl

#: Two slices whose ImageOrientationPatient differ by more than this are not one stack.
ORIENTATION_TOLERANCE = 1e-3


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc


def check_single_frame(ds: Dataset, path: Path) -> None:
    """Refuse multi-frame and colour images: Curia reads one grey-level slice per file."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(f"{path}: multi-frame images ({frames} frames) are not supported yet")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise SeriesError(f"{path}: {samples} samples per pixel; Curia reads grey-level images")


# --- planning a series from headers ------------------------------------------------------


@dataclass(frozen=True)
class SeriesPlan:
    """A series sorted and checked from headers only, ready to be decoded in chunks."""

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    modality: str
    rows: int
    columns: int
    reorientation: Reorientation
    series_instance_uid: str
    sorted_by: str  # "position", "instance number" or "file order"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every slice after reorientation."""
        return self.reorientation.output_shape(self.rows, self.columns)


@dataclass(frozen=True)
class _Header:
    path: Path
    uid: str
    series_uid: str
    modality: str
    rows: int
    columns: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    instance_number: int | None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count else None


def _header(path: Path) -> _Header:
    ds = _read_header(path)
    check_single_frame(ds, path)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise SeriesError(f"{path}: no SOPInstanceUID")
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesError(f"{path}: no Rows/Columns: not an image")
    number = ds.get("InstanceNumber")
    return _Header(
        path=path,
        uid=uid,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        instance_number=int(number) if number not in (None, "") else None,
    )


def _check_consistent(headers: list[_Header]) -> None:
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise SeriesError(
                f"mixed slice sizes in one series: {first.path.name} is "
                f"{first.rows}x{first.columns}, {h.path.name} is {h.rows}x{h.columns}"
            )
        if h.series_uid != first.series_uid:
            raise SeriesError(
                f"files from different series: {first.path.name} ({first.series_uid}) and "
                f"{h.path.name} ({h.series_uid})"
            )
        if (h.iop is None) != (first.iop is None) or (
            h.iop is not None
            and first.iop is not None
            and np.max(np.abs(np.subtract(h.iop, first.iop))) > ORIENTATION_TOLERANCE
        ):
            raise SeriesError(
                f"slices with different orientations in one series: {first.path.name} "
                f"{first.iop}, {h.path.name} {h.iop}"
            )
    uids = [h.uid for h in headers]
    if len(set(uids)) != len(uids):
        raise SeriesError("the same SOPInstanceUID appears twice in the series")


def _sort(headers: list[_Header], normal: np.ndarray | None) -> tuple[list[_Header], str]:
    """Spatial order, inferior to superior (as a LPS volume's z axis), with fallbacks.

    Position along the normal needs ImagePositionPatient and ImageOrientationPatient on every
    slice; without them InstanceNumber is the best available order, then the given order.
    """
    indexed = list(enumerate(headers))
    positions = [h.ipp for h in headers if h.ipp is not None]
    if normal is not None and len(positions) == len(headers):

        def position(item: tuple[int, _Header]) -> tuple[float, int, int]:
            i, h = item
            return (float(np.dot(positions[i], normal)), h.instance_number or 0, i)

        return [h for _, h in sorted(indexed, key=position)], "position"
    if all(h.instance_number is not None for h in headers):
        ordered = sorted(indexed, key=lambda item: (item[1].instance_number, item[0]))
        return [h for _, h in ordered], "instance number"
    return headers, "file order"


def plan_series(paths: Sequence[Path]) -> SeriesPlan:
    """Sort and check a series from headers only: order, size, orientation, UIDs.

    The slice normal is taken pointing to the patient's head, so the sorted series runs feet
    to head whatever the acquisition direction. A series without ImageOrientationPatient is
    taken as already axial PL (nothing to reorient by).
    """
    if not paths:
        raise SeriesError("empty series: no files")
    headers = [_header(Path(p)) for p in paths]
    _check_consistent(headers)
    first = headers[0]
    normal: np.ndarray | None = None
    reorientation = Reorientation()
    if first.iop is not None:
        reorientation = orientation_to_pl(first.iop, source=str(first.path))
        normal = np.cross(first.iop[:3], first.iop[3:])
        if normal[2] < 0:
            normal = -normal
    ordered, sorted_by = _sort(headers, normal)
    return SeriesPlan(
        paths=tuple(h.path for h in ordered),
        sop_instance_uids=tuple(h.uid for h in ordered),
        modality=first.modality,
        rows=first.rows,
        columns=first.columns,
        reorientation=reorientation,
        series_instance_uid=first.series_uid,
        sorted_by=sorted_by,
    )


# --- series sources ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedSeries:
    """A series decoded ahead of time: its plan and its PL pixels, sorted, in one array.

    Made by :func:`prepare_series` on a CPU worker, so the worker that holds the GPU only
    resizes and embeds. ``pixels`` is usually a read-only memory map of the file.
    """

    plan: SeriesPlan
    pixels: np.ndarray  # float32 (S, H, W)

    def __len__(self) -> int:
        return len(self.plan)


def series_source(
    paths: Sequence[Path] | SeriesPlan | PreparedSeries,
) -> SeriesPlan | PreparedSeries:
    """Files are planned (sorted, checked) here; a plan or a prepared series is kept."""
    if isinstance(paths, SeriesPlan | PreparedSeries):
        return paths
    return plan_series(paths)


def plan_of(source: SeriesPlan | PreparedSeries) -> SeriesPlan:
    return source.plan if isinstance(source, PreparedSeries) else source


def subset(
    source: SeriesPlan | PreparedSeries, indices: Sequence[int]
) -> SeriesPlan | PreparedSeries:
    """The same source restricted to ``indices`` (positions in the sorted series)."""
    plan = plan_of(source)
    if list(indices) == list(range(len(plan))):
        return source
    narrowed = dataclasses.replace(
        plan,
        paths=tuple(plan.paths[i] for i in indices),
        sop_instance_uids=tuple(plan.sop_instance_uids[i] for i in indices),
    )
    if isinstance(source, PreparedSeries):
        return PreparedSeries(plan=narrowed, pixels=source.pixels[list(indices)])
    return narrowed
