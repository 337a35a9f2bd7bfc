"""From DICOM files to Curia's input: sorted, reoriented, rescaled, resized, z-scored slices.

Curia was trained on single 2D slices, one channel, with no intensity windowing: CT in
Hounsfield units, MRI as stored values (after any rescale the file declares), axial slices in
"PL" orientation (array axis 0 towards the patient's Posterior, axis 1 towards the Left, the
standard axial DICOM layout, ImageOrientationPatient [1,0,0,0,1,0]), resized with antialiased
bicubic interpolation to 512 x 512 and z-scored per slice. Deviating from any of these shifts
the features the heads were trained on, so each step is done explicitly here.

A series is planned from headers alone (``stop_before_pixels``), then decoded in chunks, so a
2,000-slice CT never needs all its pixels in memory at once.

The steps live in small modules: :mod:`~pipelines.model.orientation` (slice layout),
:mod:`~pipelines.model.series_plan` (sorting and checking from headers) and
:mod:`~pipelines.model.prepared` (series decoded ahead of time); this module decodes pixels
and turns them into model input, and is where callers import the series-reading API from.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, iter_pixels

from pipelines.model.orientation import (
    MAX_OBLIQUITY_DEG,
    Reorientation,
    SeriesError,
    orientation_to_pl,
)
from pipelines.model.processor import (
    AIR_HU,
    STD_FLOOR,
    VolumeStatistics,
    normalise_slices,
)
from pipelines.model.series_plan import (
    PreparedSeries,
    SeriesPlan,
    plan_of,
    plan_series,
    series_source,
    subset,
)

__all__ = [
    "AIR_HU",
    "MAX_OBLIQUITY_DEG",
    "ZSCORE_EPS",
    "PreparedSeries",
    "Reorientation",
    "SeriesError",
    "SeriesPlan",
    "SeriesVolume",
    "VolumeStatistics",
    "iter_series_chunks",
    "load_series",
    "orientation_to_pl",
    "plan_of",
    "plan_series",
    "preprocess_slices",
    "read_frames",
    "read_slice",
    "series_source",
    "subset",
]

#: Below this standard deviation a slice is only centred (a uniform slice maps to zeros).
ZSCORE_EPS = STD_FLOOR


# --- reading -----------------------------------------------------------------------------


def read_slice(path: Path) -> tuple[Dataset, np.ndarray]:
    """Decode one single-frame slice: (dataset, float32 pixels as stored, rescaled).

    Pixels go through the modality transform (RescaleSlope/Intercept, or a Modality LUT), so
    CT comes out in Hounsfield units and MRI as the values the file declares. No windowing,
    no reorientation: a single slice's layout is fixed at series level (see
    :func:`plan_series`). Compressed transfer syntaxes (JPEG 2000, JPEG-LS, RLE...) are
    decoded by pydicom's installed plugins. A multi-frame object's frames are read by
    :func:`read_frames`.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(f"{path}: {frames} frames: read them with read_frames")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"{path}: {ds.SamplesPerPixel} samples per pixel; Curia reads grey")
    if "PixelData" not in ds:
        raise SeriesError(f"{path}: no pixel data")
    try:
        stored = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise SeriesError(f"{path}: cannot decode pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise SeriesError(f"{path}: expected a 2D slice, decoded shape is {stored.shape}")
    return ds, np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def read_frames(
    path: Path, frames: Sequence[int], rescales: Sequence[tuple[float, float]]
) -> list[np.ndarray]:
    """Decode some frames of a multi-frame object: float32 pixels as stored, rescaled.

    ``frames`` are 1-based frame numbers, ``rescales`` each frame's (slope, intercept) from
    its functional groups (the Pixel Value Transformation that makes CT frames Hounsfield
    units). Only the frames asked for are decoded, in one pass over the file.
    """
    if not frames:
        return []
    order = sorted(range(len(frames)), key=lambda k: frames[k])
    try:
        decoded = list(iter_pixels(path, indices=[frames[k] - 1 for k in order]))
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc
    except (ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise SeriesError(f"{path}: cannot decode frames {list(frames)}: {exc}") from exc
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(frames)
    for k, stored in zip(order, decoded, strict=True):
        if stored.ndim != 2:
            raise SeriesError(f"{path}: frame {frames[k]} decodes to shape {stored.shape}")
        slope, intercept = rescales[k]
        out[k] = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return out


# --- decoding ----------------------------------------------------------------------------


def _decode(plan: SeriesPlan, indices: Sequence[int]) -> list[np.ndarray]:
    """Slices ``indices`` of the plan, laid out (all from one file when it is multi-frame)."""
    path = plan.paths[indices[0]]
    if plan.frame(indices[0]) == 0:
        decoded = [read_slice(path)[1]]
    else:
        decoded = read_frames(
            path, [plan.frame(i) for i in indices], [plan.rescale(i) or (1.0, 0.0) for i in indices]
        )
    for pixels in decoded:
        if pixels.shape != (plan.rows, plan.columns):
            raise SeriesError(
                f"{path}: decoded {pixels.shape} but the header says {plan.rows}x{plan.columns}"
            )
    return [plan.reorientation.apply(p) for p in decoded]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _decoding_jobs(plan: SeriesPlan, indices: list[int]) -> list[list[int]]:
    """One job per single-frame slice, one per multi-frame file (its frames in one pass)."""
    jobs: dict[object, list[int]] = {}
    for i in indices:
        key: object = (plan.paths[i],) if plan.frame(i) else i
        jobs.setdefault(key, []).append(i)
    return list(jobs.values())


def iter_series_chunks(
    paths: Sequence[Path] | SeriesPlan | PreparedSeries,
    chunk: int,
    *,
    workers: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(indices, pixels)`` chunks in spatial order; pixels are float32 (n, H, W), laid out.

    ``indices`` are positions in the sorted stack. Decoding runs on a small thread pool
    with one chunk of read-ahead, so the next chunk decodes while the caller runs the model
    on this one; at most two chunks of pixels are alive at a time. The frames of a
    multi-frame object that fall in one chunk are decoded in one pass. A prepared series
    is read from its array instead.
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
    pending: deque[tuple[list[int], list[tuple[list[int], Future[list[np.ndarray]]]]]] = deque()

    def submit(start: int | None) -> None:
        if start is not None:
            indices = list(range(start, min(start + chunk, n)))
            jobs = [(job, pool.submit(_decode, plan, job)) for job in _decoding_jobs(plan, indices)]
            pending.append((indices, jobs))

    starts = iter(range(0, n, chunk))
    try:
        submit(next(starts, None))
        while pending:
            submit(next(starts, None))  # read ahead while the caller works on this chunk
            indices, jobs = pending.popleft()
            by_index = {
                i: p for job, future in jobs for i, p in zip(job, future.result(), strict=True)
            }
            yield indices, np.stack([by_index[i] for i in indices])
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


#: Curia's image processor on a stack of slices, (N, H, W) -> (N, 1, size, size) float32, in
#: the processor's own order (see :mod:`~pipelines.model.processor`): the name decoding
#: callers use, so every path into the model goes through the one implementation.
preprocess_slices = normalise_slices
