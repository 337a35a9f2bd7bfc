"""A planned stack: sorted, checked and oriented from headers before any pixel is read.

Headers are read with ``stop_before_pixels`` (:mod:`pipelines.model.stacks` splits and
sorts them), so a 2,000-slice CT is sorted and checked without decoding it. A planned
stack (or one already decoded into a prepared folder, see :mod:`pipelines.model.prepared`)
is the *source* that decoding and inference take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.model.orientation import Plane, Reorientation


@dataclass(frozen=True)
class SeriesPlan:
    """One stack sorted and checked from headers only, ready to be decoded in chunks.

    A stack is a series, or the part of one that is a single stack of parallel slices of
    one size (:mod:`pipelines.model.stacks` splits a series). Entries are per slice, in
    spatial order: ``paths[i]`` / ``sop_instance_uids[i]`` is the file holding slice i and
    ``frames[i]`` its 1-based frame number in a multi-frame object (0: a single-frame
    file; empty: every slice is one). ``rescales[i]`` is a frame's (slope, intercept)
    from its functional groups (empty for single-frame files, which carry their own).
    ``plane`` is the patient plane the stack is laid out in (PL, IL or IP; see
    :mod:`pipelines.model.orientation`); ``label`` says which stack this is, for people.
    """

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    modality: str
    rows: int
    columns: int
    reorientation: Reorientation
    series_instance_uid: str
    sorted_by: str  # "position", "instance number" or "file order"
    frames: tuple[int, ...] = ()
    rescales: tuple[tuple[float, float], ...] = ()
    plane: Plane = "axial"
    label: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every slice after reorientation."""
        return self.reorientation.output_shape(self.rows, self.columns)

    def frame(self, index: int) -> int:
        """Slice ``index``'s frame number in its file (0: a single-frame file)."""
        return self.frames[index] if self.frames else 0

    def rescale(self, index: int) -> tuple[float, float] | None:
        return self.rescales[index] if self.rescales else None


def plan_series(paths: Sequence[Path]) -> SeriesPlan:
    """Sort and check a series that is one stack, from headers only.

    A series of several stacks, or with nothing Curia can read, is refused with the reason;
    :func:`pipelines.model.stacks.plan_stacks` plans every stack of a series.
    """
    from pipelines.model.stacks import plan_single_stack

    return plan_single_stack(paths)


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
        frames=tuple(plan.frames[i] for i in indices) if plan.frames else (),
        rescales=tuple(plan.rescales[i] for i in indices) if plan.rescales else (),
    )
    if isinstance(source, PreparedSeries):
        return PreparedSeries(plan=narrowed, pixels=source.pixels[list(indices)])
    return narrowed
