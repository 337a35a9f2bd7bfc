"""A series' stacks analysed one by one, their findings reported together.

A series is split into stacks (:mod:`pipelines.model.stacks`); each stack gets the heads
whose cards accept it (:mod:`pipelines.model.stack_match`) and is analysed on its own, as
Curia analyses one stack. The findings of every analysed stack go into the series' one
findings record, so a run still has one SR per part (see
:func:`pipelines.reporting.document.split_findings`): each head's result names its stack,
and its key slice points into the slices of the analysed stacks laid end to end (with the
frame number of a multi-frame source). A mask head gives one mask per stack it read.

Each stack is one whole analysis: a per-slice head aggregates that stack's slices, the
``volume`` processor measures that stack, and a mask-pooled or lesion-centred head pools
in the mask its mask head drew on that same stack, never on another stack's slices. A
head that applies to a stack but cannot run there (no mask on it) is stated per stack.

When no stack is analysed the series is :class:`~pipelines.findings.NotAnalysed`, with the
reason of each stack and object set aside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.findings import HeadFinding, NotAnalysed, SeriesFindings, SeriesMask
from pipelines.model.backbone import Backbone
from pipelines.model.heads import Head
from pipelines.model.inference import analyse_series_and_masks
from pipelines.model.masks import MaskHead
from pipelines.model.series_plan import PreparedSeries, SeriesPlan
from pipelines.model.stack_match import heads_for_stack, why_not
from pipelines.model.stacks import SeriesStacks, Skipped, plan_stacks


@dataclass(frozen=True)
class StackUnit:
    """One stack to analyse: its position among the series' stacks, plan and heads."""

    index: int
    plan: SeriesPlan
    heads: list[Head]
    mask_heads: list[MaskHead]


@dataclass(frozen=True)
class StackMask:
    """A mask head's mask of one stack, with what it needs to become a Segmentation."""

    unit: StackUnit
    head: MaskHead
    mask: SeriesMask


def choose_units(
    planned: SeriesStacks, heads: Sequence[Head], mask_heads: Sequence[MaskHead]
) -> tuple[list[StackUnit], list[Skipped]]:
    """The stacks some head accepts, and every stack or object set aside with its reason."""
    units: list[StackUnit] = []
    skipped = list(planned.skipped)
    cards = [h.card for h in heads] + [m.card for m in mask_heads]
    for index, plan in enumerate(planned.stacks):
        unit = StackUnit(
            index, plan, heads_for_stack(heads, plan), heads_for_stack(mask_heads, plan)
        )
        if unit.heads or unit.mask_heads:
            units.append(unit)
        else:
            skipped.append(Skipped(plan.label, why_not(cards, plan)))
    return units, skipped


def plan_units(
    paths: Sequence[Path], heads: Sequence[Head], mask_heads: Sequence[MaskHead]
) -> tuple[list[StackUnit], list[Skipped]]:
    """Split the series and choose its units; :class:`NotAnalysed` when there are none."""
    units, skipped = choose_units(plan_stacks(paths), heads, mask_heads)
    if not units:
        raise NotAnalysed("; ".join(str(s) for s in skipped) or "no image in the series")
    return units, skipped


def analyse_units(
    units: Sequence[StackUnit],
    skipped: Sequence[Skipped],
    backbone: Backbone,
    *,
    series_instance_uid: str,
    batch_size: int = 16,
    prepared: Callable[[StackUnit], PreparedSeries | None] = lambda unit: None,
    given_masks: Callable[[StackUnit], Mapping[str, np.ndarray]] = lambda unit: {},
) -> tuple[SeriesFindings, list[StackMask]]:
    """Analyse each unit; one findings record for the series, and the masks per stack.

    ``prepared`` returns a unit's stack as a CPU worker decoded it ahead, or None to
    decode it here. ``given_masks`` returns, by head name, the masks of the study's
    segmentations placed on a unit's stack (:mod:`~pipelines.model.segment_masks`).
    Heads' findings name their stack when the series has more than one
    (analysed or set aside); key slices are offset to index the concatenated slices.
    """
    labelled = len(units) > 1 or bool(skipped)
    combined = SeriesFindings(
        series_instance_uid=series_instance_uid,
        model=backbone.identity,
        set_aside=[str(s) for s in skipped],
    )
    masks: list[StackMask] = []
    multi_frame = any(unit.plan.frames for unit in units)
    for unit in units:
        source: SeriesPlan | PreparedSeries = prepared(unit) or unit.plan
        findings, unit_masks = analyse_series_and_masks(
            source,
            backbone,
            unit.heads,
            series_instance_uid=series_instance_uid,
            batch_size=batch_size,
            mask_heads=unit.mask_heads,
            given_masks=given_masks(unit),
        )
        offset = len(combined.sop_instance_uids_sorted)
        stack = unit.plan.label if labelled else ""
        combined.findings += [_moved(f, offset, stack) for f in findings.findings]
        for head_name, reason in findings.heads_not_run.items():
            _not_run(combined, head_name, f"{stack}: {reason}" if stack else reason)
        combined.sop_instance_uids_sorted += findings.sop_instance_uids_sorted
        if multi_frame:
            combined.frames_sorted += list(unit.plan.frames) or [0] * len(unit.plan)
        combined.slice_count += findings.slice_count
        if stack:
            combined.stacks[stack] = [offset, len(combined.sop_instance_uids_sorted)]
        for head, mask in zip(unit.mask_heads, unit_masks, strict=True):
            finding = _moved(mask.finding, offset, stack)
            masks.append(StackMask(unit, head, dataclasses.replace(mask, finding=finding)))
    return combined, masks


def _moved(finding: HeadFinding, offset: int, stack: str) -> HeadFinding:
    """The finding with its key slice counted among every analysed stack's slices."""
    key = finding.key_slice
    return dataclasses.replace(
        finding, key_slice=None if key is None else key + offset, stack=stack
    )


def _not_run(combined: SeriesFindings, head_name: str, reason: str) -> None:
    """Record why a head did not run on a stack, after its reasons on earlier stacks."""
    earlier = combined.heads_not_run.get(head_name)
    combined.heads_not_run[head_name] = f"{earlier}; {reason}" if earlier else reason
