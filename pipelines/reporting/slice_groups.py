"""Per-slice findings of a per-slice head: one TID 1501 group on each slice that scored.

A ``slice`` head scores every slice and reports the aggregated value in its series group
(with the aggregation named in the algorithm parameters). Where the finding was seen is in
the per-slice scores: each slice whose score for the reported class reaches
:data:`SLICE_THRESHOLD` gets a measurement group of its own, on that slice (its source image
and an outline of the slice labelled with the score), so a viewer lists each slice as a
measurement and jumps to it; OHIF draws a group only when it has a 2D SCOORD on an image.
The best :data:`MAX_SLICE_GROUPS` slices are kept, so a finding seen on 200 slices does not
flood the report; the full score list stays with the run's findings.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.findings import CLASSIFICATION_TASK, HeadFinding, SeriesFindings
from pipelines.reporting.content import LO_MAX, ReportError, concept
from pipelines.reporting.measurement_groups import (
    _frames,
    _label_concept,
    outlined_box,
    placeholders,
)
from pipelines.reporting.provenance import DeviceIdentity, algorithm_identification
from pipelines.reporting.templates import ReportTemplate
from pipelines.reporting.uids import new_uid

#: A slice gets its own group when its score for the reported class is at least this.
SLICE_THRESHOLD = 0.5
#: At most this many slices per head get a group (the best-scoring ones).
MAX_SLICE_GROUPS = 20


def reported_slices(findings: SeriesFindings, finding: HeadFinding) -> list[tuple[int, float]]:
    """(slice index in the sorted series, score) of the slices that get a group, best first."""
    if finding.task != CLASSIFICATION_TASK or finding.slice_class is None:
        return []
    slices = findings.slices_of(finding.stack)
    if len(finding.slice_scores) != len(slices):
        raise ReportError(
            f'head "{finding.head_name}": {len(finding.slice_scores)} per-slice scores for '
            f"{len(slices)} slices"
        )
    scored = [(slices[i], s) for i, s in enumerate(finding.slice_scores) if s >= SLICE_THRESHOLD]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:MAX_SLICE_GROUPS]


def _whole_slice(
    ds: Dataset, findings: SeriesFindings, index: int
) -> hd.sr.CoordinatesForMeasurement:
    return outlined_box(ds, findings, index, (0, 0, int(ds.Rows), int(ds.Columns)))


def slice_groups(
    findings: SeriesFindings,
    finding: HeadFinding,
    template: ReportTemplate,
    device: DeviceIdentity,
    by_uid: Mapping[str, Dataset],
    demo: bool,
    uid_key: str | None = None,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per slice where a per-slice head saw its finding (none for other heads).

    Each is tracked as "<tracking identifier> - slice <n>" (n counts from 1 in the stack
    the head read), on its source image, with one measurement: the slice's score for the
    reported class, in %, inferred from an outline of the slice.
    """
    chosen = reported_slices(findings, finding)
    if not chosen:
        return []
    assert finding.slice_class is not None
    meaning = placeholders(finding, template, finding.slice_class)["predicted_meaning"]
    first = findings.slices_of(finding.stack).start
    on_stack = f" {finding.stack}" if finding.stack else ""
    groups = []
    for index, score in chosen:
        ds = by_uid.get(findings.sop_instance_uids_sorted[index])
        if ds is None:
            raise ReportError(f'head "{finding.head_name}": slice {index} is not a source')
        number = index - first + 1
        label = f"{meaning} probability, slice {number}"
        label = (f"DEMO {label}" if demo else label)[:LO_MAX]
        region = _whole_slice(ds, findings, index)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=new_uid(uid_key, f"SR tracking {finding.head_name}{on_stack} {number}"),
                    identifier=f"{template.tracking_identifier}{on_stack} - slice {number}",
                ),
                finding_type=concept(template.finding_type),
                algorithm_id=algorithm_identification(findings.model, finding, device),
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup.from_source_image(
                        ds, referenced_frame_numbers=_frames(findings, index)
                    )
                ],
                measurements=[
                    hd.sr.Measurement(
                        name=_label_concept(label),
                        value=round(score * 100, 2),
                        unit=codes.UCUM.Percent,
                        referenced_coordinates=[region],
                    )
                ],
            )
        )
    return groups
