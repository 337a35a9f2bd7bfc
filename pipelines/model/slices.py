"""Image planes read from headers: one per single-frame file, one per frame of a multi-frame.

Scanners send a stack either as one file per slice or as one Enhanced (or Legacy Converted
Enhanced) object whose frames are the slices. Both become the same :class:`SliceHeader`, so
that splitting a series into stacks, sorting and decoding treat them alike. A multi-frame
object's geometry and rescale are in its functional groups: each frame's per-frame group
first, then the shared group (PS3.3 C.7.6.16), read here with pydicom and no pixel data.

What tells two stacks of one series apart beyond geometry (an echo, a b-value, a temporal
position, a Stack ID) is kept as the slice's ``acquisition`` key, and a localizer is
flagged from its ImageType / FrameType.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipelines.findings import NotAnalysed
from pipelines.model.orientation import SeriesError

#: SOP classes whose pixels are CT, MR or PET cross-sections: what Curia can read. Any other
#: object of a study (dose report, key objects, presentation state, RT objects, screenshots)
#: is kept and forwarded by the node, but not analysed.
CROSS_SECTIONAL_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    }
)


@dataclass(frozen=True)
class SliceHeader:
    """One image plane as the headers describe it.

    ``frame`` is the 1-based frame number in a multi-frame object, 0 for a single-frame
    file. ``rescale`` is (slope, intercept) from a multi-frame object's functional groups;
    None for a single-frame file, whose own Modality LUT / rescale applies when decoding.
    ``acquisition`` holds what separates stacks that share a geometry (echo, b-value,
    temporal position, Stack ID), as (name, value) pairs.
    """

    path: Path
    uid: str
    frame: int
    series_uid: str
    modality: str
    rows: int
    columns: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    instance_number: int | None
    rescale: tuple[float, float] | None
    acquisition: tuple[tuple[str, str], ...]
    localizer: bool


def floats(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` numbers from a DICOM multi-value, None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count else None


def _text(value: Any) -> str:
    """A DICOM value as a label shows it: numbers without trailing zeros."""
    if isinstance(value, int | float):
        return f"{float(value):g}"
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return str(value)
    return "\\".join(_text(v) for v in value)


def read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: not a readable DICOM file: {exc}") from exc


def sop_class_name(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    return UID(uid).name if uid else "an object without a SOP class"


def check_readable_image(ds: Dataset, path: Path) -> None:
    """Refuse what Curia cannot read, as not analysed: non-images and colour images.

    These are regular members of a study (a dose report, an RT Structure Set, a screenshot),
    so they are no failure: the reason says what the object is.
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class and sop_class not in CROSS_SECTIONAL_SOP_CLASSES:
        kind = "not an image" if "Rows" not in ds else "not a CT, MR or PET cross-section"
        raise NotAnalysed(f"{sop_class_name(ds)}: {kind}")
    if "Rows" not in ds or "Columns" not in ds:
        raise NotAnalysed(f"{sop_class_name(ds)}: not an image (no Rows/Columns)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise NotAnalysed(f"colour image ({samples} samples per pixel): Curia reads grey levels")


def _is_localizer(image_type: Any) -> bool:
    try:
        values = [str(v).upper() for v in image_type]
    except TypeError:
        values = [str(image_type).upper()]
    return "LOCALIZER" in values


def _single_frame_acquisition(ds: Dataset) -> tuple[tuple[str, str], ...]:
    keys = []
    for name, keyword in (
        ("echo", "EchoNumbers"),
        ("temporal position", "TemporalPositionIdentifier"),
        ("b-value", "DiffusionBValue"),
        ("kernel", "ConvolutionKernel"),
        ("slice thickness", "SliceThickness"),
    ):
        value = ds.get(keyword)
        if value not in (None, ""):
            keys.append((name, _text(value)))
    return tuple(keys)


def headers_of(path: Path) -> list[SliceHeader]:
    """The image planes of one file (one, or one per frame), from its header only."""
    ds = read_header(path)
    check_readable_image(ds, path)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise SeriesError(f"{path}: no SOPInstanceUID")
    number = ds.get("InstanceNumber")
    single = SliceHeader(
        path=path,
        uid=uid,
        frame=0,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        iop=floats(ds.get("ImageOrientationPatient"), 6),
        ipp=floats(ds.get("ImagePositionPatient"), 3),
        instance_number=int(number) if number not in (None, "") else None,
        rescale=None,
        acquisition=_single_frame_acquisition(ds),
        localizer=_is_localizer(ds.get("ImageType")),
    )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [single]
    return [
        dataclasses.replace(single, frame=n, **_frame_fields(ds, groups))
        for n, groups in enumerate(_frame_groups(ds, frames), start=1)
    ]


def _frame_groups(ds: Dataset, frames: int) -> Iterator[list[Dataset]]:
    """Per frame, the functional group items to look in: per-frame first, then shared."""
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame and len(per_frame) != frames:
        raise SeriesError(
            f"{ds.get('SOPInstanceUID', '')}: {len(per_frame)} per-frame functional groups "
            f"for {frames} frames"
        )
    for n in range(frames):
        yield [*([per_frame[n]] if per_frame else []), *shared, ds]


def first_in_groups(groups: Sequence[Dataset], sequence: str, keyword: str) -> Any:
    """``keyword`` from the first group that has ``sequence`` (the top level last)."""
    for group in groups:
        items = group.get(sequence)
        if items:
            value = items[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _frame_fields(ds: Dataset, groups: list[Dataset]) -> dict[str, Any]:
    """Geometry, rescale, acquisition key and localizer flag of one frame."""
    iop = floats(first_in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    ipp = floats(first_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient"), 3)
    if iop is None:  # a multi-frame object without functional groups: its top level
        iop = floats(ds.get("ImageOrientationPatient"), 6)
    slope = first_in_groups(groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = first_in_groups(groups, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None and intercept is None:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    rescale = None
    if slope is not None or intercept is not None:
        rescale = (float(slope if slope is not None else 1.0), float(intercept or 0.0))
    acquisition = []
    for name, sequence, keyword in (
        ("stack", "FrameContentSequence", "StackID"),
        ("temporal position", "FrameContentSequence", "TemporalPositionIndex"),
        ("echo time", "MREchoSequence", "EffectiveEchoTime"),
        ("b-value", "MRDiffusionSequence", "DiffusionBValue"),
        ("kernel", "CTReconstructionSequence", "ConvolutionKernel"),
        ("slice thickness", "PixelMeasuresSequence", "SliceThickness"),
    ):
        value = first_in_groups(groups, sequence, keyword)
        if value is not None:
            acquisition.append((name, _text(value)))
    frame_type = None
    for sequence in (
        "CTImageFrameTypeSequence",
        "MRImageFrameTypeSequence",
        "PETFrameTypeSequence",
    ):
        frame_type = frame_type or first_in_groups(groups, sequence, "FrameType")
    return {
        "iop": iop,
        "ipp": ipp,
        "rescale": rescale if rescale is not None else (1.0, 0.0),
        "acquisition": tuple(acquisition),
        "localizer": _is_localizer(frame_type or ds.get("ImageType")),
    }
