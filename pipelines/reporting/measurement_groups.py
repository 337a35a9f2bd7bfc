"""One measurement group per head: TID 1501 for a series-level head, TID 1411 for a mask head.

Everything head-specific comes from the head's SR template
(:mod:`pipelines.reporting.templates`): which codes state its conclusion, which
probabilities or value it reports, how its key region is labelled. A TID 1501 group is
drawn on its key slice (an outline with a labelled measurement), which is what image
viewers show; a TID 1411 group's region is the segment its mask head produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.findings import REGRESSION_TASK, CodeRef, HeadFinding, SeriesFindings
from pipelines.reporting.content import LO_MAX, ReportError, concept
from pipelines.reporting.provenance import DeviceIdentity, algorithm_identification
from pipelines.reporting.segments import SegmentRef
from pipelines.reporting.templates import ReportTemplate
from pipelines.reporting.uids import new_uid

__all__ = ["LABEL_SCHEME", "check_finding", "measurement_group", "placeholders"]

#: Private coding scheme of the labels viewers draw next to a finding's region.
LABEL_SCHEME = "99CURIA"


def _class_code(finding: HeadFinding, index: int, template: ReportTemplate) -> CodeRef:
    """A class's code: the head card's, else the template's mapping, else refuse.

    Only classes the report states as codes are resolved, so a binary head reported as
    presence + probability needs no codes for its classes.
    """
    cls = finding.classes[index]
    if cls.code is not None:
        return cls.code
    if cls.name in template.class_codes:
        return template.class_codes[cls.name].to_ref()
    raise ReportError(
        f'head "{finding.head_name}" class "{cls.name}" has no code: add one to the '
        f"head card or to class_codes in {template.source or 'its SR template'}"
    )


def check_finding(finding: HeadFinding) -> None:
    """Refuse a finding whose numbers cannot be reported as they stand."""
    n = len(finding.classes)
    if n == 0 or len(finding.probabilities) != n:
        raise ReportError(
            f'head "{finding.head_name}": {len(finding.probabilities)} probabilities for '
            f"{n} classes"
        )
    if not 0 <= finding.predicted_index < n:
        raise ReportError(
            f'head "{finding.head_name}": predicted_index {finding.predicted_index} out of range'
        )
    # A regression head's one output is a raw value, not a probability.
    if finding.task != REGRESSION_TASK and any(not 0.0 <= p <= 1.0 for p in finding.probabilities):
        raise ReportError(f'head "{finding.head_name}": probabilities outside 0..1')


def _key_dataset(
    findings: SeriesFindings, finding: HeadFinding, by_uid: Mapping[str, Dataset]
) -> Dataset | None:
    """The source instance of the head's key slice, None when it names none."""
    if finding.key_slice is None:
        return None
    uids = findings.sop_instance_uids_sorted
    if not 0 <= finding.key_slice < len(uids):
        raise ReportError(
            f'head "{finding.head_name}": key_slice {finding.key_slice} outside the '
            f"{len(uids)} sorted instances"
        )
    ds = by_uid.get(uids[finding.key_slice])
    if ds is None:
        raise ReportError(
            f'head "{finding.head_name}": key slice {uids[finding.key_slice]} is not '
            "among the source instances"
        )
    return ds


def _frames(findings: SeriesFindings, index: int | None) -> list[int] | None:
    """The frame number to reference for slice ``index``: a multi-frame source's frame."""
    if index is None:
        return None
    frame = findings.frame_of(index)
    return [frame] if frame else None


