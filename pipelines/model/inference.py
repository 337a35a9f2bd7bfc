"""Series -> findings: stream slices through Curia, pool per series, apply the heads.

Slices are decoded, preprocessed and embedded a batch at a time; only the running sum of CLS
features and the per-slice head scores (a few floats per slice) are kept, so memory does not
grow with the series. ``slice`` heads are aggregated from those per-slice scores,
``mean_cls`` heads applied to the mean CLS. Heads that need different preprocessing (clamp,
processor variant) get their own features from the same decoded batch rather than sharing
the first head's setting; the ``volume`` variant's statistics take one decoding pass first.

Window heads (``attentive``, ``mean_patch``) read the tokens of a few slices: their window
is known from the headers before any pixel is decoded, so only those slices' reduced tokens
are kept, and when no head needs the whole series only the window slices are decoded.
Heads that need a mask (``mask`` pooling, lesion-centred windows) run after the pass, once
the node's mask heads have produced it (:mod:`~pipelines.model.mask_pooling`).

What each head keeps during the pass, and how heads share it, is
:mod:`~pipelines.model.head_groups`; this module runs the pass and turns what was kept into
findings. A "series" here is one stack: :mod:`~pipelines.model.stack_analysis` calls it per
stack of a series.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipelines.findings import HeadFinding, SeriesFindings, SeriesMask
from pipelines.model.backbone import Backbone, backbone_tokens
from pipelines.model.head_groups import (
    HeadGroup,
    Window,
    group_heads,
    measure_volumes,
    run_group,
    slices_to_decode,
    warn_window_memory,
)
from pipelines.model.heads import Head
from pipelines.model.key_region import grid_region
from pipelines.model.mask_pooling import lesion_windows, mask_head_outputs
from pipelines.model.masks import MaskAccumulator, MaskHead
from pipelines.model.pooling import aggregate_slices, describe
from pipelines.model.preprocess import (
    PreparedSeries,
    SeriesPlan,
    iter_series_chunks,
    plan_of,
    preprocess_slices,
    series_source,
    subset,
)

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Resolve a device setting: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda[:N]``.

    An explicit CUDA request on a machine without one is an error rather than a silent CPU
    fallback, since it would make a GPU node quietly 100x slower.
    """
    choice = preference.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {preference!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA "
            "device(s) are present"
        )
    return device


# --- the backbone, with tokens when a window head needs them -----------------------------


def embed_chunks(
    chunks: Iterable[np.ndarray],
    backbone: Backbone,
    *,
    clip_below_air: bool = False,
) -> torch.Tensor:
    """Per-slice CLS features (S, hidden), float32 on the CPU, for chunks of PL slices.

    The same preprocessing and backbone call as :func:`analyse_series`, so features cached
    for training are exactly what a ``mean_cls`` head sees in production.
    """
    out = []
    for pixels in chunks:
        batch = preprocess_slices(
            pixels,
            size=backbone.spec.image_size,
            clip_below_air=clip_below_air,
            device=backbone.device,
        )
        out.append(backbone.features(batch).float().cpu())
    if not out:
        return torch.zeros(0, backbone.spec.hidden_size)
    return torch.cat(out)


