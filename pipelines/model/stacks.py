"""A series split into the stacks Curia can analyse, each planned from headers alone.

A series as a scanner sends it is not always one stack: a three-plane localizer holds
three orientations, two reconstructions may share a Series Instance UID, a multi-echo or
diffusion acquisition repeats every position once per echo or b-value, and one Enhanced
object may hold several stacks. Each stack is its own analysis unit, so the series is
split here, before any pixel is decoded:

1. Objects that are no CT/MR/PET cross-section (a dose report, an RT Structure Set, a
   screenshot) are set aside with the reason.
2. Image planes (single-frame files and frames of multi-frame objects alike, see
   :mod:`pipelines.model.slices`) are grouped by localizer flag, size, orientation and
   acquisition key (echo, b-value, temporal position, Stack ID, kernel, slice thickness).
3. Within a group, a position that repeats starts another stack: in acquisition order
   (InstanceNumber, then frame number), the n-th slice at a position goes to stack n.
4. Localizers and true obliques are set aside; every other stack is laid out in its
   plane (PL, IL, IP) and sorted along its normal, lowest LPS coordinate first (feet to
   head, anterior to posterior, right to left).

Which heads then run on which stack (plane, modality, slice count) is decided by
:mod:`pipelines.model.stack_match`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.findings import NotAnalysed
from pipelines.model.orientation import (
    ObliqueStack,
    Plane,
    Reorientation,
    SeriesError,
    plane_of,
    reorientation_for,
)
from pipelines.model.series_plan import SeriesPlan
from pipelines.model.slices import SliceHeader, headers_of

#: Two slices whose ImageOrientationPatient differ by more than this are not one stack.
ORIENTATION_TOLERANCE = 1e-3

#: Positions are compared to this many decimals of a millimetre.
POSITION_DECIMALS = 2


@dataclass(frozen=True)
class Skipped:
    """A stack or object of the series that is not analysed, and why (for people)."""

    label: str
    reason: str

    def __str__(self) -> str:
        if self.label.startswith(self.reason):  # "localizer (1 slice, ...)" says it already
            return self.label
        return f"{self.label}: {self.reason}"


@dataclass(frozen=True)
class SeriesStacks:
    """A series split: the stacks to analyse, and what was set aside with its reason."""

    stacks: list[SeriesPlan]
    skipped: list[Skipped]

    def not_analysed(self) -> NotAnalysed:
        """The series' outcome when none of its stacks is analysed."""
        return NotAnalysed("; ".join(str(s) for s in self.skipped) or "no image in the series")


def plan_stacks(paths: Sequence[Path]) -> SeriesStacks:
    """Split a series into stacks and plan each from headers only (see the module notes).

    Raises :class:`SeriesError` for a series that is broken rather than merely not
    analysable: an unreadable file, files of several series, a UID twice.
    """
    if not paths:
        raise SeriesError("empty series: no files")
    slices: list[SliceHeader] = []
    set_aside: Counter[str] = Counter()
    for path in paths:
        try:
            slices += headers_of(Path(path))
        except NotAnalysed as exc:
            set_aside[exc.reason] += 1
    skipped = [
        Skipped(f"{n} object{'s' if n > 1 else ''}", reason) for reason, n in set_aside.items()
    ]
    if not slices:
        return SeriesStacks([], skipped)
    _check_one_series(slices)
    stacks: list[SeriesPlan] = []
    for part in _split(slices):
        try:
            stacks.append(_plan(part))
        except NotAnalysed as exc:
            skipped.append(Skipped(_describe(part, None), exc.reason))
    return SeriesStacks(_numbered(stacks), skipped)


def _numbered(stacks: list[SeriesPlan]) -> list[SeriesPlan]:
    """Stacks that would read alike (two reconstructions) numbered: "axial stack 2 (...)".

    A finding names its stack by label and the findings record indexes slices by it, so two
    stacks of one series must not share one.
    """
    seen = Counter(stack.label for stack in stacks)
    return [
        dataclasses.replace(stack, label=stack.label.replace(" stack (", f" stack {n} (", 1))
        if seen[stack.label] > 1
        else stack
        for n, stack in enumerate(stacks, start=1)
    ]


def plan_single_stack(paths: Sequence[Path]) -> SeriesPlan:
    """The one stack of a series; refused (:class:`SeriesError`) when it has none or more."""
    planned = plan_stacks(paths)
    if len(planned.stacks) == 1 and not planned.skipped:
        return planned.stacks[0]
    if not planned.stacks:
        raise SeriesError(f"nothing to analyse: {planned.not_analysed().reason}")
    found = ", ".join(stack.label for stack in planned.stacks)
    also = "; ".join(str(s) for s in planned.skipped)
    raise SeriesError(
        f"the series holds {len(planned.stacks)} stacks ({found})"
        + (f" and {also}" if also else "")
        + ": plan it with plan_stacks"
    )