def _key_image(
    findings: SeriesFindings, finding: HeadFinding, by_uid: Mapping[str, Dataset]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """Reference the head's key slice so a viewer can jump to it (its frame, when the
    source is multi-frame)."""
    ds = _key_dataset(findings, finding, by_uid)
    if ds is None:
        return None
    return [
        hd.sr.SourceImageForMeasurementGroup.from_source_image(
            ds, referenced_frame_numbers=_frames(findings, finding.key_slice)
        )
    ]


def _label_concept(text: str) -> hd.sr.CodedConcept:
    """A concept of the node's private scheme whose meaning is a viewer label.

    Viewers label a drawn region with its measurement's concept name, so the name has to
    read as the finding ("Chest probability"); no standard code says that, hence a
    private scheme (declared in CodingSchemeIdentificationSequence). The code value is a
    digest of the text, so one label always has one code.
    """
    digest = hashlib.sha1(text.encode()).hexdigest()[:12].upper()
    return hd.sr.CodedConcept(value=f"L{digest}", scheme_designator=LABEL_SCHEME, meaning=text)


def _drawn_region(
    findings: SeriesFindings, finding: HeadFinding, by_uid: Mapping[str, Dataset]
) -> hd.sr.CoordinatesForMeasurement:
    """The outline viewers draw for a finding: its key region on its key slice.

    A finding without a key slice (a regression value, an empty mask) is outlined on the
    central slice of its stack as a whole, and so is one whose head keeps no spatial tokens:
    viewers such as OHIF refuse a report whose groups are not all on an image.
    """
    ds = _key_dataset(findings, finding, by_uid)
    index = finding.key_slice
    if ds is None:  # the central slice of the stack the head read
        uids = findings.sop_instance_uids_sorted
        slices = findings.slices_of(finding.stack)
        index = slices[len(slices) // 2] if slices else 0
        ds = by_uid.get(uids[index]) if uids else None
        if ds is None:
            raise ReportError(f'head "{finding.head_name}": no slice to draw the finding on')
    rows, columns = int(ds.Rows), int(ds.Columns)
    box = finding.key_region if finding.key_slice is not None else None
    r0, c0, r1, c1 = box or (0, 0, rows, columns)
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= columns):
        raise ReportError(
            f'head "{finding.head_name}": key region {finding.key_region} outside the '
            f"{rows} x {columns} key slice"
        )
    return outlined_box(ds, findings, index, (r0, c0, r1, c1))


def outlined_box(
    ds: Dataset, findings: SeriesFindings, index: int | None, box: tuple[int, int, int, int]
) -> hd.sr.CoordinatesForMeasurement:
    """A rectangle (rows r0..r1, columns c0..c1) drawn on slice ``index`` of the series."""
    r0, c0, r1, c1 = box
    # (column, row) pairs; (0, 0) is the top-left corner of the top-left pixel
    outline = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            ds, referenced_frame_numbers=_frames(findings, index)
        ),
    )


def _drawn_label(
    finding: HeadFinding,
    template: ReportTemplate,
    demo: bool,
    region: hd.sr.CoordinatesForMeasurement,
) -> hd.sr.Measurement:
    """The NUM viewers write next to the outline: "<label>: <probability> %"."""
    spec = template.key_region
    names = [c.name for c in finding.classes]
    index = finding.predicted_index
    # a presence head's label is about its positive class, whatever the prediction
    wanted = spec.class_name or (template.presence.positive_class if template.presence else None)
    if wanted is not None:
        if wanted not in names:
            raise ReportError(
                f'head "{finding.head_name}" has no class "{wanted}" '
                f"(key_region.class_name in {template.source}); classes: {names}"
            )
        index = names.index(wanted)
    label = spec.label.format(**placeholders(finding, template, index))
    label = (f"DEMO {label}" if demo else label)[:LO_MAX]
    return hd.sr.Measurement(
        name=_label_concept(label),
        value=round(float(finding.probabilities[index]) * 100, 2),
        unit=codes.UCUM.Percent,
        referenced_coordinates=[region],
    )


