"""Plain result types passed from inference to reporting.

They are the contract between the model side (backbone, heads) and the report side
(SR templates, highdicom): neither imports the other, both import these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    spatial information.
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
    """Everything the pipeline learned about one series."""

    series_instance_uid: str
    model: ModelIdentity
    findings: list[HeadFinding] = field(default_factory=list)
    slice_count: int = 0
    sop_instance_uids_sorted: list[str] = field(default_factory=list)


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
                }
            )
            for f in data["findings"]
        ],
        slice_count=data.get("slice_count", 0),
        sop_instance_uids_sorted=list(data.get("sop_instance_uids_sorted", [])),
    )