def _check_one_series(slices: list[SliceHeader]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if s.series_uid != first.series_uid:
            raise SeriesError(
                f"files from different series: {first.path.name} ({first.series_uid}) and "
                f"{s.path.name} ({s.series_uid})"
            )
    planes = Counter((s.uid, s.frame) for s in slices)
    if any(n > 1 for n in planes.values()):
        raise SeriesError("the same SOPInstanceUID appears twice in the series")


def _orientation_key(iop: tuple[float, ...] | None, seen: list[tuple[float, ...]]) -> int:
    """Index of the first orientation seen within tolerance (-1: none given)."""
    if iop is None:
        return -1
    for k, known in enumerate(seen):
        if np.max(np.abs(np.subtract(iop, known))) <= ORIENTATION_TOLERANCE:
            return k
    seen.append(iop)
    return len(seen) - 1


def _acquisition_order(s: SliceHeader) -> tuple[int, int, str]:
    return (s.instance_number or 0, s.frame, s.uid)


def _split(slices: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Groups of one orientation, size and acquisition; repeated positions split further."""
    orientations: list[tuple[float, ...]] = []
    groups: dict[tuple[object, ...], list[SliceHeader]] = defaultdict(list)
    for s in slices:
        key = (s.localizer, s.rows, s.columns, s.acquisition, _orientation_key(s.iop, orientations))
        groups[key].append(s)
    parts: list[list[SliceHeader]] = []
    for group in groups.values():
        by_occurrence: dict[int, list[SliceHeader]] = defaultdict(list)
        seen: Counter[tuple[float, ...]] = Counter()
        for s in sorted(group, key=_acquisition_order):
            if s.ipp is None:
                by_occurrence[0].append(s)
                continue
            position = tuple(round(v, POSITION_DECIMALS) for v in s.ipp)
            by_occurrence[seen[position]].append(s)
            seen[position] += 1
        parts += [by_occurrence[k] for k in sorted(by_occurrence)]
    # deterministic, whatever order the files arrived in: acquisition order, then the
    # acquisition key (echoes of one acquisition share their InstanceNumbers)
    return sorted(
        parts,
        key=lambda part: (
            min(s.instance_number or 0 for s in part),
            part[0].acquisition,
            min(_acquisition_order(s) for s in part),
        ),
    )


def _describe(part: list[SliceHeader], plane: str | None) -> str:
    first = part[0]
    if plane is None and first.iop is not None:
        try:
            plane = plane_of(first.iop)
        except ObliqueStack:
            plane = "oblique"
    kind = "localizer" if first.localizer else f"{plane or 'axial'} stack"
    details = "".join(f", {name} {value}" for name, value in first.acquisition)
    count = f"{len(part)} slice{'s' if len(part) != 1 else ''}"
    return f"{kind} ({count}, {first.rows}x{first.columns}{details})"


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    """The slice normal, pointing along increasing LPS coordinate of its dominant axis."""
    normal = np.cross(iop[:3], iop[3:])
    return normal if normal[int(np.argmax(np.abs(normal)))] > 0 else -normal


def _plan(part: list[SliceHeader]) -> SeriesPlan:
    """One stack laid out and sorted; a localizer or an oblique stack is not analysed."""
    first = part[0]
    if first.localizer:
        raise NotAnalysed("localizer")
    plane: Plane = "axial"
    reorientation, normal = Reorientation(), None
    if first.iop is not None:
        try:
            plane, reorientation = reorientation_for(first.iop, source=str(first.path.name))
        except ObliqueStack as exc:
            raise NotAnalysed(str(exc).split(": ", 1)[-1]) from exc
        normal = _normal(first.iop)
    ordered, sorted_by = _sort(part, normal)
    frames = tuple(s.frame for s in ordered)
    rescales = tuple(s.rescale or (1.0, 0.0) for s in ordered)
    multi_frame = any(frames)
    return SeriesPlan(
        paths=tuple(s.path for s in ordered),
        sop_instance_uids=tuple(s.uid for s in ordered),
        modality=first.modality,
        rows=first.rows,
        columns=first.columns,
        reorientation=reorientation,
        series_instance_uid=first.series_uid,
        sorted_by=sorted_by,
        frames=frames if multi_frame else (),
        rescales=rescales if multi_frame else (),
        plane=plane,
        label=_describe(part, plane),
    )


def _sort(part: list[SliceHeader], normal: np.ndarray | None) -> tuple[list[SliceHeader], str]:
    """Spatial order along the normal, with fallbacks.

    Position along the normal needs ImagePositionPatient on every slice (and an
    orientation); without them InstanceNumber (then frame number) is the best available
    order, then the order given.
    """
    indexed = list(enumerate(part))
    if normal is not None and all(s.ipp is not None for s in part):

        def position(item: tuple[int, SliceHeader]) -> tuple[float, int, int, int]:
            i, s = item
            assert s.ipp is not None
            return (float(np.dot(s.ipp, normal)), s.instance_number or 0, s.frame, i)

        return [s for _, s in sorted(indexed, key=position)], "position"
    if all(s.instance_number is not None for s in part):
        ordered = sorted(
            indexed, key=lambda item: (item[1].instance_number, item[1].frame, item[0])
        )
        return [s for _, s in ordered], "instance number"
    return part, "file order"