def measurement_group(
    findings: SeriesFindings,
    finding: HeadFinding,
    template: ReportTemplate,
    device: DeviceIdentity,
    by_uid: Mapping[str, Dataset],
    demo: bool,
    segment: SegmentRef | None = None,
    uid_key: str | None = None,
) -> (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
):
    """One group for one head, laid out as its template says.

    TID 1501 for a head that concludes about the whole series (pointing at its key
    slice); TID 1411 for a mask head, whose region is the referenced segment. In a TID
    1501 group one measurement is inferred from an outline on the key slice (TID 300 row
    "INFERRED FROM" a 2D SCOORD), which is what image viewers draw: a labelled
    probability for a classifier, the value itself for a regression head. ``uid_key`` is
    the SR's (see :func:`pipelines.reporting.document.build_sr`).
    """
    # a mask head's region is its segment, and TID 1411 measurements take no coordinates
    region = _drawn_region(findings, finding, by_uid) if segment is None else None
    sites: list[CodeRef] = [c.to_ref() for c in template.finding_sites]
    if template.predicted_class.as_finding_site:
        predicted_code = _class_code(finding, finding.predicted_index, template)
        if predicted_code not in sites:
            sites.append(predicted_code)

    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if template.predicted_class.evaluation_concept is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=concept(template.predicted_class.evaluation_concept),
                value=concept(_class_code(finding, finding.predicted_index, template)),
            )
        )
    if template.presence is not None:
        spec = template.presence
        names = [c.name for c in finding.classes]
        if spec.positive_class not in names:
            raise ReportError(
                f'head "{finding.head_name}" has no class "{spec.positive_class}" '
                f"(presence.positive_class in {template.source}); classes: {names}"
            )
        p_positive = finding.probabilities[names.index(spec.positive_class)]
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=concept(spec.concept or template.finding_type),
                value=concept(spec.present if p_positive >= spec.threshold else spec.absent),
            )
        )

    measurements: list[hd.sr.Measurement] = []
    if region is not None and finding.task != REGRESSION_TASK:
        # first: viewers show the first few labels of a group only
        measurements.append(_drawn_label(finding, template, demo, region))
    if template.probability is not None:
        spec_p = template.probability
        names = [c.name for c in finding.classes]
        if spec_p.classes == "all":
            indices = list(range(len(names)))
        elif spec_p.classes == "predicted":
            indices = [finding.predicted_index]
        else:
            missing = [n for n in spec_p.classes if n not in names]
            if missing:
                raise ReportError(
                    f'head "{finding.head_name}" has no class(es) {missing} '
                    f"(probability.classes in {template.source}); classes: {names}"
                )
            indices = [names.index(n) for n in spec_p.classes]
        for i in indices:
            qualifier = (
                [hd.sr.FindingSite(anatomic_location=concept(_class_code(finding, i, template)))]
                if spec_p.qualify_with_finding_site
                else None
            )
            measurements.append(
                hd.sr.Measurement(
                    name=concept(spec_p.concept),
                    # Rounded so that the DS value string stays short and exact.
                    value=round(float(finding.probabilities[i]) * spec_p.scale, 6),
                    unit=concept(spec_p.unit),
                    finding_sites=qualifier,
                )
            )

    if template.value is not None:
        if finding.task != REGRESSION_TASK:
            raise ReportError(
                f'head "{finding.head_name}" is a {finding.task} head; "value" in '
                f"{template.source} is for regression heads"
            )
        measurements.append(
            hd.sr.Measurement(
                name=concept(template.value.concept),
                value=round(float(finding.probabilities[0]), 6),
                unit=concept(template.value.unit),
                referenced_coordinates=[region] if region is not None else None,
            )
        )

    # A segment's tracking UID, where it has one, so that the SR group and the SEG segment
    # are recognisably the same finding; else one of its own (derived from the SR's key,
    # when it has one, so that a rewritten SR tracks the same finding).
    # A head run on several stacks of the series has a group, and a tracking UID, per stack.
    on_stack = f" {finding.stack}" if finding.stack else ""
    tracking_uid = (segment.tracking_uid if segment is not None else None) or new_uid(
        uid_key, f"SR tracking {finding.head_name}{on_stack}"
    )
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid,
            identifier=f"{template.tracking_identifier}{' -' + on_stack if on_stack else ''}",
        ),
        "finding_type": concept(template.finding_type),
        "algorithm_id": algorithm_identification(findings.model, finding, device),
        "finding_sites": [hd.sr.FindingSite(anatomic_location=concept(s)) for s in sites] or None,
        "measurements": measurements or None,
        "qualitative_evaluations": evaluations or None,
    }
    if segment is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment.reference, **common
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=_key_image(findings, finding, by_uid), **common
    )


def placeholders(
    finding: HeadFinding, template: ReportTemplate, index: int | None = None
) -> dict[str, Any]:
    """Values for the template patterns (summary, key region label).

    ``index`` names the class the pattern speaks of (default: the predicted class).
    """
    index = finding.predicted_index if index is None else index
    chosen = finding.classes[index]
    meaning = chosen.code.meaning if chosen.code is not None else chosen.name
    if chosen.code is None and chosen.name in template.class_codes:
        meaning = template.class_codes[chosen.name].meaning
    return {
        "head": finding.head_name,
        "task": finding.task,
        "predicted": chosen.name,
        "predicted_meaning": meaning,
        "probability": float(finding.probabilities[index]),
    }
