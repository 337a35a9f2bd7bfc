"""Series -> findings: stream slices through Curia, pool per series, apply the heads.

Slices are decoded, preprocessed and embedded a batch at a time; only the running sum of CLS
features and the per-slice head scores (a few floats per slice) are kept, so memory does not
grow with the series. Heads that need different preprocessing (``clip_below_air``) get their
own features from the same decoded batch rather than sharing the first head's setting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.backbone import Backbone
from pipelines.findings import HeadFinding, SeriesFindings
from pipelines.heads import Head
from pipelines.preprocess import iter_series_chunks, plan_series, preprocess_slices

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


@dataclass
class _Group:
    """Heads that share one preprocessing setting, and what has been accumulated for them."""

    clip_below_air: bool
    head_indices: list[int]
    feature_sum: torch.Tensor
    slice_scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _group_heads(heads: Sequence[Head], hidden_size: int) -> list[_Group]:
    """One group per distinct ``clip_below_air`` setting, in the order heads first use it."""
    groups: dict[bool, _Group] = {}
    for i, head in enumerate(heads):
        clip = head.card.clip_below_air
        if clip not in groups:
            zeros = torch.zeros(hidden_size, dtype=torch.float64)
            groups[clip] = _Group(clip_below_air=clip, head_indices=[], feature_sum=zeros)
        groups[clip].head_indices.append(i)
        groups[clip].slice_scores[i] = []
    return list(groups.values())


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


def _finding(
    head: Head, scores: list[torch.Tensor], group: _Group, slice_count: int, backbone: Backbone
) -> HeadFinding:
    """Mean-pooled series prediction, with the slice that scored highest for it."""
    mean = (group.feature_sum / slice_count).float().unsqueeze(0)
    probabilities = head.predict(mean)[0].cpu()
    predicted = int(torch.argmax(probabilities))
    key_slice = int(torch.argmax(torch.cat(scores)[:, predicted]))
    return HeadFinding(
        head_name=head.card.name,
        head_version=head.card.version,
        task=head.card.task,
        classes=head.card.head_classes,
        probabilities=tuple(float(p) for p in probabilities),
        predicted_index=predicted,
        key_slice=key_slice,
        demo=head.card.demo or backbone.identity.demo,
    )


def analyse_series(
    paths: Sequence[Path],
    backbone: Backbone,
    heads: Sequence[Head],
    *,
    series_instance_uid: str,
    batch_size: int = 16,
) -> SeriesFindings:
    """Run every head on one series and report what they concluded.

    The series is sorted from headers, then streamed ``batch_size`` slices at a time:
    decode -> preprocess (once per ``clip_below_air`` group) -> CLS features. Each head is
    applied to the mean CLS feature of the series; its per-slice scores only pick the key
    slice a report points at.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_heads(heads, backbone)
    plan = plan_series(paths)
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
    )
    if not heads:
        return result
    groups = _group_heads(heads, backbone.spec.hidden_size)
    for _, pixels in iter_series_chunks(plan, batch_size):
        for group in groups:
            batch = preprocess_slices(
                pixels,
                size=backbone.spec.image_size,
                clip_below_air=group.clip_below_air,
                device=backbone.device,
            )
            features = backbone.features(batch).float().cpu()
            group.feature_sum += features.double().sum(dim=0)
            for i in group.head_indices:
                group.slice_scores[i].append(heads[i].predict(features))
    group_of = {i: group for group in groups for i in group.head_indices}
    for i, head in enumerate(heads):
        group = group_of[i]
        finding = _finding(head, group.slice_scores[i], group, len(plan), backbone)
        result.findings.append(finding)
    return result
