"""Heads that share a backbone pass, and what each keeps while a series streams through.

Heads are grouped by their preprocessing (clamp, processor variant): each group embeds the
slices it needs once per chunk and accumulates, per head, only what its pooling needs: the
running sum of CLS features and the per-slice scores (``mean_cls`` and ``slice`` heads), the
reduced tokens of a window head's few slices, and the mask heads' per-slice probabilities.
This is the memory contract of :mod:`~pipelines.model.inference`: nothing grows with the
series but a few floats per slice. The analysis turns the accumulations into findings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.model.backbone import Backbone, backbone_tokens
from pipelines.model.heads import Head
from pipelines.model.masks import MaskAccumulator
from pipelines.model.preprocess import (
    PreparedSeries,
    SeriesPlan,
    iter_series_chunks,
    preprocess_slices,
)
from pipelines.model.processor import ProcessorVariant, VolumeStatistics, volume_statistics

log = logging.getLogger(__name__)

#: Above this many bytes of kept window tokens, say so: the head's window is the whole series.
WINDOW_MEMORY_WARNING = 1 << 30


@dataclass
class Window:
    """A window head's slices and the reduced tokens kept for them so far."""

    head_index: int
    indices: list[int]
    position: dict[int, list[int]]  # a slice repeated to pad the window has several
    kept: list[torch.Tensor | None]

    @classmethod
    def for_head(cls, head_index: int, head: Head, slice_count: int) -> Window:
        return cls.for_indices(head_index, head.window_indices(slice_count))

    @classmethod
    def for_indices(cls, head_index: int, indices: list[int]) -> Window:
        position: dict[int, list[int]] = {}
        for k, index in enumerate(indices):
            position.setdefault(index, []).append(k)
        return cls(
            head_index=head_index,
            indices=indices,
            position=position,
            kept=[None] * len(indices),
        )


@dataclass
class HeadGroup:
    """Heads that share one preprocessing setting, and what has been accumulated for them."""

    clip_below_air: bool
    variant: ProcessorVariant
    head_indices: list[int]
    feature_sum: torch.Tensor
    slice_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # (S, C) per head
    windows: list[Window] = field(default_factory=list)
    masks: list[MaskAccumulator] = field(default_factory=list)
    volume: VolumeStatistics | None = None

    @property
    def needs_every_slice(self) -> bool:
        return bool(self.head_indices) or bool(self.masks)

    def wants(self, index: int) -> bool:
        return self.needs_every_slice or any(index in w.position for w in self.windows)


def head_preprocessing(head: Head, backbone: Backbone) -> tuple[bool, ProcessorVariant]:
    """The head's clamp and processor variant: its card's, else the backbone folder's."""
    return head.card.preprocessing(backbone.preprocessing)


def group_heads(
    heads: Sequence[Head],
    backbone: Backbone,
    slice_count: int,
    masks: Sequence[MaskAccumulator] = (),
) -> list[HeadGroup]:
    """One group per distinct preprocessing (clamp, variant), in the order heads first use it.

    ``mask`` heads are not grouped: they run after the pass, on a mask (see
    :func:`~pipelines.model.mask_pooling.mask_head_outputs`).
    """
    groups: dict[tuple[bool, ProcessorVariant], HeadGroup] = {}

    def group(key: tuple[bool, ProcessorVariant]) -> HeadGroup:
        if key not in groups:
            zeros = torch.zeros(backbone.spec.hidden_size, dtype=torch.float64)
            groups[key] = HeadGroup(
                clip_below_air=key[0], variant=key[1], head_indices=[], feature_sum=zeros
            )
        return groups[key]

    for mask in masks:
        group((mask.head.card.clip_below_air, "slice")).masks.append(mask)
    for i, head in enumerate(heads):
        if head.card.pooling == "mask" or head.centred_on_mask:
            continue
        target = group(head_preprocessing(head, backbone))
        if head.uses_window:
            target.windows.append(Window.for_head(i, head, slice_count))
        else:
            target.head_indices.append(i)
            # allocated once: per-chunk small tensors kept alive would fragment the heap
            target.slice_scores[i] = torch.zeros(slice_count, head.card.num_outputs)
    return list(groups.values())


