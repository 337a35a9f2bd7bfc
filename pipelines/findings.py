"""Plain result types passed from inference to reporting.

They are the contract between the model side (backbone, heads) and the report side
(SR templates, highdicom): neither imports the other, both import these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

#: ``HeadFinding.task`` of a head that produced a mask: its SR group references the
#: segment of the Segmentation made from that mask instead of standing alone.
SEGMENTATION_TASK = "segmentation"
CLASSIFICATION_TASK = "classification"
#: A regression head's one output is a raw value (in its unit), not a probability.
REGRESSION_TASK = "regression"

#: A rectangle of a stored image, in pixel indices: (first row, first column, end row, end
#: column), ends exclusive.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CodeRef:
    """A coded concept as stored in head cards and SR templates (value, scheme, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class HeadClass:
    """One output class of a classification head, with the code a report uses for it."""

    name: str
    code: CodeRef | None = None


@dataclass(frozen=True)
class HeadFinding:
    """What one head concluded about one series.

    ``probabilities`` are in class order and sum to 1 for a softmax head; for a regression
    head (one class naming the quantity) the single entry is the raw predicted value.
    ``key_slice`` is the index (in the spatially sorted series) of the slice that scored
    highest for the predicted class, so a report can point a viewer at it; ``key_region``
    is where on that slice (see :mod:`pipelines.model.key_region`), None when the head keeps no
    spatial information. ``aggregation`` says how a per-slice head's scores became the series
    value (a report names it in the algorithm parameters); None for heads scored once.
    ``stack`` names the stack of the series the head read (a series may hold several: see
    :mod:`pipelines.model.stacks`), empty when the series is one. A per-slice head keeps
    ``slice_scores``: each slice's score (in the order of its stack's slices) for the class
    ``slice_class`` (the predicted class, or the best finding class when "nothing found"
    is predicted), so a report can point at every slice where the finding was seen.
    ``mask_from`` says which segmentation sent with the study a mask-pooled head read its
    mask from (empty otherwise), so the report traces the result to it.
    """

    head_name: str
    head_version: str
    task: str
    classes: tuple[HeadClass, ...]
    probabilities: tuple[float, ...]
    predicted_index: int
    key_slice: int | None = None
    demo: bool = False
    key_region: Box | None = None
    aggregation: str | None = None
    stack: str = ""
    slice_scores: tuple[float, ...] = ()
    slice_class: int | None = None
    mask_from: str = ""

    @property
    def predicted(self) -> HeadClass:
        return self.classes[self.predicted_index]


@dataclass(frozen=True)
class ModelIdentity:
    """Which backbone produced the features: goes into AlgorithmIdentification."""

    name: str
    version: str
    demo: bool
    weights_digest: str = ""


@dataclass
class SeriesFindings:
    """Everything the pipeline learned about one series.

    ``sop_instance_uids_sorted[i]`` holds slice i of the analysed stacks, one stack after
    the other, each in spatial order; ``frames_sorted[i]`` is its 1-based frame number in
    a multi-frame object (0: a single-frame file; empty: no multi-frame source), so a
    report references exactly the frame a key slice was. ``stacks`` gives each named
    stack's slices as [start, end) in that order (empty when the series is one stack).

    What was not done is stated rather than silent, at two levels: ``set_aside`` lists the
    stacks and objects of the series that no head read, each with its reason (a localizer,
    an RT Structure Set); ``heads_not_run`` maps a head that applied to an analysed stack
    but could not run on it to why (a mask-pooled head without a mask), the stack named in
    the reason when the series has several.

    ``segment_heads`` are the heads that read their mask from a segmentation sent with the
    study (a SEG or RTSTRUCT), and ``segmentations_read`` the SOP Instance UIDs of those
    objects whose segment they read: a segmentation arriving later that is not among them
    may change the result.
    """

    series_instance_uid: str
    model: ModelIdentity
    findings: list[HeadFinding] = field(default_factory=list)
    slice_count: int = 0
    sop_instance_uids_sorted: list[str] = field(default_factory=list)
    frames_sorted: list[int] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    heads_not_run: dict[str, str] = field(default_factory=dict)
    stacks: dict[str, list[int]] = field(default_factory=dict)
    segment_heads: list[str] = field(default_factory=list)
    segmentations_read: list[str] = field(default_factory=list)

    def frame_of(self, index: int) -> int:
        """Slice ``index``'s frame number in its object (0: a single-frame file)."""
        return self.frames_sorted[index] if self.frames_sorted else 0

    def slices_of(self, stack: str) -> range:
        """The slices (indices) of a named stack; every slice for the unnamed one."""
        if stack in self.stacks:
            start, end = self.stacks[stack]
            return range(start, end)
        return range(len(self.sop_instance_uids_sorted))


class NotAnalysed(Exception):
    """A series, stack or object that no head applies to: a terminal outcome, not a failure.

    Raised by the model side while preparing or analysing a run (a localizer, a sagittal
    stack when every head is axial-only, a 3-slice series when the heads need 20, an RT
    Structure Set, which is not an image), so that the run is recorded as "not analysed"
    with ``reason``, in words a radiologist or an administrator understands, instead of
    failing with a traceback and being retried.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SegmentationError(ValueError):
    """A mask head package, mask or source set that cannot make a correct Segmentation.

    Raised on both sides (loading a mask head, building its Segmentation), so that one
    ``except`` covers every reason a mask cannot become a SEG.
    """


@dataclass(frozen=True)
class SegmentDefinition:
    """What a mask head's segment is and how it was drawn, as its Segmentation states it.

    A plain copy of the mask head card's fields, so that the report side needs no model
    code: category and type are CID 7150 / 7151 codes (checked when the card loads),
    ``threshold`` is the probability the mask was cut at.
    """

    head_name: str
    head_version: str
    label: str
    category: CodeRef
    type: CodeRef
    threshold: float
    description: str = ""


class SegmentSource(Protocol):
    """The head that made a mask, as the Segmentation needs it (a mask head is one)."""

    @property
    def segment_definition(self) -> SegmentDefinition: ...


@dataclass(frozen=True, eq=False)
class SeriesMask:
    """A mask head's result on one series.

    ``mask[i]`` is the mask of the slice ``sop_instance_uids[i]`` (spatial order, as the
    preprocessing sorts a series; frame ``frames[i]`` of it when it is multi-frame, see
    :class:`SeriesFindings`), in that slice's stored rows x columns, so it can be a
    Segmentation frame as it is. ``finding`` is the series-level result for the SR
    (task :data:`SEGMENTATION_TASK`): present / absent, and the highest pixel probability
    as the probability that the segment is present.
    """

    mask: np.ndarray  # bool (slices, rows, columns)
    sop_instance_uids: tuple[str, ...]
    series_instance_uid: str
    model: ModelIdentity
    finding: HeadFinding
    frames: tuple[int, ...] = ()

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))


def findings_to_dict(value: SeriesFindings) -> dict:
    """A JSON-ready form, stored in the catalogue between the inference and report steps."""
    return asdict(value)


def findings_from_dict(data: dict) -> SeriesFindings:
    def code(raw: dict | None) -> CodeRef | None:
        return CodeRef(**raw) if raw else None

    return SeriesFindings(
        series_instance_uid=data["series_instance_uid"],
        model=ModelIdentity(**data["model"]),
        findings=[
            HeadFinding(
                **{
                    **f,
                    "classes": tuple(
                        HeadClass(name=c["name"], code=code(c.get("code"))) for c in f["classes"]
                    ),
                    "probabilities": tuple(f["probabilities"]),
                    "key_region": tuple(f["key_region"]) if f.get("key_region") else None,
                    "slice_scores": tuple(f.get("slice_scores") or ()),
                }
            )
            for f in data["findings"]
        ],
        slice_count=data.get("slice_count", 0),
        sop_instance_uids_sorted=list(data.get("sop_instance_uids_sorted", [])),
        frames_sorted=list(data.get("frames_sorted", [])),
        set_aside=list(data.get("set_aside", [])),
        heads_not_run=dict(data.get("heads_not_run", {})),
        stacks={k: list(v) for k, v in (data.get("stacks") or {}).items()},
        segment_heads=list(data.get("segment_heads", [])),
        segmentations_read=list(data.get("segmentations_read", [])),
    )
