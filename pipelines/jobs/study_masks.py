"""The masks a run's heads read from the study's segmentations, stack by stack.

Which heads want a study segment comes from their cards (``mask_source: {segment: ...}``)
and from the routing rules (``mask_segments: {head: label}``, which take precedence); the
SEG and RTSTRUCT objects are those the catalogue holds for the study when the analysis
starts (:func:`node.workflow.segmentations.study_segmentations`). They are read once per
run, only when some head wants a segment, and placed on each stack by
:mod:`pipelines.model.segment_masks`. What was read is recorded with the findings, so that
a segmentation arriving later can re-run the series.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.findings import SeriesFindings

if TYPE_CHECKING:
    import numpy as np

    from pipelines.model.head_card import SegmentRef
    from pipelines.model.heads import Head
    from pipelines.model.segment_masks import StudySegment
    from pipelines.model.stack_analysis import StackUnit

log = logging.getLogger(__name__)


@dataclass
class StudyMasks:
    """The study segments wanted by head name, and the objects they were read from."""

    wanted: dict[str, SegmentRef]
    segments: list[StudySegment] = field(default_factory=list)
    read: set[str] = field(default_factory=set)
    #: By head name, the segments it read ("segment 'Liver' of SEG <SOP Instance UID>").
    used: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def for_heads(
        cls,
        heads: Sequence[Head],
        rule_segments: Mapping[str, str],
        objects: Sequence[tuple[str, Path]],
    ) -> StudyMasks:
        """What ``heads`` want, read from ``objects`` (SOP class, path) when any wants one."""
        from pipelines.model.head_card import SegmentRef

        wanted: dict[str, SegmentRef] = {}
        for head in heads:
            if head.card.pooling != "mask" and not head.centred_on_mask:
                continue
            if head.name in rule_segments:
                wanted[head.name] = SegmentRef(segment=rule_segments[head.name])
            elif head.card.segment_source is not None:
                wanted[head.name] = head.card.segment_source
        if not wanted or not objects:
            return cls(wanted)
        from pipelines.jobs.segment_reader import read_segments

        return cls(wanted, read_segments(objects))

    def on_stack(self, unit: StackUnit) -> dict[str, np.ndarray]:
        """By head name, the masks of the wanted segments that lie on ``unit``'s stack."""
        from pipelines.model.segment_masks import segment_masks, stack_grid

        names = {head.name for head in unit.heads} & set(self.wanted)
        if not names or not self.segments:
            return {}
        grid = stack_grid(unit.plan)
        if grid is None:
            log.info("stack %s: no slice geometry to place segmentations on", unit.plan.label)
        found = segment_masks(grid, {n: self.wanted[n] for n in names}, self.segments)
        for name, (_, segment) in found.items():
            self.read.add(segment.sop_instance_uid)
            said = f"segment {segment.label!r} of {segment.kind} {segment.sop_instance_uid}"
            if said not in self.used.setdefault(name, []):
                self.used[name].append(said)
        return {name: mask for name, (mask, _) in found.items()}

    def mark(self, findings: SeriesFindings) -> None:
        """Record on ``findings`` what was wanted and read, and on each head's finding the
        segment it read its mask from."""
        findings.segment_heads = sorted(self.wanted)
        findings.segmentations_read = sorted(self.read)
        findings.findings = [
            dataclasses.replace(f, mask_from="; ".join(self.used[f.head_name]))
            if f.head_name in self.used
            else f
            for f in findings.findings
        ]
