"""Which segment of which Segmentation each mask head's SR group references.

A mask head's group in the SR is a TID 1411 group whose region is the segment of the
DICOM Segmentation that head produced (``ReferencedSegment``), so a viewer can go from the
text to the overlay. The segment is found by the algorithm that made it, named exactly as
the SR names it (:mod:`pipelines.reporting.provenance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from pipelines.findings import SEGMENTATION_TASK, SeriesFindings
from pipelines.reporting.content import ReportError, is_uid
from pipelines.reporting.provenance import algorithm_name, algorithm_version

__all__ = ["SegmentRef", "referenced_segments"]

# Segmentation (BINARY/FRACTIONAL) and Label Map Segmentation storage.
_SEGMENTATION_SOP_CLASSES = frozenset({SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7"})


@dataclass(frozen=True)
class SegmentRef:
    """A segment a mask head produced, as its SR group references it."""

    reference: hd.sr.ReferencedSegment
    tracking_uid: str | None


def _segment_algorithm(segment: Dataset) -> tuple[str, str]:
    """(name, version) of the algorithm that made one SegmentSequence item."""
    name = str(segment.get("SegmentAlgorithmName", "") or "")
    identification = segment.get("SegmentationAlgorithmIdentificationSequence") or []
    version = str(identification[0].get("AlgorithmVersion", "") or "") if identification else ""
    return name, version


def referenced_segments(
    segmentations: Sequence[Dataset], findings: SeriesFindings, study_uid: str
) -> dict[tuple[str, str], SegmentRef]:
    """The segment each mask head produced, by (head name, stack), found by its algorithm.

    A segment is matched on the name and version of the algorithm that made it (backbone
    + head, exactly as the SR names it) within a Segmentation of this study that
    references this series. A mask head that read several stacks of the series made one
    Segmentation per stack: they pair with its findings in order (the pipeline writes
    both in the order of the stacks). Everything must pair up: a mask head without its
    segment, a segment more than its findings, or a Segmentation no finding reports is
    refused, since any of them means the SR and the SEG would disagree.
    """
    wanted: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for f in findings.findings:
        if f.task == SEGMENTATION_TASK:
            algorithm = (
                algorithm_name(findings.model, f.head_name),
                algorithm_version(findings.model, f.head_version),
            )
            wanted.setdefault(algorithm, []).append((f.head_name, f.stack))
    found: dict[tuple[str, str], SegmentRef] = {}
    for i, seg in enumerate(segmentations):
        uid = str(seg.get("SOPInstanceUID", "") or "")
        if str(seg.get("SOPClassUID", "")) not in _SEGMENTATION_SOP_CLASSES or not uid:
            raise ReportError(f"segmentation #{i} is not a DICOM Segmentation instance")
        if str(seg.get("StudyInstanceUID", "")) != study_uid:
            raise ReportError(f"segmentation {uid} belongs to another study than the sources")
        if "SeriesInstanceUID" not in seg:
            raise ReportError(f"segmentation {uid} has no SeriesInstanceUID")
        series = {
            str(item.get("SeriesInstanceUID", ""))
            for item in seg.get("ReferencedSeriesSequence") or []
        }
        if findings.series_instance_uid not in series:
            raise ReportError(
                f"segmentation {uid} does not reference series {findings.series_instance_uid}"
            )
        used = False
        for segment in seg.get("SegmentSequence") or []:
            keys = wanted.get(_segment_algorithm(segment))
            if keys is None:
                continue
            head = next((key for key in keys if key not in found), None)
            if head is None:
                raise ReportError(f'head "{keys[0][0]}" has more segments than findings')
            tracking_uid = str(segment.get("TrackingUID", "") or "")
            found[head] = SegmentRef(
                reference=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=uid,
                    segment_number=int(segment.SegmentNumber),
                    source_series=hd.sr.SourceSeriesForSegmentation(findings.series_instance_uid),
                ),
                tracking_uid=tracking_uid if is_uid(tracking_uid) else None,
            )
            used = True
        if not used:
            raise ReportError(
                f"segmentation {uid} has no segment made by a reported mask head "
                f"(looked for algorithms {sorted(name for name, _ in wanted)})"
            )
    missing = sorted(
        {head for keys in wanted.values() for head, _ in keys if (head, _) not in found}
    )
    if missing:
        raise ReportError(
            f"mask head(s) {missing} have no segment among the given segmentations: pass "
            "the Segmentation each of them produced"
        )
    return found
