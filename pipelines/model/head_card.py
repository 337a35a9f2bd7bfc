"""Head cards: what a head predicts and how it must be fed, validated when loaded.

A card (``head.json``) names the head's task and classes (with the codes a report states for
them), how it pools a series, which backbone and preprocessing it was trained on, and how it
was trained or imported. Cards refuse to exist in an invalid state, so a malformed package
fails at start-up with the field named, not halfway through a study.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from pipelines.findings import CodeRef, HeadClass
from pipelines.model.orientation import Plane
from pipelines.model.processor import ProcessorSettings, ProcessorVariant

CARD_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
WEIGHT_KEY = "classifier.weight"
BIAS_KEY = "classifier.bias"
#: Prefix of the attention probe's tensors in ``head.safetensors``.
ATTENTION_PREFIX = "attention."

Task = Literal["classification", "regression"]
#: How a head turns a series into its input (the README's heads section explains each):
#: ``slice`` scores every slice and aggregates the scores; ``mean_cls`` (also written
#: ``series_mean_cls``) applies the head once to the series-mean CLS; ``mask`` to patch tokens
#: inside a region mask; ``attentive`` / ``mean_patch`` are the 3D window heads.
Pooling = Literal["slice", "mean_cls", "mask", "attentive", "mean_patch"]
WINDOW_POOLINGS = ("attentive", "mean_patch")
#: How a ``slice`` head's per-slice scores become the series value.
Aggregation = Literal["max", "mean", "top_k_mean"]
#: Which tokens a head reads: after the backbone's final LayerNorm, or the last block's before it.
TokenSource = Literal["final_norm", "pre_norm"]
#: Spellings accepted for a pooling, and the one a card stores.
_POOLING_ALIASES = {"series_mean_cls": "mean_cls"}
#: An attention probe's block kinds, in the order they run.
Block = Literal["self", "cross"]


class HeadError(ValueError):
    """A head package the node cannot use; the message names the file and the problem."""


class CodeCard(BaseModel):
    """A coded concept in a card (value, coding scheme designator, code meaning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)

    def to_ref(self) -> CodeRef:
        return CodeRef(value=self.value, scheme=self.scheme, meaning=self.meaning)

    @classmethod
    def from_ref(cls, ref: CodeRef) -> CodeCard:
        return cls(value=ref.value, scheme=ref.scheme, meaning=ref.meaning)


class ClassCard(BaseModel):
    """One output class; the code is what the report states (None: text only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    code: CodeCard | None = None

    def to_head_class(self) -> HeadClass:
        return HeadClass(name=self.name, code=self.code.to_ref() if self.code else None)


def axial_only() -> list[Plane]:
    """The planes a card accepts unless it says otherwise: Curia's released heads are axial."""
    return ["axial"]


def _self_then_cross() -> list[Block]:
    """The released probe's default: a self-attention block, then a cross-attention block."""
    return ["self", "cross"]


class AttentionCard(BaseModel):
    """Raidium's ``attention_cfg``: heads per attention block, learned queries, block order.

    A kind listed twice reuses the same block (same weights), as in the released code.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_heads: int = Field(default=1, ge=1)
    num_queries: int = Field(default=1, ge=1)
    blocks: list[Block] = Field(default_factory=_self_then_cross, min_length=1)


class WindowCard(BaseModel):
    """Which slices a window head sees and which of their tokens.

    ``num_slices`` None means every slice of the series. ``selection`` ``centre`` takes
    ``num_slices`` consecutive slices centred on slice ``n // 2`` (the released model's
    forward; a shorter series is used whole); ``even`` is the newer image processor's
    sampling: the truncated ``linspace(0, n - 1, num_slices)``, a shorter series padded by
    repeating its last slice; ``mask`` centres the window on the median masked slice of the
    card's ``mask_source`` (a lesion-centred head). ``final_norm`` is the token source:
    False (the released 3D forward) reads the last block before the final LayerNorm.
    ``tokens`` ``patch`` keeps every patch token of a slice (average-pooled
    over ``kernel_size`` x ``kernel_size`` patches when set, with the slice's CLS token in
    front when ``class_token``); ``slice_mean`` keeps one mean patch token per slice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_slices: int | None = Field(default=None, ge=1)
    selection: Literal["centre", "even", "mask"] = "centre"
    tokens: Literal["patch", "slice_mean"] = "patch"
    kernel_size: int | None = Field(default=None, ge=1)
    class_token: bool = False
    final_norm: bool = False

    @field_validator("kernel_size", "class_token")
    @classmethod
    def _patch_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("tokens") == "slice_mean":
            raise ValueError(f"{info.field_name} applies to tokens 'patch' only")
        return value


SegmentObject = Literal["SEG", "RTSTRUCT"]


def _both_objects() -> list[SegmentObject]:
    return ["SEG", "RTSTRUCT"]


