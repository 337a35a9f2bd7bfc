"""Mask heads on Curia's patch tokens, and the series masks they infer.

A mask head is a linear layer applied to every patch token (32 x 32 per 512 x 512 slice),
giving a probability per patch. Upsampled to the slice and thresholded, that is a mask a
viewer can overlay: the report side turns it into a BINARY DICOM Segmentation
(:func:`pipelines.reporting.seg.build_seg`) that the SR references.

Curia sees every slice in its PL layout, but a Segmentation frame must match the stored
source pixels, so each mask is turned back to the stored orientation before anything
else sees it. A mask head package looks like a classification head's (``head.json`` +
``head.safetensors``) with ``task: segmentation``, one output and a segment description;
cards are validated on load, as heads.py does, so a bad package fails at start-up.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.findings import (
    SEGMENTATION_TASK,
    HeadClass,
    HeadFinding,
    ModelIdentity,
    SegmentationError,
    SegmentDefinition,
    SeriesMask,
)
from pipelines.model.backbone import Backbone
from pipelines.model.head_card import axial_only
from pipelines.model.heads import BIAS_KEY, CARD_FILE, WEIGHT_KEY, WEIGHTS_FILE, CodeCard
from pipelines.model.key_region import mask_box
from pipelines.model.orientation import Plane
from pipelines.model.preprocess import (
    PreparedSeries,
    Reorientation,
    SeriesPlan,
    iter_series_chunks,
    plan_of,
    preprocess_slices,
    series_source,
)

__all__ = [
    "ABSENT_CLASS",
    "PRESENT_CLASS",
    "MaskAccumulator",
    "MaskHead",
    "MaskHeadCard",
    "SegmentCard",
    "demo_mask_head",
    "load_mask_head",
    "make_series_mask",
    "save_mask_head",
    "segment_series",
    "to_stored_orientation",
]

#: Class names of a mask head's series-level finding: is any pixel in the segment? The
#: SR template for the head states the predicted class (coded Present / Absent).
ABSENT_CLASS = "absent"
PRESENT_CLASS = "present"

_LO_MAX = 64
_ST_MAX = 1024


@functools.cache
def _cid_codes(cid: str) -> frozenset[tuple[str, str]]:
    """(value, scheme) of every concept pydicom knows in a context group, e.g. ``cid7150``."""
    group = getattr(codes, cid)
    members = (getattr(group, name) for name in group.dir())
    return frozenset((code.value, code.scheme_designator) for code in members)


class SegmentCard(BaseModel):
    """What the segment is, as the Segmentation's SegmentSequence item states it.

    Category and type must come from CID 7150 / CID 7151 (what viewers use to name and
    colour a segment); the label is what a viewer lists, the description free text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, max_length=_LO_MAX)
    description: str = Field(default="", max_length=_ST_MAX)
    category: CodeCard
    type: CodeCard

    @field_validator("label")
    @classmethod
    def _no_backslash(cls, v: str) -> str:
        if "\\" in v:
            raise ValueError("a segment label cannot contain a backslash")
        return v

    @field_validator("category")
    @classmethod
    def _category_in_cid7150(cls, v: CodeCard) -> CodeCard:
        if (v.value, v.scheme) not in _cid_codes("cid7150"):
            raise ValueError(
                f"({v.value}, {v.scheme}, {v.meaning!r}) is not in CID 7150 "
                "(Segmentation Property Categories)"
            )
        return v

    @field_validator("type")
    @classmethod
    def _type_in_cid7151(cls, v: CodeCard) -> CodeCard:
        if (v.value, v.scheme) not in _cid_codes("cid7151"):
            raise ValueError(
                f"({v.value}, {v.scheme}, {v.meaning!r}) is not in CID 7151 "
                "(Segmentation Property Types)"
            )
        return v