def warn_window_memory(heads: Sequence[Head], groups: list[HeadGroup], backbone: Backbone) -> None:
    """Say when a window head keeps a lot (all patch tokens of a whole series)."""
    spec = backbone.spec
    for group in groups:
        for window in group.windows:
            head = heads[window.head_index]
            per_slice = head.tokens_per_slice(spec.num_patches)
            size = len(window.indices) * per_slice * spec.hidden_size * 4
            if size > WINDOW_MEMORY_WARNING:
                log.warning(
                    "head %s keeps %.1f GB of slice tokens for a %d-slice window",
                    head.name,
                    size / 1e9,
                    len(window.indices),
                )


def measure_volumes(
    source: SeriesPlan | PreparedSeries,
    groups: list[HeadGroup],
    backbone: Backbone,
    batch_size: int,
) -> None:
    """The whole-series statistics the ``volume`` variant's groups normalise with.

    One extra decoding pass (no backbone): the statistics must be known before the first
    slice is normalised.
    """
    for group in groups:
        if group.variant == "volume":
            group.volume = volume_statistics(
                (pixels for _, pixels in iter_series_chunks(source, batch_size)),
                size=backbone.spec.image_size,
                clip_below_air=group.clip_below_air,
                device=backbone.device,
            )


def slices_to_decode(plan: SeriesPlan, groups: list[HeadGroup]) -> list[int]:
    """Every slice if a head pools the whole series, else only the window heads' slices."""
    if any(g.needs_every_slice for g in groups):
        return list(range(len(plan)))
    return sorted({i for g in groups for w in g.windows for i in w.indices})


def run_group(
    group: HeadGroup,
    heads: Sequence[Head],
    indices: list[int],
    pixels: np.ndarray,
    backbone: Backbone,
) -> None:
    """Embed the chunk's slices this group needs and accumulate them for its heads."""
    rows = [r for r, index in enumerate(indices) if group.wants(index)]
    if not rows:
        return
    batch = preprocess_slices(
        pixels if len(rows) == len(indices) else pixels[rows],
        size=backbone.spec.image_size,
        clip_below_air=group.clip_below_air,
        variant=group.variant,
        volume=group.volume,
        device=backbone.device,
    )
    chunk_indices = [indices[r] for r in rows]
    in_window = [
        (w, [(k, w.position[i]) for k, i in enumerate(chunk_indices) if i in w.position])
        for w in group.windows
    ]
    in_window = [(w, hits) for w, hits in in_window if hits]
    if not in_window and not group.masks:  # CLS only: the plain forward pass
        _accumulate_mean(group, heads, chunk_indices, backbone.features(batch))
        return
    tokens = backbone_tokens(backbone, batch)
    _accumulate_mean(group, heads, chunk_indices, tokens.final[:, 0])
    for mask in group.masks:  # every slice is in this chunk's rows: masks need them all
        mask.add(chunk_indices, tokens.final)
    for window, hits in in_window:
        head = heads[window.head_index]
        final_norm = head.card.window is not None and head.card.window.final_norm
        source = tokens.final if final_norm else tokens.last_block
        reduced = head.slice_tokens(source[[k for k, _ in hits]]).float().cpu()
        for row, (_, positions) in enumerate(hits):
            for position in positions:
                window.kept[position] = reduced[row].clone()


def _accumulate_mean(
    group: HeadGroup, heads: Sequence[Head], indices: list[int], cls: torch.Tensor
) -> None:
    """Add CLS features to the series sum and score each slice for the key slice."""
    if not group.head_indices:
        return
    features = cls.float().cpu()
    group.feature_sum += features.double().sum(dim=0)
    for i in group.head_indices:
        group.slice_scores[i][indices] = heads[i].predict(features)
