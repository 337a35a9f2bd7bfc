"""Masks from segmentations that arrived with the study, placed on an analysed stack.

A mask-pooled (or lesion-centred) head may take its mask from a segment of a DICOM
Segmentation or an ROI of an RT Structure Set sent in the same study, named by its card
(:class:`~pipelines.model.head_card.SegmentRef`) or by a routing rule. The objects are read
into the plain :class:`StudySegment` elsewhere (the reader needs highdicom, which a GPU
worker's model code does not import); here they are laid on the stack's own grid:

- a Segmentation frame lands on the slice it names as its source (SOP instance and frame),
  or else on the slice whose plane holds its position (same orientation, within half the
  slice gap) when it is on the same pixel grid;
- an RTSTRUCT contour (closed polygon in patient millimetres) is filled on the slice it
  references, or on the slice whose plane holds it, by the even-odd rule at pixel centres.

Either must share the stack's Frame of Reference (or name the stack's series). The result
is a (slices, rows, columns) mask in the stack's stored orientation, as a mask head gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from pipelines.findings import CodeRef
from pipelines.model.head_card import SegmentRef
from pipelines.model.series_plan import SeriesPlan
from pipelines.model.slices import first_in_groups, floats, read_header

#: How far (mm) a contour or frame may lie off a slice's plane on a single-slice stack.
SINGLE_SLICE_TOLERANCE = 0.5


@dataclass(frozen=True)
class SegmentFrame:
    """One frame of a Segmentation's segment: its pixels and where they lie.

    ``source_uid`` / ``source_frame`` are the image (and 1-based frame, 0 for a single-frame
    image) it was drawn on, when the Segmentation says; ``position`` / ``orientation`` its
    plane, when it says.
    """

    pixels: np.ndarray  # bool (rows, columns)
    source_uid: str = ""
    source_frame: int = 0
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Contour:
    """One closed planar contour of an ROI: (N, 3) points in patient millimetres."""

    points: np.ndarray
    source_uid: str = ""


@dataclass(frozen=True)
class StudySegment:
    """A segment of a SEG or an ROI of an RTSTRUCT, read from the object, model-free."""

    kind: Literal["SEG", "RTSTRUCT"]
    sop_instance_uid: str
    label: str
    code: CodeRef | None
    frame_of_reference: str
    referenced_series: frozenset[str]
    frames: tuple[SegmentFrame, ...] = ()
    contours: tuple[Contour, ...] = ()


def names(ref: SegmentRef, segment: StudySegment) -> bool:
    """Whether ``segment`` is the one ``ref`` names (label or code, and kind of object)."""
    if segment.kind not in ref.objects:
        return False
    wanted = ref.segment
    if isinstance(wanted, str):
        return segment.label.strip().casefold() == wanted.strip().casefold()
    code = segment.code
    return code is not None and (code.value, code.scheme) == (wanted.value, wanted.scheme)


@dataclass(frozen=True)
class SlicePlane:
    """Where one stored slice lies: its first pixel's centre, axes and pixel spacing.

    ``along_row`` is the patient direction of increasing column index (the first three
    ImageOrientationPatient values), ``down_column`` that of increasing row index;
    ``spacing`` is (between rows, between columns) in mm, as PixelSpacing states it.
    """

    origin: np.ndarray
    along_row: np.ndarray
    down_column: np.ndarray
    spacing: tuple[float, float]

    @property
    def normal(self) -> np.ndarray:
        normal: np.ndarray = np.cross(self.along_row, self.down_column)
        return normal

    def pixel_of(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) coordinates, fractional, of patient points projected on the plane."""
        offset = np.asarray(points, dtype=np.float64) - self.origin
        rows: np.ndarray = offset @ self.down_column / self.spacing[0]
        columns: np.ndarray = offset @ self.along_row / self.spacing[1]
        return rows, columns

    def height(self, points: np.ndarray) -> np.ndarray:
        """Signed distances (mm) of points from the plane."""
        heights: np.ndarray = (np.asarray(points, dtype=np.float64) - self.origin) @ self.normal
        return heights


@dataclass(frozen=True)
class StackGrid:
    """A stack's slices as planes, its Frame of Reference and series, for placing masks."""

    plan: SeriesPlan
    planes: tuple[SlicePlane, ...]
    frame_of_reference: str
    tolerance: float  # mm off a slice's plane still on it: half the smallest slice gap
    index: Mapping[tuple[str, int], int] = field(default_factory=dict)