class MaskHeadCard(BaseModel):
    """A mask head's card: the contract between its weights and the Segmentation it makes.

    ``threshold`` turns the upsampled probability into the binary mask; ``clip_below_air``
    is per head for the same reason as in heads.py (it must be fed as it was trained).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=_LO_MAX, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=_LO_MAX)
    task: Literal["segmentation"]
    description: str = ""
    segment: SegmentCard
    threshold: float = Field(gt=0.0, lt=1.0)
    hidden_size: int = Field(gt=0)
    backbone: str = Field(min_length=1)
    clip_below_air: bool = False
    demo: bool = False
    modalities: list[str] = Field(
        default_factory=list, description="stack modalities it applies to; empty = any"
    )
    planes: list[Plane] = Field(
        default_factory=axial_only, min_length=1, description="patient planes of its stacks"
    )
    min_slices: int = Field(default=1, ge=1, description="fewest slices a stack must have")


@dataclass
class MaskHead:
    """A card and its per-patch linear layer (hidden -> 1 logit)."""

    card: MaskHeadCard
    linear: nn.Linear

    def __post_init__(self) -> None:
        expected = (1, self.card.hidden_size)
        if tuple(self.linear.weight.shape) != expected:
            raise SegmentationError(
                f"mask head {self.card.name!r}: linear layer is "
                f"{list(self.linear.weight.shape)}, the card needs {list(expected)}"
            )
        self.linear.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def segment_definition(self) -> SegmentDefinition:
        """The card's segment as the Segmentation states it (plain values, no model code)."""
        card = self.card
        return SegmentDefinition(
            head_name=card.name,
            head_version=card.version,
            label=card.segment.label,
            category=card.segment.category.to_ref(),
            type=card.segment.type.to_ref(),
            threshold=card.threshold,
            description=card.segment.description,
        )

    def check_hidden_size(self, hidden_size: int) -> None:
        """Refuse a backbone of another width: its tokens would be meaningless here."""
        if hidden_size != self.card.hidden_size:
            raise SegmentationError(
                f"mask head {self.card.name!r} expects tokens of size {self.card.hidden_size} "
                f"(trained on {self.card.backbone}) but the backbone produces {hidden_size}"
            )

    def patch_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-patch probabilities (N, g, g) from backbone tokens (N, 1 + g*g, hidden).

        Token 0 is the CLS token; the rest are the patch grid in row-major order, so the
        reshape puts each probability where its patch lies in the (PL) input slice.
        """
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be (N, 1 + patches, hidden), got {tuple(tokens.shape)}")
        self.check_hidden_size(tokens.shape[2])
        patches = tokens.shape[1] - 1
        grid = math.isqrt(patches)
        if grid * grid != patches or patches == 0:
            raise ValueError(f"{patches} patch tokens do not form a square grid")
        weight = self.linear.weight
        with torch.inference_mode():
            logits = self.linear(tokens[:, 1:].to(weight.device, weight.dtype))
            return torch.sigmoid(logits[..., 0]).reshape(tokens.shape[0], grid, grid)


# --- packages ------------------------------------------------------------------------------


def _format_validation(error: ValidationError) -> str:
    return "; ".join(
        f"field {'.'.join(str(p) for p in item['loc']) or '(card)'!r}: {item['msg']}"
        for item in error.errors()
    )


def _load_card(path: Path) -> MaskHeadCard:
    if not path.is_file():
        raise SegmentationError(f"{path}: missing head card")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmentationError(f"{path}: cannot read head card: {exc}") from exc
    if isinstance(raw, dict) and raw.get("task") != SEGMENTATION_TASK:
        raise SegmentationError(
            f"{path}: task is {raw.get('task')!r}, not {SEGMENTATION_TASK!r}: not a mask head "
            "(classification heads load with pipelines.model.heads.load_head)"
        )
    try:
        return MaskHeadCard.model_validate(raw)
    except ValidationError as exc:
        raise SegmentationError(
            f"{path}: invalid mask head card: {_format_validation(exc)}"
        ) from exc


def _load_linear(path: Path, card: MaskHeadCard) -> nn.Linear:
    if not path.is_file():
        raise SegmentationError(f"{path}: missing head weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise SegmentationError(f"{path}: cannot read head weights: {exc}") from exc
    expected = {WEIGHT_KEY: (1, card.hidden_size), BIAS_KEY: (1,)}
    if set(tensors) != set(expected):
        raise SegmentationError(
            f"{path}: tensors are {sorted(tensors)} but a mask head needs {sorted(expected)}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise SegmentationError(
                f"{path}: {key} has shape {list(tensors[key].shape)} but the card "
                f"(hidden_size {card.hidden_size}) needs {list(shape)}"
            )
    linear = nn.Linear(card.hidden_size, 1)
    with torch.no_grad():
        linear.weight.copy_(tensors[WEIGHT_KEY].float())
        linear.bias.copy_(tensors[BIAS_KEY].float())
    return linear


def load_mask_head(folder: Path | str) -> MaskHead:
    """Load one mask head package (``head.json`` with ``task: segmentation`` + weights)."""
    folder = Path(folder)
    card = _load_card(folder / CARD_FILE)
    return MaskHead(card=card, linear=_load_linear(folder / WEIGHTS_FILE, card))


def save_mask_head(head: MaskHead, folder: Path | str) -> None:
    """Write a package that :func:`load_mask_head` reads back identically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        WEIGHT_KEY: head.linear.weight.detach().float().cpu().contiguous(),
        BIAS_KEY: head.linear.bias.detach().float().cpu().contiguous(),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CARD_FILE).write_text(head.card.model_dump_json(indent=2) + "\n", encoding="utf-8")


