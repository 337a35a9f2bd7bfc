"""Mask-pooled heads: the mean of the patch tokens inside a region mask, then the head.

Some of Raidium's 2D heads (e.g. ``emidec-classification-mask``) were trained on the patch
tokens that overlap a region, not on the CLS token. Their released forward, per slice: crop
around the mask (at least 128 px a side), resize the crop to the model's input, average the
final-norm patch tokens whose patch the mask touches (the mask max-pooled to the patch grid),
then average over the masked slices. Run on the CLS token instead they would be a different
model, so without a mask they do not run at all.

Lesion-centred 3D heads (``window.selection: mask``) centre their window on the median masked
slice instead of the middle one.

The mask comes from one of the node's mask heads run on the same stack (named by the head
card's ``mask_source``; see :mod:`~pipelines.model.stack_analysis`), or from a segment of a
SEG or RTSTRUCT that arrived in the study, placed on the stack
(:mod:`~pipelines.model.segment_masks`); either is in the stored orientation of the stack
and is reoriented to the layout the pixels are in (PL, IL or IP) before cropping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.findings import SeriesMask
from pipelines.model.backbone import Backbone, backbone_tokens
from pipelines.model.classifier import Head
from pipelines.model.preprocess import (
    PreparedSeries,
    SeriesPlan,
    iter_series_chunks,
    plan_of,
    preprocess_slices,
    subset,
)
from pipelines.model.processor import ProcessorVariant, VolumeStatistics, volume_statistics

#: Smallest side of the crop around a mask, in pixels of the slice.
MIN_CROP = 128

Box = tuple[int, int, int, int]


def crop_around(mask: np.ndarray, min_side: int = MIN_CROP) -> Box:
    """A square (rows, cols) box around a 2D mask: its bounding box, grown to ``min_side``.

    Centred on the mask's bounding box and shifted inside the slice; never larger than the
    slice. Returns (first row, first column, end row, end column), ends exclusive.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has nothing to crop around")
    side = max(min_side, int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0]))

    def span(first: int, end: int, length: int) -> tuple[int, int]:
        width = min(side, length)
        start = (first + end) // 2 - width // 2
        start = min(max(start, 0), length - width)
        return start, start + width

    r0, r1 = span(int(rows[0]), int(rows[-1]) + 1, mask.shape[0])
    c0, c1 = span(int(cols[0]), int(cols[-1]) + 1, mask.shape[1])
    return r0, c0, r1, c1


def patch_mask(mask: np.ndarray, size: int, grid: int) -> torch.Tensor:
    """Which patches a (cropped) mask touches: nearest resize to ``size``, max-pooled to grid."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(size, size), mode="nearest")
    return F.adaptive_max_pool2d(m, grid)[0, 0].flatten() > 0


@dataclass(frozen=True)
class MaskPooled:
    """A mask-pooled head's output, and the masked slice that scored highest for it."""

    outputs: torch.Tensor  # (C,)
    key_slice: int | None


def pooled_slice_features(
    source: SeriesPlan | PreparedSeries,
    mask: np.ndarray,
    backbone: Backbone,
    *,
    clip_below_air: bool,
    variant: ProcessorVariant = "slice",
    volume: VolumeStatistics | None = None,
    batch_size: int = 16,
) -> tuple[list[int], torch.Tensor]:
    """(masked slice indices, their mask-pooled final-norm patch features (n, hidden)).

    ``mask`` is (slices, rows, columns) in the series' stored orientation.
    """
    plan = plan_of(source)
    pl_mask = plan.reorientation.apply(mask)
    slices = [i for i in range(len(plan)) if pl_mask[i].any()]
    size = backbone.spec.image_size
    grid = math.isqrt(backbone.spec.num_patches)
    features: list[torch.Tensor] = []
    for local, pixels in iter_series_chunks(subset(source, slices), batch_size):
        for row, k in enumerate(local):
            region = pl_mask[slices[k]]
            r0, c0, r1, c1 = crop_around(region)
            batch = preprocess_slices(
                pixels[row : row + 1, r0:r1, c0:c1],
                size=size,
                clip_below_air=clip_below_air,
                variant=variant,
                volume=volume,
                device=backbone.device,
            )
            patches = backbone.tokens(batch)[0, 1:]
            touched = patch_mask(region[r0:r1, c0:c1], size, grid).to(patches.device)
            features.append(patches[touched].mean(dim=0).float().cpu())
    if not features:
        return [], torch.zeros(0, backbone.spec.hidden_size)
    return slices, torch.stack(features)