class SegmentRef(BaseModel):
    """A mask that arrives with the study: a Segmentation's segment or a Structure Set's ROI.

    ``segment`` is a label (a SEG's SegmentLabel, an RTSTRUCT's ROIName; compared without
    regard to case or surrounding spaces) or a coded concept (the segment's Segmented
    Property Type, the ROI's RT ROI Identification Code). ``objects`` restricts which kind
    of object may supply it. The object must be in the same study as the analysed stack and
    lie on it: same Frame of Reference, and each frame or contour on one of its slices.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    segment: str | CodeCard
    objects: list[SegmentObject] = Field(default_factory=_both_objects, min_length=1)

    @field_validator("segment")
    @classmethod
    def _label_not_blank(cls, segment: str | CodeCard) -> str | CodeCard:
        if isinstance(segment, str) and not segment.strip():
            raise ValueError("a segment label must not be blank")
        return segment

    def describe(self) -> str:
        """The segment as a person names it: its label or its code meaning."""
        return self.segment if isinstance(self.segment, str) else self.segment.meaning


class TrainingRecord(BaseModel):
    """How a head was trained here and how well it did (cross-validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series: int = Field(ge=1)
    folds: int = Field(ge=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, description="base rate, scaled by batch size / 256")
    seed: int = 0
    class_counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    metrics_std: dict[str, float | None] = Field(default_factory=dict)
    data: str = ""
    trained_at: str = ""


class ImportRecord(BaseModel):
    """Where an imported head came from, and what the node made of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["raidium-dinov2-classifier"]
    source: str
    model_name: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    backbone_copy: bool = False
    backbone_copy_digest: str = ""
    backbone_match: bool | None = None
    backbone_checked_against: str = ""
    notes: list[str] = Field(default_factory=list)


class HeadCard(BaseModel):
    """What a head is: the contract between its weights and the reports it produces.

    The input contract is explicit: ``pooling`` (with ``aggregation`` / ``top_k`` for
    per-slice heads), the token source (:attr:`token_source`), and the image processor
    (``clip_below_air`` and ``processor`` variant; None follows the backbone folder's
    ``preprocessor_config.json``). Both are per head because Curia's image processor exists
    in versions that differ on them and a head must be fed the way it was trained.
    ``mask_source`` names where a ``mask`` head (or a lesion-centred window head) gets its
    mask: the node's mask head of that name, run on the same stack, or a segment of a SEG
    or RTSTRUCT that arrived in the same study (:class:`SegmentRef`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: Task
    description: str = ""
    classes: list[ClassCard] = Field(min_length=1)
    pooling: Pooling = "mean_cls"
    aggregation: Aggregation | None = Field(default=None, validate_default=True)
    top_k: int | None = Field(default=None, ge=1, validate_default=True)
    negative_class: str | None = Field(default=None, validate_default=True)
    mask_source: str | SegmentRef | None = Field(default=None, validate_default=True)
    hidden_size: int = Field(gt=0)
    backbone: str = Field(min_length=1)
    clip_below_air: bool | None = None
    processor: ProcessorVariant | None = None
    demo: bool = False
    modalities: list[str] = Field(
        default_factory=list, description="series modalities it applies to; empty = any"
    )
    planes: list[Plane] = Field(
        default_factory=axial_only, min_length=1, description="patient planes of its stacks"
    )
    min_slices: int = Field(default=1, ge=1, description="fewest slices a stack must have")
    attention: AttentionCard | None = Field(default=None, validate_default=True)
    window: WindowCard | None = Field(default=None, validate_default=True)
    unit: CodeCard | None = Field(
        default=None, description="regression only: UCUM unit of the value"
    )
    backbone_digest: str = Field(
        default="", description="weights digest of the backbone trained on"
    )
    training: TrainingRecord | None = None
    imported: ImportRecord | None = None

    @field_validator("pooling", mode="before")
    @classmethod
    def _pooling_alias(cls, value: Any) -> Any:
        return _POOLING_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("aggregation")
    @classmethod
    def _aggregation_for_slice_heads(
        cls, aggregation: Aggregation | None, info: ValidationInfo
    ) -> Aggregation | None:
        pooling = info.data.get("pooling")
        if pooling == "slice":
            return aggregation or "max"
        if aggregation is not None:
            raise ValueError(f"pooling {pooling!r} scores the series once: remove aggregation")
        return None

    @field_validator("top_k")
    @classmethod
    def _top_k_for_top_k_mean(cls, top_k: int | None, info: ValidationInfo) -> int | None:
        aggregation = info.data.get("aggregation")
        if aggregation == "top_k_mean" and top_k is None:
            raise ValueError("aggregation 'top_k_mean' needs top_k (how many slices)")
        if aggregation != "top_k_mean" and top_k is not None:
            raise ValueError("top_k applies to aggregation 'top_k_mean' only")
        return top_k

    @field_validator("negative_class")
    @classmethod
    def _negative_class_is_a_class(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is None:
            return None
        if info.data.get("pooling") != "slice" or info.data.get("task") != "classification":
            raise ValueError("negative_class applies to pooling 'slice' classification heads")
        names = [c.name for c in info.data.get("classes") or []]
        if name not in names:
            raise ValueError(f"negative_class {name!r} is not one of the classes {names}")
        return name

    @field_validator("mask_source")
    @classmethod
    def _mask_source_for_mask_heads(
        cls, source: str | SegmentRef | None, info: ValidationInfo
    ) -> str | SegmentRef | None:
        pooling = info.data.get("pooling")
        if source is not None and pooling not in ("mask", *WINDOW_POOLINGS):
            raise ValueError("mask_source applies to pooling 'mask' and window heads only")
        return source

    @field_validator("classes")
    @classmethod
    def _classes_fit_the_task(
        cls, classes: list[ClassCard], info: ValidationInfo
    ) -> list[ClassCard]:
        names = [c.name for c in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        task = info.data.get("task")
        if task == "classification" and len(classes) < 2:
            raise ValueError("a classification head needs at least 2 classes")
        if task == "regression" and len(classes) != 1:
            raise ValueError("a regression head has exactly 1 class: the quantity it estimates")
        return classes

    @field_validator("attention")
    @classmethod
    def _attention_fits_pooling(
        cls, attention: AttentionCard | None, info: ValidationInfo
    ) -> AttentionCard | None:
        pooling = info.data.get("pooling")
        if pooling == "attentive" and attention is None:
            raise ValueError("pooling 'attentive' needs an attention section")
        if pooling != "attentive" and attention is not None:
            raise ValueError(f"pooling {pooling!r} has no attention probe: remove the section")
        hidden = info.data.get("hidden_size")
        if attention is not None and hidden and hidden % attention.num_heads:
            raise ValueError(
                f"num_heads {attention.num_heads} does not divide hidden_size {hidden}"
            )
        return attention

    @field_validator("window")
    @classmethod
    def _window_fits_pooling(
        cls, window: WindowCard | None, info: ValidationInfo
    ) -> WindowCard | None:
        pooling = info.data.get("pooling")
        if pooling in WINDOW_POOLINGS and window is None:
            raise ValueError(f"pooling {pooling!r} needs a window section")
        if pooling not in WINDOW_POOLINGS and window is not None:
            raise ValueError(f"pooling {pooling!r} uses every slice: remove the window section")
        plain = window is None or (
            window.tokens == "patch" and not window.kernel_size and not window.class_token
        )
        centred_on_mask = window is not None and window.selection == "mask"
        if centred_on_mask and not info.data.get("mask_source"):
            raise ValueError("selection 'mask' needs the card's mask_source")
        if window is not None and not centred_on_mask and info.data.get("mask_source"):
            raise ValueError("a window head with a mask_source has selection 'mask'")
        if pooling == "mean_patch" and not plain:
            raise ValueError(
                "pooling 'mean_patch' averages plain patch tokens: tokens must be 'patch', "
                "without kernel_size or class_token"
            )
        return window

    @field_validator("unit")
    @classmethod
    def _unit_for_regression(cls, unit: CodeCard | None, info: ValidationInfo) -> CodeCard | None:
        if unit is not None and info.data.get("task") != "regression":
            raise ValueError("only a regression head has a unit")
        return unit

    @property
    def mask_head(self) -> str | None:
        """The node mask head whose mask this head reads (None: none, or a segment)."""
        return self.mask_source if isinstance(self.mask_source, str) else None

    @property
    def segment_source(self) -> SegmentRef | None:
        """The study's segment this head reads its mask from (None: none, or a mask head)."""
        return self.mask_source if isinstance(self.mask_source, SegmentRef) else None

    @property
    def token_source(self) -> TokenSource:
        """Which backbone tokens the head reads: 2D poolings the final-norm ones."""
        if self.window is not None and not self.window.final_norm:
            return "pre_norm"
        return "final_norm"

    def preprocessing(self, folder: ProcessorSettings) -> tuple[bool, ProcessorVariant]:
        """Clamp and processor variant: the card's own, else the backbone folder's."""
        clip = folder.clip_below_air if self.clip_below_air is None else self.clip_below_air
        return clip, self.processor or folder.variant

    @property
    def negative_index(self) -> int | None:
        """Position of :attr:`negative_class` among the classes (None: none is named)."""
        names = [c.name for c in self.classes]
        return names.index(self.negative_class) if self.negative_class else None

    @property
    def head_classes(self) -> tuple[HeadClass, ...]:
        return tuple(c.to_head_class() for c in self.classes)

    @property
    def num_outputs(self) -> int:
        """Width of the linear layer: one logit per class, one value for regression."""
        return len(self.classes)