def _code_card(code: Code) -> CodeCard:
    return CodeCard(value=code.value, scheme=code.scheme_designator, meaning=code.meaning)


def demo_mask_head(hidden_size: int, seed: int = 0, backbone: str = "Curia-B") -> MaskHead:
    """A built-in, untrained mask head for trying SEG output end to end.

    Its weights are random, so its mask means nothing, and the card, the segment label and
    the description all say so. The weights have a scale of 1/sqrt(hidden) (a logit of
    about unit spread on normed tokens) and a negative bias, so that only a small part of
    a slice comes out positive and the demo overlay stays readable.
    """
    card = MaskHeadCard(
        name="demo-region-mask",
        version="0.1.0-demo",
        task=SEGMENTATION_TASK,
        description="Demo mask head with random weights: its region is not a real finding.",
        segment=SegmentCard(
            label="Demo region (random weights)",
            description=(
                "DEMO - NOT A DIAGNOSIS: region drawn by an untrained mask head with random "
                "weights; it marks no real structure."
            ),
            category=_code_card(codes.cid7150.Tissue),
            type=_code_card(codes.cid7151.Tissue),
        ),
        threshold=0.5,
        hidden_size=hidden_size,
        backbone=backbone,
        demo=True,
    )
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        weight = torch.randn(linear.weight.shape, generator=generator) / math.sqrt(hidden_size)
        linear.weight.copy_(weight)
        linear.bias.fill_(-2.0)
    return MaskHead(card=card, linear=linear)


# --- from a series to a mask ---------------------------------------------------------------


def to_stored_orientation(reorientation: Reorientation, pixels: np.ndarray) -> np.ndarray:
    """Undo ``reorientation`` on the last two axes: PL layout back to the stored layout."""
    return reorientation.undo(pixels)


def _present_absent() -> tuple[HeadClass, HeadClass]:
    return (
        HeadClass(name=ABSENT_CLASS, code=_code_card(codes.SCT.Absent).to_ref()),
        HeadClass(name=PRESENT_CLASS, code=_code_card(codes.SCT.Present).to_ref()),
    )


