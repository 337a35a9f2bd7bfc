"""Segmentations that arrived with a study, read into plain segments for the model.

A Segmentation (SEG) is read with highdicom: its segments, and for each frame of a segment
its pixels, the source image (and frame) it was drawn on and its plane position. An RT
Structure Set (RTSTRUCT) is read with pydicom: each ROI's closed planar contours, in
patient millimetres, with the image each one references. Neither is placed on a stack
here: :mod:`pipelines.model.segment_masks` does that, without highdicom on the model's
import path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.core.segmentation_refs import referenced_series
from node.core.sop_classes import SEGMENTATION_KINDS
from pipelines.findings import CodeRef
from pipelines.model.segment_masks import Contour, SegmentFrame, StudySegment
from pipelines.model.slices import first_in_groups

log = logging.getLogger(__name__)


def _code(items: Any) -> CodeRef | None:
    if not items:
        return None
    item = items[0]
    return CodeRef(
        value=str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or ""),
        scheme=str(item.get("CodingSchemeDesignator", "") or ""),
        meaning=str(item.get("CodeMeaning", "") or ""),
    )


def _floats(value: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value else None


def _source(group: Dataset) -> tuple[str, int]:
    for derivation in group.get("DerivationImageSequence") or []:
        for source in derivation.get("SourceImageSequence") or []:
            frames = source.get("ReferencedFrameNumber")
            frame = int(frames[0] if isinstance(frames, list | tuple) else frames or 0)
            return str(source.ReferencedSOPInstanceUID), frame
    return "", 0


def read_seg(path: Path) -> list[StudySegment]:
    """Every segment of a Segmentation, each with its frames (pixels and placement)."""
    seg = hd.seg.segread(path)
    series = referenced_series(seg)
    labelmap = str(seg.get("SegmentationType", "")) == "LABELMAP"
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    threshold = float(seg.get("MaximumFractionalValue", 1) or 1) / 2
    shared = list(seg.get("SharedFunctionalGroupsSequence") or [])
    per_frame = list(seg.get("PerFrameFunctionalGroupsSequence") or [])
    frames: dict[int, list[SegmentFrame]] = {n: [] for n in seg.segment_numbers}
    for index, group in enumerate(per_frame):
        groups = [group, *shared]
        stored = np.asarray(seg.get_stored_frame(index + 1))
        uid, source_frame = _source(group)
        position = _floats(first_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient"))
        orientation = _floats(
            first_in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        )
        place = (uid, source_frame, position, orientation)
        if labelmap:
            for number in frames:
                pixels = stored == number
                if pixels.any():
                    frames[number].append(SegmentFrame(pixels, *place))
            continue
        number = int(
            first_in_groups(groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        )
        pixels = stored > threshold if fractional else stored > 0
        frames.setdefault(number, []).append(SegmentFrame(pixels, *place))
    segments = []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        segments.append(
            StudySegment(
                kind="SEG",
                sop_instance_uid=str(seg.SOPInstanceUID),
                label=str(description.get("SegmentLabel", "") or ""),
                code=_code(description.get("SegmentedPropertyTypeCodeSequence")),
                frame_of_reference=str(seg.get("FrameOfReferenceUID", "") or ""),
                referenced_series=series,
                frames=tuple(frames.get(number, [])),
            )
        )
    return segments


def read_rtstruct(path: Path) -> list[StudySegment]:
    """Every ROI of an RT Structure Set, each with its closed planar contours."""
    ds = dcmread(path)
    series = referenced_series(ds)
    frames_of_reference = {
        str(item.FrameOfReferenceUID) for item in ds.get("ReferencedFrameOfReferenceSequence") or []
    }
    codes = {
        int(item.ReferencedROINumber): _code(item.get("RTROIIdentificationCodeSequence"))
        for item in ds.get("RTROIObservationsSequence") or []
    }
    contours: dict[int, list[Contour]] = {}
    for roi in ds.get("ROIContourSequence") or []:
        kept = contours.setdefault(int(roi.ReferencedROINumber), [])
        for contour in roi.get("ContourSequence") or []:
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue  # points and open contours enclose no region
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            images = contour.get("ContourImageSequence") or []
            uid = str(images[0].ReferencedSOPInstanceUID) if len(images) == 1 else ""
            kept.append(Contour(points=points, source_uid=uid))
    segments = []
    for roi in ds.get("StructureSetROISequence") or []:
        number = int(roi.ROINumber)
        frame_of_reference = str(roi.get("ReferencedFrameOfReferenceUID", "") or "")
        if not frame_of_reference and len(frames_of_reference) == 1:
            frame_of_reference = next(iter(frames_of_reference))
        segments.append(
            StudySegment(
                kind="RTSTRUCT",
                sop_instance_uid=str(ds.SOPInstanceUID),
                label=str(roi.get("ROIName", "") or ""),
                code=codes.get(number),
                frame_of_reference=frame_of_reference,
                referenced_series=series,
                contours=tuple(contours.get(number, [])),
            )
        )
    return segments


def read_segments(objects: Iterable[tuple[str, Path]]) -> list[StudySegment]:
    """The segments of (SOP class UID, path) objects, in the order given (arrival order).

    An object that cannot be read is left out with a warning (it cannot supply a mask; the
    heads that wanted one say "not analysed: no mask").
    """
    segments: list[StudySegment] = []
    for sop_class, path in objects:
        kind = SEGMENTATION_KINDS.get(sop_class)
        try:
            if kind == "SEG":
                segments += read_seg(path)
            elif kind == "RTSTRUCT":
                segments += read_rtstruct(path)
        except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
            log.warning("segmentation %s not read: %s: %s", path.name, type(exc).__name__, exc)
    return segments