def mask_pooled_prediction(
    head: Head,
    source: SeriesPlan | PreparedSeries,
    mask: np.ndarray,
    backbone: Backbone,
    *,
    clip_below_air: bool,
    variant: ProcessorVariant = "slice",
    volume: VolumeStatistics | None = None,
    batch_size: int = 16,
) -> MaskPooled | None:
    """The head on the mean over masked slices of the mask-pooled features; None: empty mask."""
    slices, features = pooled_slice_features(
        source,
        mask,
        backbone,
        clip_below_air=clip_below_air,
        variant=variant,
        volume=volume,
        batch_size=batch_size,
    )
    if not slices:
        return None
    outputs = head.predict(features.mean(dim=0, keepdim=True))[0].cpu()
    if head.card.task != "classification":
        return MaskPooled(outputs=outputs, key_slice=None)
    scores = head.predict(features)[:, int(torch.argmax(outputs))]
    return MaskPooled(outputs=outputs, key_slice=slices[int(torch.argmax(scores))])


NO_MASK = "not analysed: no mask"
EMPTY_MASK = "not analysed: the mask is empty on this stack"


def _head_input(
    head: Head, source: SeriesPlan | PreparedSeries, backbone: Backbone, batch_size: int
) -> tuple[bool, ProcessorVariant, VolumeStatistics | None]:
    """The head's clamp, processor variant and (volume variant) the series' statistics."""
    clip, variant = head.card.preprocessing(backbone.preprocessing)
    volume = None
    if variant == "volume":
        volume = volume_statistics(
            (pixels for _, pixels in iter_series_chunks(source, batch_size)),
            size=backbone.spec.image_size,
            clip_below_air=clip,
            device=backbone.device,
        )
    return clip, variant, volume


def mask_for(
    head: Head, masks: Sequence[SeriesMask], given: Mapping[str, np.ndarray]
) -> np.ndarray | None:
    """The mask a head reads on this stack: a study segment given for it (by its card or a
    routing rule), else its card's mask head's; None when there is none."""
    if head.name in given:
        return given[head.name]
    if head.card.segment_source is not None:
        return None
    wanted = head.card.mask_head
    found = next((m for m in masks if m.finding.head_name == wanted), None)
    return None if found is None else found.mask


def mask_head_outputs(
    source: SeriesPlan | PreparedSeries,
    heads: Sequence[Head],
    masks: Sequence[SeriesMask],
    backbone: Backbone,
    batch_size: int = 16,
    given: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[int, MaskPooled], dict[int, str]]:
    """Outputs of the ``mask`` heads by position, and the reason for each that did not run.

    Each pools inside its mask (:func:`mask_for`): ``given`` holds the study segments
    placed on this stack, by head name; ``masks`` the node's mask heads' on the same stack.
    """
    outputs: dict[int, MaskPooled] = {}
    reasons: dict[int, str] = {}
    for i, head in enumerate(heads):
        if head.card.pooling != "mask":
            continue
        found = mask_for(head, masks, given or {})
        if found is None:
            reasons[i] = NO_MASK
            continue
        clip, variant, volume = _head_input(head, source, backbone, batch_size)
        pooled = mask_pooled_prediction(
            head,
            source,
            found,
            backbone,
            clip_below_air=clip,
            variant=variant,
            volume=volume,
            batch_size=batch_size,
        )
        if pooled is None:
            reasons[i] = EMPTY_MASK
        else:
            outputs[i] = pooled
    return outputs, reasons


@dataclass(frozen=True)
class LesionWindow:
    """A lesion-centred window head's slices and their reduced tokens (W, t, hidden)."""

    indices: list[int]
    tokens: torch.Tensor


def lesion_windows(
    source: SeriesPlan | PreparedSeries,
    heads: Sequence[Head],
    masks: Sequence[SeriesMask],
    backbone: Backbone,
    batch_size: int = 16,
    given: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[int, LesionWindow], dict[int, str]]:
    """Windows of the heads centred on a mask (``window.selection: mask``), by position.

    The released 3D forward centres its window on the median masked slice when it has a
    mask; the mask is known only after the series' pass, so the window's slices are decoded
    and embedded again here. Without the mask (or with an empty one) the head does not run.
    """
    windows: dict[int, LesionWindow] = {}
    reasons: dict[int, str] = {}
    plan = plan_of(source)
    for i, head in enumerate(heads):
        if not head.centred_on_mask:
            continue
        found = mask_for(head, masks, given or {})
        if found is None:
            reasons[i] = NO_MASK
            continue
        masked = [k for k in range(len(plan)) if found[k].any()]
        if not masked:
            reasons[i] = EMPTY_MASK
            continue
        indices = head.window_indices(len(plan), centre=masked[len(masked) // 2])
        clip, variant, volume = _head_input(head, source, backbone, batch_size)
        _, pixels = next(iter_series_chunks(subset(source, indices), len(indices), workers=1))
        batch = preprocess_slices(
            pixels,
            size=backbone.spec.image_size,
            clip_below_air=clip,
            variant=variant,
            volume=volume,
            device=backbone.device,
        )
        tokens = backbone_tokens(backbone, batch)
        chosen = tokens.final if head.card.token_source == "final_norm" else tokens.last_block
        windows[i] = LesionWindow(indices, head.slice_tokens(chosen).float().cpu())
    return windows, reasons