def make_series_mask(
    mask: np.ndarray,
    *,
    sop_instance_uids: Sequence[str],
    series_instance_uid: str,
    model: ModelIdentity,
    mask_head: MaskHead,
    highest_probability: float,
    frames: Sequence[int] = (),
) -> SeriesMask:
    """Wrap a stored-orientation mask with the series-level finding the SR reports.

    Present when any voxel is in the mask (so SR and SEG cannot disagree), with the
    highest pixel probability as its probability and the slice with the largest area as
    the key slice.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or mask.shape[0] != len(sop_instance_uids):
        raise SegmentationError(f"mask of shape {mask.shape} for {len(sop_instance_uids)} slices")
    if not 0.0 <= highest_probability <= 1.0:
        raise SegmentationError(f"probability {highest_probability} outside 0..1")
    areas = mask.sum(axis=(1, 2))
    present = bool(areas.any())
    key = int(np.argmax(areas)) if present else None
    card = mask_head.card
    finding = HeadFinding(
        head_name=card.name,
        head_version=card.version,
        task=SEGMENTATION_TASK,
        classes=_present_absent(),
        probabilities=(1.0 - highest_probability, highest_probability),
        predicted_index=1 if present else 0,
        key_slice=key,
        demo=card.demo or model.demo,
        key_region=mask_box(mask[key]) if key is not None else None,
    )
    return SeriesMask(
        mask=mask,
        sop_instance_uids=tuple(sop_instance_uids),
        series_instance_uid=series_instance_uid,
        model=model,
        finding=finding,
        frames=tuple(frames),
    )


class MaskAccumulator:
    """One mask head's mask of a series, filled a batch of slices at a time from tokens.

    Per batch: per-patch probabilities -> bilinear upsampling to the PL slice size ->
    threshold, on the backbone's device; then back to the stored orientation on the CPU.
    Only the boolean mask (one byte per voxel) is kept for the whole series. The tokens
    can come from a backbone pass shared with the classification heads.
    """

    def __init__(self, mask_head: MaskHead, plan: SeriesPlan, backbone: Backbone) -> None:
        mask_head.check_hidden_size(backbone.spec.hidden_size)
        # The head follows the backbone: tokens and probabilities then stay on its device
        # (the GPU when there is one) until the thresholded mask is copied back.
        mask_head.linear.to(backbone.device)
        self.head = mask_head
        self.plan = plan
        self.model = backbone.identity
        self.mask = np.zeros((len(plan), plan.rows, plan.columns), dtype=bool)
        self.highest = 0.0

    def add(self, indices: Sequence[int], tokens: torch.Tensor) -> None:
        """Slices ``indices`` (positions in the sorted series) from their final tokens."""
        grid = self.head.patch_probabilities(tokens)
        with torch.inference_mode():
            probabilities = F.interpolate(
                grid.unsqueeze(1).float(),
                size=self.plan.shape,
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            self.highest = max(self.highest, float(probabilities.max()))
            chunk = (probabilities >= self.head.card.threshold).cpu().numpy()
        self.mask[list(indices)] = to_stored_orientation(self.plan.reorientation, chunk)

    def result(self) -> SeriesMask:
        return make_series_mask(
            self.mask,
            sop_instance_uids=self.plan.sop_instance_uids,
            series_instance_uid=self.plan.series_instance_uid,
            model=self.model,
            mask_head=self.head,
            highest_probability=self.highest,
            frames=self.plan.frames,
        )


def segment_series(
    paths: Sequence[Path] | PreparedSeries,
    backbone: Backbone,
    mask_head: MaskHead,
    *,
    batch_size: int = 16,
) -> SeriesMask:
    """Run one mask head over one series on its own backbone pass.

    The pipeline shares one pass with the other heads instead
    (:func:`pipelines.model.inference.analyse_series_and_masks`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = series_source(paths)
    accumulator = MaskAccumulator(mask_head, plan_of(source), backbone)
    for indices, pixels in iter_series_chunks(source, batch_size):
        batch = preprocess_slices(
            pixels,
            size=backbone.spec.image_size,
            clip_below_air=mask_head.card.clip_below_air,
            device=backbone.device,
        )
        accumulator.add(indices, backbone.tokens(batch))
    return accumulator.result()