def _plane(ds: Dataset, frame: int) -> SlicePlane | None:
    groups: list[Dataset] = []
    if frame:
        per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
        if len(per_frame) >= frame:
            groups.append(per_frame[frame - 1])
        groups += list(ds.get("SharedFunctionalGroupsSequence") or [])
    groups.append(ds)
    ipp = floats(
        first_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
        or ds.get("ImagePositionPatient"),
        3,
    )
    iop = floats(
        first_in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        or ds.get("ImageOrientationPatient"),
        6,
    )
    spacing = floats(
        first_in_groups(groups, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing"),
        2,
    )
    if ipp is None or iop is None or spacing is None:
        return None
    return SlicePlane(
        origin=np.array(ipp),
        along_row=np.array(iop[:3]),
        down_column=np.array(iop[3:]),
        spacing=(spacing[0], spacing[1]),
    )


def stack_grid(plan: SeriesPlan) -> StackGrid | None:
    """The stack's slice planes from its headers; None when a slice has no geometry."""
    headers = {path: read_header(path) for path in dict.fromkeys(plan.paths)}
    planes = []
    for i, path in enumerate(plan.paths):
        plane = _plane(headers[path], plan.frame(i))
        if plane is None:
            return None
        planes.append(plane)
    first = headers[plan.paths[0]]
    heights = np.sort([float(p.origin @ planes[0].normal) for p in planes])
    gaps = np.diff(heights)
    gaps = gaps[gaps > 1e-3]
    tolerance = float(gaps.min() / 2) if gaps.size else SINGLE_SLICE_TOLERANCE
    return StackGrid(
        plan=plan,
        planes=tuple(planes),
        frame_of_reference=str(first.get("FrameOfReferenceUID", "") or ""),
        tolerance=tolerance,
        index={(uid, plan.frame(i)): i for i, uid in enumerate(plan.sop_instance_uids)},
    )


def _slice_holding(grid: StackGrid, points: np.ndarray) -> int | None:
    """The slice whose plane holds every one of ``points`` (patient mm), if one does."""
    for i, plane in enumerate(grid.planes):
        if np.all(np.abs(plane.height(points)) <= grid.tolerance):
            return i
    return None


def _same_study_space(segment: StudySegment, grid: StackGrid) -> bool:
    if segment.frame_of_reference and grid.frame_of_reference:
        return segment.frame_of_reference == grid.frame_of_reference
    return grid.plan.series_instance_uid in segment.referenced_series


def fill_polygon(
    rows: int, columns: int, row_coords: np.ndarray, col_coords: np.ndarray
) -> np.ndarray:
    """Pixels of a (rows, columns) image whose centre lies inside a polygon (even-odd rule).

    Vertices are fractional (row, column) coordinates of pixel centres (pixel (0, 0) is
    centred on (0, 0)), as DICOM places a contour's points.
    """
    mask = np.zeros((rows, columns), dtype=bool)
    r = np.asarray(row_coords, dtype=np.float64)
    c = np.asarray(col_coords, dtype=np.float64)
    if r.size < 3:
        return mask
    r0, r1 = max(int(np.floor(r.min())), 0), min(int(np.ceil(r.max())), rows - 1)
    c0, c1 = max(int(np.floor(c.min())), 0), min(int(np.ceil(c.max())), columns - 1)
    if r0 > r1 or c0 > c1:
        return mask
    pr = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    pc = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
    inside = np.zeros((pr.shape[0], pc.shape[1]), dtype=bool)
    for a_r, a_c, b_r, b_c in zip(r, c, np.roll(r, -1), np.roll(c, -1), strict=True):
        if a_r == b_r:
            continue  # a horizontal edge crosses no row of centres
        spans = (a_r > pr) != (b_r > pr)  # the edge crosses the row through these centres
        crossing = a_c + (pr - a_r) * (b_c - a_c) / (b_r - a_r)
        inside ^= spans & (pc < crossing)
    mask[r0 : r1 + 1, c0 : c1 + 1] = inside
    return mask


def _place_frame(grid: StackGrid, frame: SegmentFrame) -> int | None:
    plan = grid.plan
    if frame.pixels.shape != (plan.rows, plan.columns):
        return None
    if frame.source_uid:
        found = grid.index.get((frame.source_uid, frame.source_frame))
        if found is not None:
            return found
    if frame.position is None:
        return None
    at = _slice_holding(grid, np.array([frame.position]))
    if at is None:
        return None
    plane = grid.planes[at]
    if frame.orientation is not None:
        along, down = np.array(frame.orientation[:3]), np.array(frame.orientation[3:])
        if along @ plane.along_row < 0.999 or down @ plane.down_column < 0.999:
            return None  # same plane, another pixel layout: not this stack's grid
    row, col = plane.pixel_of(np.array([frame.position]))
    if abs(float(row[0])) > 0.01 or abs(float(col[0])) > 0.01:
        return None  # shifted in the plane: another grid
    return at


def mask_on_stack(segment: StudySegment, grid: StackGrid) -> np.ndarray | None:
    """The segment on the stack's slices (slices, rows, columns), stored orientation.

    None when the segment does not lie on this stack (another Frame of Reference, or no
    frame or contour lands on one of its slices).
    """
    if not _same_study_space(segment, grid):
        return None
    plan = grid.plan
    mask = np.zeros((len(plan), plan.rows, plan.columns), dtype=bool)
    placed = 0
    for frame in segment.frames:
        at = _place_frame(grid, frame)
        if at is not None:
            mask[at] |= frame.pixels.astype(bool)
            placed += 1
    for contour in segment.contours:
        at = grid.index.get((contour.source_uid, 0)) if contour.source_uid else None
        if at is None:
            at = _slice_holding(grid, contour.points)
        if at is None:
            continue
        row, col = grid.planes[at].pixel_of(contour.points)
        mask[at] ^= fill_polygon(plan.rows, plan.columns, row, col)  # holes cancel out
        placed += 1
    return mask if placed else None


def segment_masks(
    grid: StackGrid | None,
    wanted: Mapping[str, SegmentRef],
    segments: Sequence[StudySegment],
) -> dict[str, tuple[np.ndarray, StudySegment]]:
    """Per head name, the mask of the segment it wants on this stack, and where it came from.

    ``segments`` are in the order they arrived: when several lie on the stack and carry the
    wanted segment, the latest is taken (a corrected segmentation replaces the first). A
    head whose segment is on no object of the study, or not on this stack, is left out: it
    does not run there.
    """
    found: dict[str, tuple[np.ndarray, StudySegment]] = {}
    if grid is None:
        return found
    placed: dict[int, np.ndarray | None] = {}  # by position in segments: heads share a mask
    for head_name, ref in wanted.items():
        for at in reversed(range(len(segments))):
            segment = segments[at]
            if not names(ref, segment):
                continue
            if at not in placed:
                placed[at] = mask_on_stack(segment, grid)
            mask = placed[at]
            if mask is not None:
                found[head_name] = (mask, segment)
                break
    return found
