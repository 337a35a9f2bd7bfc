"""From DICOM files to Curia's input: sorted, reoriented, rescaled, resized, z-scored slices.

Curia was trained on single 2D slices, one channel, with no intensity windowing: CT in
Hounsfield units, MRI as stored values (after any rescale the file declares), axial slices in
"PL" orientation (array axis 0 towards the patient's Posterior, axis 1 towards the Left, the
standard axial DICOM layout, ImageOrientationPatient [1,0,0,0,1,0]), resized with antialiased
bicubic interpolation to 512 x 512 and z-scored per slice. Deviating from any of these shifts
the features the heads were trained on, so each step is done explicitly here.

A series is planned from headers alone (``stop_before_pixels``), then decoded in chunks, so a
2,000-slice CT never needs all its pixels in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

#: Largest angle (degrees) between a slice's row/column direction and the nearest patient
#: axis for the series to count as axial; covers gantry tilt, refuses true obliques.
MAX_OBLIQUITY_DEG = 25.0

#: Two slices whose ImageOrientationPatient differ by more than this are not one stack.
ORIENTATION_TOLERANCE = 1e-3

#: Lowest meaningful CT value; ``clip_below_air`` raises padding (-2048, -3024) to it.
AIR_HU = -1000.0

#: Added to the per-slice standard deviation so a uniform slice maps to zeros, not NaN.
ZSCORE_EPS = 1e-6

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


# --- reading -----------------------------------------------------------------------------


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc


def _check_single_frame(ds: Dataset, path: Path) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(f"{path}: multi-frame images ({frames} frames) are not supported yet")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise SeriesError(f"{path}: {samples} samples per pixel; Curia reads grey-level images")


def read_slice(path: Path) -> tuple[Dataset, np.ndarray]:
    """Decode one slice: (dataset, float32 pixels as stored on the grid, rescaled).

    Pixels go through the modality transform (RescaleSlope/Intercept, or a Modality LUT), so
    CT comes out in Hounsfield units and MRI as the values the file declares. No windowing,
    no reorientation: a single slice's layout is fixed at series level (see
    :func:`plan_series`). Compressed transfer syntaxes (JPEG 2000, JPEG-LS, RLE...) are
    decoded by pydicom's installed plugins.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc
    _check_single_frame(ds, path)
    if "PixelData" not in ds:
        raise SeriesError(f"{path}: no pixel data")
    try:
        stored = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise SeriesError(f"{path}: cannot decode pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise SeriesError(f"{path}: expected a 2D slice, decoded shape is {stored.shape}")
    return ds, np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


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
    _check_single_frame(ds, path)
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
    if normal is not None and all(h.ipp is not None for h in headers):

        def position(item: tuple[int, _Header]) -> tuple[float, int, int]:
            i, h = item
            return (float(np.dot(h.ipp, normal)), h.instance_number or 0, i)

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


# --- decoding ----------------------------------------------------------------------------


def _decode(path: Path, plan: SeriesPlan) -> np.ndarray:
    _, pixels = read_slice(path)
    if pixels.shape != (plan.rows, plan.columns):
        raise SeriesError(
            f"{path}: decoded {pixels.shape} but the header says {plan.rows}x{plan.columns}"
        )
    return plan.reorientation.apply(pixels)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


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


PREPARED_PIXELS = "pixels.npy"
PREPARED_PLAN = "plan.json"


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


def prepare_series(paths: Sequence[Path], folder: Path, *, chunk: int = 16) -> PreparedSeries:
    """Decode a whole series into ``folder`` (pixels + plan); return it, memory-mapped.

    Written under a temporary name and renamed, so a reader sees a complete folder or
    none. Only a chunk of slices is in memory at a time.
    """
    plan = plan_series(paths)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        out = np.lib.format.open_memmap(
            tmp / PREPARED_PIXELS, mode="w+", dtype=np.float32, shape=(len(plan), *plan.shape)
        )
        for indices, pixels in iter_series_chunks(plan, chunk):
            out[indices[0] : indices[-1] + 1] = pixels
        out.flush()
        del out
        record = dataclasses.asdict(plan)
        record["paths"] = [str(p) for p in plan.paths]
        (tmp / PREPARED_PLAN).write_text(json.dumps(record))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = load_prepared(folder)
    assert prepared is not None
    return prepared


def load_prepared(folder: Path) -> PreparedSeries | None:
    """The series :func:`prepare_series` wrote to ``folder``; None if it is not (all) there."""
    try:
        record = json.loads((folder / PREPARED_PLAN).read_text())
        pixels = np.load(folder / PREPARED_PIXELS, mmap_mode="r")
    except (OSError, ValueError):
        return None
    plan = SeriesPlan(
        **{
            **record,
            "paths": tuple(Path(p) for p in record["paths"]),
            "sop_instance_uids": tuple(record["sop_instance_uids"]),
            "reorientation": Reorientation(**record["reorientation"]),
        }
    )
    if pixels.shape != (len(plan), *plan.shape):
        return None
    return PreparedSeries(plan=plan, pixels=pixels)


def iter_series_chunks(
    paths: Sequence[Path] | SeriesPlan | PreparedSeries,
    chunk: int,
    *,
    workers: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(indices, pixels)`` chunks in spatial order; pixels are float32 (n, H, W), PL.

    ``indices`` are positions in the sorted series. Decoding runs on a small thread pool
    with one chunk of read-ahead, so the next chunk decodes while the caller runs the model
    on this one; at most two chunks of pixels are alive at a time. A prepared series is
    read from its array instead.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if isinstance(paths, PreparedSeries):
        for start in range(0, len(paths), chunk):
            end = min(start + chunk, len(paths))
            yield list(range(start, end)), np.array(paths.pixels[start:end], dtype=np.float32)
        return
    plan = paths if isinstance(paths, SeriesPlan) else plan_series(paths)
    n = len(plan)
    pool = ThreadPoolExecutor(max_workers=workers or _default_workers())
    pending: deque[tuple[list[int], list[Future[np.ndarray]]]] = deque()

    def submit(start: int | None) -> None:
        if start is not None:
            indices = list(range(start, min(start + chunk, n)))
            pending.append((indices, [pool.submit(_decode, plan.paths[i], plan) for i in indices]))

    starts = iter(range(0, n, chunk))
    try:
        submit(next(starts, None))
        while pending:
            submit(next(starts, None))  # read ahead while the caller works on this chunk
            indices, futures = pending.popleft()
            yield indices, np.stack([f.result() for f in futures])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SeriesVolume:
    """A whole decoded series, sorted and in PL orientation (for small series and tests)."""

    pixels: np.ndarray  # float32 (S, H, W): HU for CT, stored values (rescaled) for MR
    sop_instance_uids: list[str]
    modality: str
    paths: list[Path]


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Decode a whole series into memory; prefer :func:`iter_series_chunks` for big ones."""
    plan = plan_series(paths)
    chunks = [pixels for _, pixels in iter_series_chunks(plan, 32)]
    return SeriesVolume(
        pixels=np.concatenate(chunks, axis=0).astype(np.float32, copy=False),
        sop_instance_uids=list(plan.sop_instance_uids),
        modality=plan.modality,
        paths=list(plan.paths),
    )


# --- model input -------------------------------------------------------------------------


def preprocess_slices(
    pixels: np.ndarray | torch.Tensor,
    *,
    size: int = 512,
    clip_below_air: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Curia's image processor on a stack of slices: (N, H, W) -> (N, 1, size, size) float32.

    Optional clamp below air (-1000), antialiased bicubic resize to ``size``, then a z-score
    per slice with the population standard deviation. Runs on ``device`` (the GPU when there
    is one, so resizing does not hold the model up). Values stay float32 throughout: an
    int16 cast would destroy fractional MRI values.
    """
    x = torch.as_tensor(pixels)
    if x.ndim != 3:
        raise ValueError(f"expected slices as (N, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device or x.device, dtype=torch.float32)
    if clip_below_air:
        x = x.clamp_min(AIR_HU)
    x = x.unsqueeze(1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, correction=0)
    return (x - mean) / (std + ZSCORE_EPS)