def slice_features(
    paths: Sequence[Path] | SeriesPlan,
    backbone: Backbone,
    *,
    clip_below_air: bool = False,
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-slice CLS features (S, hidden) of a DICOM series, in spatial order."""
    chunks = (pixels for _, pixels in iter_series_chunks(paths, batch_size))
    return embed_chunks(chunks, backbone, clip_below_air=clip_below_air)


def _check_heads(heads: Sequence[Head], backbone: Backbone) -> None:
    """Refuse width mismatches up front, before any slice is decoded."""
    for head in heads:
        head.check_hidden_size(backbone.spec.hidden_size)
        if head.card.backbone != backbone.identity.name:
            log.info(
                "head %s was trained on %s, running on %s",
                head.name,
                head.card.backbone,
                backbone.identity.name,
            )


# --- findings ----------------------------------------------------------------------------


def _mean_finding(
    head: Head, scores: torch.Tensor, group: HeadGroup, slice_count: int, backbone: Backbone
) -> HeadFinding:
    """Mean-pooled series prediction, with the slice that scored highest for it.

    A regression head has no class to score slices for, so it names no key slice. A
    ``slice`` head's prediction is its per-slice scores aggregated (see
    :mod:`~pipelines.model.pooling`).
    """
    card = head.card
    if card.pooling == "slice" and card.aggregation is not None:
        value = aggregate_slices(
            scores,
            card.aggregation,
            top_k=card.top_k,
            negative_class=card.negative_index,
            regression=card.task == "regression",
        )
        finding = _finding(head, value.outputs, value.key_slice, backbone)
        finding = dataclasses.replace(
            finding,
            predicted_index=value.predicted,
            aggregation=describe(card.aggregation, card.top_k, slice_count),
        )
        if card.task != "classification":
            return finding
        shown = value.predicted
        if shown == card.negative_index:  # "nothing found": the slices of the best finding
            others = value.outputs.clone()
            others[shown] = -1.0
            shown = int(torch.argmax(others))
        return dataclasses.replace(
            finding,
            slice_scores=tuple(round(float(s), 6) for s in scores[:, shown]),
            slice_class=shown,
        )
    mean = (group.feature_sum / slice_count).float().unsqueeze(0)
    outputs = head.predict(mean)[0].cpu()
    predicted = int(torch.argmax(outputs))
    key_slice = None
    if head.card.task == "classification":
        key_slice = int(torch.argmax(scores[:, predicted]))
    return _finding(head, outputs, key_slice, backbone)


def _window_finding(
    head: Head, window: Window, backbone: Backbone, plan: SeriesPlan
) -> HeadFinding:
    missing = [window.indices[k] for k, t in enumerate(window.kept) if t is None]
    if missing:  # defensive: every window slice is decoded and embedded above
        raise RuntimeError(f"head {head.name}: no tokens for slices {missing}")
    prediction = head.predict_window(torch.stack([t for t in window.kept if t is not None]))
    key = prediction.key_position
    finding = _finding(
        head, prediction.outputs, None if key is None else window.indices[key], backbone
    )
    if prediction.key_scores is None or finding.key_slice is None:
        return finding
    # pooled patches may leave a remainder of the full grid uncovered
    full_side = math.isqrt(backbone.spec.num_patches)
    kernel = (head.card.window.kernel_size if head.card.window else None) or 1
    extent = math.isqrt(prediction.key_scores.numel()) * kernel / full_side
    region = grid_region(
        prediction.key_scores, plan.reorientation, (plan.rows, plan.columns), extent=extent
    )
    return dataclasses.replace(finding, key_region=region)


def _locate_mean_findings(
    source: SeriesPlan | PreparedSeries,
    heads: Sequence[Head],
    groups: list[HeadGroup],
    findings: dict[int, HeadFinding],
    backbone: Backbone,
) -> None:
    """Give each mean-CLS classification finding the region of its key slice.

    The key slice is only known once every slice has been scored, so its patch tokens are
    computed again here: one extra backbone pass over at most one slice per head.
    """
    for group in groups:
        wanted: dict[int, int] = {}
        for i in group.head_indices:
            key_slice = findings[i].key_slice
            if key_slice is not None:
                wanted[i] = key_slice
        if not wanted:
            continue
        slices = sorted(set(wanted.values()))
        _, pixels = next(iter_series_chunks(subset(source, slices), len(slices), workers=1))
        batch = preprocess_slices(
            pixels,
            size=backbone.spec.image_size,
            clip_below_air=group.clip_below_air,
            variant=group.variant,
            volume=group.volume,
            device=backbone.device,
        )
        patches = backbone_tokens(backbone, batch).final[:, 1:]
        for i, key in wanted.items():
            head = heads[i]
            weight = head.linear.weight
            with torch.inference_mode():
                logits = head.linear(patches[slices.index(key)].to(weight.device, weight.dtype))
            scores = logits[:, findings[i].predicted_index]
            plan = plan_of(source)
            region = grid_region(scores, plan.reorientation, (plan.rows, plan.columns))
            findings[i] = dataclasses.replace(findings[i], key_region=region)


def _finding(
    head: Head, outputs: torch.Tensor, key_slice: int | None, backbone: Backbone
) -> HeadFinding:
    """For regression, ``probabilities`` holds the raw value and ``predicted_index`` is 0."""
    return HeadFinding(
        head_name=head.card.name,
        head_version=head.card.version,
        task=head.card.task,
        classes=head.card.head_classes,
        probabilities=tuple(float(p) for p in outputs),
        predicted_index=int(torch.argmax(outputs)),
        key_slice=key_slice,
        demo=head.card.demo or backbone.identity.demo,
    )


# --- the series --------------------------------------------------------------------------


def analyse_series(
    paths: Sequence[Path] | PreparedSeries,
    backbone: Backbone,
    heads: Sequence[Head],
    *,
    series_instance_uid: str,
    batch_size: int = 16,
) -> SeriesFindings:
    """The findings of ``heads`` on one series (see :func:`analyse_series_and_masks`)."""
    findings, _ = analyse_series_and_masks(
        paths, backbone, heads, series_instance_uid=series_instance_uid, batch_size=batch_size
    )
    return findings


def analyse_series_and_masks(
    paths: Sequence[Path] | SeriesPlan | PreparedSeries,
    backbone: Backbone,
    heads: Sequence[Head],
    *,
    series_instance_uid: str,
    batch_size: int = 16,
    mask_heads: Sequence[MaskHead] = (),
    given_masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[SeriesFindings, list[SeriesMask]]:
    """Run every head on one series and report what they concluded.

    The series is sorted from headers, then streamed ``batch_size`` slices at a time:
    decode -> preprocess (once per ``clip_below_air`` group) -> backbone. A ``mean_cls``
    head is applied to the mean CLS feature of the series; for a classifier, its per-slice
    scores only pick the key slice a report points at (a regression head names none). A
    window head gets its window's reduced tokens; its key slice is the one its learned
    queries attended to most (the window's centre when it has no cross-attention block).

    For a regression head, the finding's ``probabilities`` is the one raw predicted value.
    ``paths`` may also be a series a CPU worker decoded ahead (:func:`prepare_series`).

    ``mask_heads`` read the same backbone pass (their tokens are the final ones of every
    slice) and give one mask each, in order; their findings are in the masks, not in the
    returned findings.

    ``given_masks`` are masks from the study's segmentations placed on this series, by the
    name of the head that reads them (:mod:`~pipelines.model.segment_masks`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_heads(heads, backbone)
    source = series_source(paths)
    plan = plan_of(source)
    if plan.series_instance_uid and plan.series_instance_uid != series_instance_uid:
        log.warning(
            "series %s: files carry SeriesInstanceUID %s",
            series_instance_uid,
            plan.series_instance_uid,
        )
    result = SeriesFindings(
        series_instance_uid=series_instance_uid,
        model=backbone.identity,
        slice_count=len(plan),
        sop_instance_uids_sorted=list(plan.sop_instance_uids),
        frames_sorted=list(plan.frames),
    )
    if not heads and not mask_heads:
        return result, []
    masks = [MaskAccumulator(head, plan, backbone) for head in mask_heads]
    groups = group_heads(heads, backbone, len(plan), masks)
    measure_volumes(source, groups, backbone, batch_size)
    warn_window_memory(heads, groups, backbone)
    for head in heads:
        if head.probe is not None:  # attention over thousands of tokens: next to the backbone
            head.to(backbone.device)
    decode = slices_to_decode(plan, groups)
    for local, pixels in iter_series_chunks(subset(source, decode), batch_size):
        indices = [decode[i] for i in local]
        for group in groups:
            run_group(group, heads, indices, pixels, backbone)
    findings: dict[int, HeadFinding] = {}
    for group in groups:
        for i in group.head_indices:
            findings[i] = _mean_finding(heads[i], group.slice_scores[i], group, len(plan), backbone)
        for window in group.windows:
            findings[window.head_index] = _window_finding(
                heads[window.head_index], window, backbone, plan
            )
    _locate_mean_findings(source, heads, groups, findings, backbone)
    series_masks = [mask.result() for mask in masks]
    pooled, skipped = mask_head_outputs(
        source, heads, series_masks, backbone, batch_size, given_masks
    )
    for i, value in pooled.items():
        findings[i] = _finding(heads[i], value.outputs, value.key_slice, backbone)
    lesions, unplaced = lesion_windows(
        source, heads, series_masks, backbone, batch_size, given_masks
    )
    skipped.update(unplaced)
    for i, lesion in lesions.items():
        window = Window.for_indices(i, lesion.indices)
        window.kept = list(lesion.tokens)
        findings[i] = _window_finding(heads[i], window, backbone, plan)
    for i, reason in skipped.items():
        log.info(
            "series %s%s: head %s %s",
            series_instance_uid,
            f" ({plan.label})" if plan.label else "",
            heads[i].name,
            reason,
        )
        result.heads_not_run[heads[i].name] = reason
    result.findings.extend(findings[i] for i in range(len(heads)) if i not in skipped)
    return result, series_masks
