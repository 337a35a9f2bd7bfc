"""Turn a series' head findings into a DICOM Comprehensive 3D SR (TID 1500).

The SR is what a radiologist sees in the viewer, so it must be attached to the right
patient and study, traceable to the exact model and node that made it, and honest
about demo weights. Everything head-specific comes from the SR templates
(``pipelines.reporting.templates``); this module only knows the document structure.

A mask head's group references the segment of the DICOM Segmentation it produced
(TID 1411 with ``ReferencedSegment``), so a viewer can go from the text to the overlay.
The helpers that a Segmentation shares with the SR (source preparation, algorithm
naming, equipment, demo wording) are public here so both objects say the same thing.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from pipelines.findings import CodeRef, HeadFinding, ModelIdentity, SeriesFindings
from pipelines.reporting.templates import CodeSpec, ReportTemplate

__all__ = [
    "DEMO_STATEMENT",
    "REGRESSION_TASK",
    "SEGMENTATION_TASK",
    "DeviceIdentity",
    "ReportError",
    "algorithm_name",
    "algorithm_parameters",
    "algorithm_version",
    "build_sr",
    "ihe_air_equipment",
    "prepare_sources",
    "result_series_description",
    "split_findings",
    "write_sr",
]

#: ``HeadFinding.task`` of a head that produced a mask: its SR group references the
#: segment of the Segmentation made from that mask instead of standing alone.
SEGMENTATION_TASK = "segmentation"
CLASSIFICATION_TASK = "classification"
REGRESSION_TASK = "regression"

#: Private coding scheme of the labels viewers draw next to a finding's region.
LABEL_SCHEME = "99CURIA"

# Shown in the SR whenever demo weights made the result (see _document_notes for where).
DEMO_STATEMENT = (
    "DEMO RESULT - NOT A DIAGNOSIS: produced with demo (random, untrained) model weights. "
    "Not for clinical use."
)
_DEMO_SERIES_SUFFIX = " - DEMO, NOT FOR DIAGNOSIS"

# Codes fixed by the document structure itself (not by a head), defined once here.
# pydicom's code dictionary has no entry for either.
# TID 1500 row 12 container for document-level qualitative evaluations.
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
# IHE AI Results (AIR) purpose of reference of the processing algorithm's equipment.
_IHE_PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

# Procedure reported (CID 100) by source modality; the SR describes the imaging
# procedure that was analysed, not the algorithm.
_PROCEDURE_BY_MODALITY: Mapping[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}

# Type 2 attributes highdicom copies from the first source: a source may lack them, and
# highdicom then fails; they must exist (empty) on the copy it gets.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_LO_MAX = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (checked without pydicom's warning on bad input)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


class ReportError(ValueError):
    """Findings, sources and templates that cannot make a correct SR together."""


@dataclass(frozen=True, kw_only=True)
class DeviceIdentity:
    """The node as the equipment that made the SR (observer device, equipment, AIR).

    Keyword-only so that the several string fields cannot be swapped by position.
    """

    manufacturer: str = "Curia Node"
    model_name: str
    software_version: str
    device_uid: str
    device_name: str
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version", "device_name"):
            value = getattr(self, name)
            if not value or len(value) > _LO_MAX or "\\" in value:
                raise ValueError(
                    f'DeviceIdentity "{name}" must be 1-{_LO_MAX} characters without '
                    f"backslash, got {value!r}"
                )
        if self.institution_name is not None and len(self.institution_name) > _LO_MAX:
            raise ValueError(f'DeviceIdentity "institution_name" longer than {_LO_MAX}')
        if not _is_uid(self.device_uid):
            raise ValueError(f'DeviceIdentity "device_uid" is not a valid UID: {self.device_uid!r}')


def _concept(code: CodeRef | CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def prepare_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources as highdicom can use them, checked, never touching the originals.

    The caller's datasets are often cached or about to be stored: mutating them would
    change what the archive receives. highdicom copies patient and study attributes
    from the first instance only and needs its type 2 ones present (empty is fine), so
    only that instance is copied and completed; the others are passed on as they are,
    since highdicom only reads them (copying hundreds of headers used to cost more than
    building the rest of the document).
    """
    if not sources:
        raise ReportError("no source instances given: a result must reference what it describes")
    for i, ds in enumerate(sources):
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                raise ReportError(f"source #{i} has no {keyword}; it cannot be referenced")
    first = copy.deepcopy(sources[0])
    for keyword in _TYPE2_COPIED:
        if keyword not in first:
            setattr(first, keyword, None)
    prepared = [first, *sources[1:]]
    studies = {str(ds.StudyInstanceUID) for ds in prepared}
    if len(studies) != 1:
        raise ReportError(f"sources span several studies {sorted(studies)}; one SR per study")
    patients = {str(ds.PatientID or "") for ds in prepared}
    if len(patients) != 1:
        raise ReportError(f"sources carry several PatientIDs {sorted(patients)}")
    return prepared


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


def _check_finding(finding: HeadFinding) -> None:
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


def algorithm_name(model: ModelIdentity, head_name: str) -> str:
    """Backbone and head, as every SR group and SEG segment names its algorithm.

    One spelling everywhere is what lets an SR find the segment a head produced.
    """
    return f"{model.name} + {head_name}"


def algorithm_version(model: ModelIdentity, head_version: str) -> str:
    """Backbone and head versions, in the same order as :func:`algorithm_name`."""
    return f"{model.version} / {head_version}"


def algorithm_parameters(model: ModelIdentity, demo: bool) -> list[str]:
    """Free-text parameters that pin the exact weights and flag demo ones."""
    parameters: list[str] = []
    if model.weights_digest:
        parameters.append(f"backbone weights digest: {model.weights_digest}")
    if model.demo or demo:
        parameters.append("weights: demo (random, untrained); not for diagnosis")
    return parameters


def _algorithm(
    findings: SeriesFindings, finding: HeadFinding, device: DeviceIdentity
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 naming backbone and head, so a result traces to the exact weights."""
    parameters = algorithm_parameters(findings.model, finding.demo)
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(findings.model, finding.head_name),
        version=algorithm_version(findings.model, finding.head_version),
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=device.manufacturer,
        parameters=parameters or None,
    )


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


def _key_image(
    findings: SeriesFindings, finding: HeadFinding, by_uid: Mapping[str, Dataset]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """Reference the head's key slice so a viewer can jump to it."""
    ds = _key_dataset(findings, finding, by_uid)
    if ds is None:
        return None
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)]


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
    series' central slice as a whole, and so is one whose head keeps no spatial tokens:
    viewers such as OHIF refuse a report whose groups are not all on an image.
    """
    ds = _key_dataset(findings, finding, by_uid)
    if ds is None:
        uids = findings.sop_instance_uids_sorted
        ds = by_uid.get(uids[len(uids) // 2]) if uids else None
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
    # (column, row) pairs; (0, 0) is the top-left corner of the top-left pixel
    outline = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
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
    label = spec.label.format(**_placeholders(finding, template, index))
    label = (f"DEMO {label}" if demo else label)[:_LO_MAX]
    return hd.sr.Measurement(
        name=_label_concept(label),
        value=round(float(finding.probabilities[index]) * 100, 2),
        unit=codes.UCUM.Percent,
        referenced_coordinates=[region],
    )


def _measurement_group(
    findings: SeriesFindings,
    finding: HeadFinding,
    template: ReportTemplate,
    device: DeviceIdentity,
    by_uid: Mapping[str, Dataset],
    demo: bool,
    segment: _SegmentRef | None = None,
) -> (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
):
    """One group for one head, laid out as its template says.

    TID 1501 for a head that concludes about the whole series (pointing at its key
    slice); TID 1411 for a mask head, whose region is the referenced segment. In a TID
    1501 group one measurement is inferred from an outline on the key slice (TID 300 row
    "INFERRED FROM" a 2D SCOORD), which is what image viewers draw: a labelled
    probability for a classifier, the value itself for a regression head.
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
                name=_concept(template.predicted_class.evaluation_concept),
                value=_concept(_class_code(finding, finding.predicted_index, template)),
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
                name=_concept(spec.concept or template.finding_type),
                value=_concept(spec.present if p_positive >= spec.threshold else spec.absent),
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
                [hd.sr.FindingSite(anatomic_location=_concept(_class_code(finding, i, template)))]
                if spec_p.qualify_with_finding_site
                else None
            )
            measurements.append(
                hd.sr.Measurement(
                    name=_concept(spec_p.concept),
                    # Rounded so that the DS value string stays short and exact.
                    value=round(float(finding.probabilities[i]) * spec_p.scale, 6),
                    unit=_concept(spec_p.unit),
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
                name=_concept(template.value.concept),
                value=round(float(finding.probabilities[0]), 6),
                unit=_concept(template.value.unit),
                referenced_coordinates=[region] if region is not None else None,
            )
        )

    # A segment's tracking UID, where it has one, so that the SR group and the SEG segment
    # are recognisably the same finding.
    tracking_uid = (segment.tracking_uid if segment is not None else None) or generate_uid()
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=template.tracking_identifier
        ),
        "finding_type": _concept(template.finding_type),
        "algorithm_id": _algorithm(findings, finding, device),
        "finding_sites": [hd.sr.FindingSite(anatomic_location=_concept(s)) for s in sites] or None,
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


def _placeholders(
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


def _summary(finding: HeadFinding, template: ReportTemplate) -> str | None:
    if template.summary is None:
        return None
    return template.summary.pattern.format(**_placeholders(finding, template))


def _document_notes(
    findings: SeriesFindings,
    templates: Mapping[str, ReportTemplate],
    demo: bool,
    supersedes_uid: str | None,
) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12 "Qualitative Evaluations" container with the free-text notes.

    Placement of the demo statement: a TEXT (121106, DCM, "Comment") in this
    document-level container (TID 1500 rows 12 + 14, "TEXT, any concept"). It sits
    directly under the report root, where dsr2html and text viewers show it first,
    and dciodvfy, dsrdump and PixelMed's DicomSRValidator (-checktemplateid
    -checkcontentitemorder) all accept it with no error and no warning. The same TEXT
    inside the TID 1501 group also passes, but PixelMed then warns "Content Item not in
    template". The per-head summaries (template pattern) go in the same container; the
    demo flag is repeated in each group's Algorithm Parameters (TID 4019) and in the
    SeriesDescription.
    """
    items: list[hd.sr.TextContentItem] = []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    if demo:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=DEMO_STATEMENT, relationship_type=contains
            )
        )
    for finding in findings.findings:
        template = templates[finding.head_name]
        text = _summary(finding, template)
        if text is not None and template.summary is not None:
            items.append(
                hd.sr.TextContentItem(
                    name=_concept(template.summary.concept), value=text, relationship_type=contains
                )
            )
    if supersedes_uid is not None:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=f"Supersedes the earlier result SR with SOP Instance UID {supersedes_uid}.",
                relationship_type=contains,
            )
        )
    if not items:
        return None
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=contains
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


# --- TID 1600 Image Library ----------------------------------------------------------------

_ACQ_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


@dataclass(frozen=True)
class _Descriptor:
    """One TID 1602/1603/1604 row: its concept (and unit, for NUM), built once.

    A CodedConcept is validated on construction, and a library needs thousands of them.
    """

    concept: hd.sr.CodedConcept
    key: str  # the concept's code value, so cache keys need no highdicom property access
    unit: hd.sr.CodedConcept | None = None


def _descriptor(code: Code, unit: hd.sr.CodedConcept | None = None) -> _Descriptor:
    return _Descriptor(concept=hd.sr.CodedConcept.from_code(code), key=code.value, unit=unit)


# Units exactly as highdicom writes them in its Image Library.
_PIXELS = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
_COSINE = hd.sr.CodedConcept(value="{-1:1}", scheme_designator="UCUM", meaning="{-1:1}")
_MM = hd.sr.CodedConcept.from_code(codes.UCUM.Millimeter)
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")
_MODALITY = _descriptor(codes.DCM.Modality)
_FRAME_OF_REFERENCE = _descriptor(codes.DCM.FrameOfReferenceUID)
_ROWS = _descriptor(codes.DCM.PixelDataRows, _PIXELS)
_COLUMNS = _descriptor(codes.DCM.PixelDataColumns, _PIXELS)
_HORIZONTAL_SPACING = _descriptor(codes.DCM.HorizontalPixelSpacing, _MM)
_VERTICAL_SPACING = _descriptor(codes.DCM.VerticalPixelSpacing, _MM)
_SPACING_BETWEEN_SLICES = _descriptor(codes.DCM.SpacingBetweenSlices, _MM)
_SLICE_THICKNESS = _descriptor(codes.DCM.SliceThickness, _MM)
_ORIENTATION_ROW = _descriptor(codes.DCM.PatientOrientationRow)
_ORIENTATION_COLUMN = _descriptor(codes.DCM.PatientOrientationColumn)
_POSITION = tuple(
    _descriptor(c, _MM)
    for c in (
        codes.DCM.ImagePositionPatientX,
        codes.DCM.ImagePositionPatientY,
        codes.DCM.ImagePositionPatientZ,
    )
)
_ORIENTATION = tuple(
    _descriptor(c, _COSINE)
    for c in (
        codes.DCM.ImageOrientationPatientRowX,
        codes.DCM.ImageOrientationPatientRowY,
        codes.DCM.ImageOrientationPatientRowZ,
        codes.DCM.ImageOrientationPatientColumnX,
        codes.DCM.ImageOrientationPatientColumnY,
        codes.DCM.ImageOrientationPatientColumnZ,
    )
)
# Which descriptor template (TID 1604 or 1603) applies, by Modality, as in highdicom.
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _coded_modalities() -> dict[str, Code]:
    """Modality codes (CID 29 acquisition, else CID 32 other) by their Modality value."""
    coded: dict[str, Code] = {}
    for cid in (codes.cid32, codes.cid29):  # CID 29 wins where both define a value
        for name in cid.dir():
            code = getattr(cid, name)
            coded[code.value] = code
    return coded


_CODED_MODALITIES = _coded_modalities()


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` numbers from a DS/IS attribute value, or None if absent or malformed."""
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


class _DescriptorItems:
    """Descriptor content items, each distinct (row, value) built once and then shared.

    Within a series nearly every descriptor is the same on every slice (modality, frame
    of reference, matrix, spacing, thickness, orientation) and only the position
    changes; building each distinct item once, with highdicom's own content item classes
    (so the encoding is highdicom's), and sharing it is what keeps a 300-slice library
    cheap. Items are never changed after they are built.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], hd.sr.ContentItem] = {}

    def num(self, row: _Descriptor, value: int | float) -> hd.sr.ContentItem:
        # Integers (the matrix size) carry no float value, as highdicom writes them.
        key = (row.key, isinstance(value, int), float(value).hex())
        item = self._items.get(key)
        if item is None:
            if row.unit is None:
                raise TypeError(f"descriptor {row.key} has no unit: it is not a NUM row")
            item = hd.sr.NumContentItem(
                name=row.concept, value=value, unit=row.unit, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def text(self, row: _Descriptor, value: str) -> hd.sr.ContentItem:
        key = (row.key, value)
        item = self._items.get(key)
        if item is None:
            item = hd.sr.TextContentItem(
                name=row.concept, value=value, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def uid(self, row: _Descriptor, value: str) -> hd.sr.ContentItem:
        key = (row.key, value)
        item = self._items.get(key)
        if item is None:
            item = hd.sr.UIDRefContentItem(
                name=row.concept, value=value, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def modality(self, index: int, modality: str) -> hd.sr.ContentItem:
        key = (_MODALITY.key, modality)
        item = self._items.get(key)
        if item is None:
            code = _CODED_MODALITIES.get(modality)
            if code is None:
                raise ReportError(
                    f"source #{index} has Modality {modality!r}, which has no code in "
                    "CID 29/32: its Image Library entry cannot state it"
                )
            item = hd.sr.CodeContentItem(
                name=_MODALITY.concept, value=code, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def for_source(self, index: int, ds: Dataset) -> list[hd.sr.ContentItem]:
        """TID 1602 rows for one source, then TID 1604 or 1603, in template order.

        Rows whose attribute is absent are left out (all are optional in the templates).
        """
        if "Rows" not in ds or "Columns" not in ds:
            raise ReportError(f"source #{index} has no Rows/Columns: it is not an image")
        modality = str(ds.get("Modality", "") or "")
        items = [self.modality(index, modality)]
        frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")
        if frame_of_reference:
            items.append(self.uid(_FRAME_OF_REFERENCE, frame_of_reference))
        items.append(self.num(_ROWS, int(ds.Rows)))
        items.append(self.num(_COLUMNS, int(ds.Columns)))
        if modality in _CROSS_SECTIONAL:
            items += self._cross_sectional(ds)
        elif modality in _PROJECTION:
            items += self._projection(ds)
        return items

    def _cross_sectional(self, ds: Dataset) -> list[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        spacing = _numbers(ds.get("PixelSpacing"), 2)
        if spacing is not None:
            items.append(self.num(_HORIZONTAL_SPACING, spacing[1]))
            items.append(self.num(_VERTICAL_SPACING, spacing[0]))
        for row, keyword in (
            (_SPACING_BETWEEN_SLICES, "SpacingBetweenSlices"),
            (_SLICE_THICKNESS, "SliceThickness"),
        ):
            value = _numbers(ds.get(keyword), 1)
            if value is not None:
                items.append(self.num(row, value[0]))
        position = _numbers(ds.get("ImagePositionPatient"), 3)
        if position is not None:
            items += [self.num(r, v) for r, v in zip(_POSITION, position, strict=True)]
        orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
        if orientation is not None:
            items += [self.num(r, v) for r, v in zip(_ORIENTATION, orientation, strict=True)]
        return items

    def _projection(self, ds: Dataset) -> list[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        orientation = ds.get("PatientOrientation")
        if orientation is not None and len(orientation) == 2:
            items.append(self.text(_ORIENTATION_ROW, str(orientation[0])))
            items.append(self.text(_ORIENTATION_COLUMN, str(orientation[1])))
        spacing = _numbers(ds.get("ImagerPixelSpacing"), 2)
        if spacing is not None:
            items.append(self.num(_HORIZONTAL_SPACING, spacing[1]))
            items.append(self.num(_VERTICAL_SPACING, spacing[0]))
        return items


def _library_group(
    entries: list[tuple[Dataset, list[hd.sr.ContentItem]]],
) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library Group: shared descriptors once, then one entry per source.

    A descriptor every entry of the group has (modality, frame of reference, matrix,
    spacing, orientation...) is stated once for the group (TID 1600 row 3, which
    applies to all its entries); an entry keeps only what is its own (typically its
    position). Same information as a full TID 1602 per entry, a fraction of the size.
    """
    first = entries[0][1]
    others = [{id(item) for item in items} for _, items in entries[1:]]
    shared = [item for item in first if all(id(item) in ids for ids in others)]
    shared_ids = {id(item) for item in shared}
    content: list[hd.sr.ContentItem] = list(shared)
    for ds, items in entries:
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type=_CONTAINS,
        )
        own = [item for item in items if id(item) not in shared_ids]
        if own:
            image.ContentSequence = own
        content.append(image)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS
    )
    group.ContentSequence = content
    return group


def _image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: an entry for every source, one group per modality and frame of reference."""
    descriptors = _DescriptorItems()
    groups: dict[tuple[str, str], list[tuple[Dataset, list[hd.sr.ContentItem]]]] = {}
    for i, ds in enumerate(sources):
        key = (str(ds.get("Modality", "") or ""), str(ds.get("FrameOfReferenceUID", "") or ""))
        groups.setdefault(key, []).append((ds, descriptors.for_source(i, ds)))
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = [_library_group(entries) for entries in groups.values()]
    return library


def _attach_image_library(sr: hd.sr.Comprehensive3DSR, library: hd.sr.ContainerContentItem) -> None:
    """Put the library where TID 1500 has it (row 5, before Imaging Measurements).

    It is attached after highdicom has built the document, not passed in with the
    content: the SR constructor deep-copies and re-parses the whole content tree and
    searches it for references, which for a few hundred entries was most of an SR's
    build time. Nothing that check would catch is skipped: every library entry is a
    source, and every source is evidence. It goes into both the dataset and highdicom's
    parsed view of it (``sr.content``) so that the two agree.
    """
    for tree in (sr.ContentSequence, sr.content[0].ContentSequence):
        names = [item.name for item in tree]
        tree.insert(names.index(codes.DCM.ImagingMeasurements), library)


# --- referenced segments -------------------------------------------------------------------

# Segmentation (BINARY/FRACTIONAL) and Label Map Segmentation storage.
_SEGMENTATION_SOP_CLASSES = frozenset({SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7"})


@dataclass(frozen=True)
class _SegmentRef:
    """A segment a mask head produced, as its SR group references it."""

    reference: hd.sr.ReferencedSegment
    tracking_uid: str | None


def _segment_algorithm(segment: Dataset) -> tuple[str, str]:
    """(name, version) of the algorithm that made one SegmentSequence item."""
    name = str(segment.get("SegmentAlgorithmName", "") or "")
    identification = segment.get("SegmentationAlgorithmIdentificationSequence") or []
    version = str(identification[0].get("AlgorithmVersion", "") or "") if identification else ""
    return name, version


def _referenced_segments(
    segmentations: Sequence[Dataset], findings: SeriesFindings, study_uid: str
) -> dict[str, _SegmentRef]:
    """The segment each mask head produced, by head name, found by its algorithm identity.

    A segment is matched on the name and version of the algorithm that made it (backbone
    + head, exactly as the SR names it) within a Segmentation of this study that
    references this series. Everything must pair up: a mask head without its segment, a
    segment claimed twice, or a Segmentation no finding reports is refused, since any of
    them means the SR and the SEG would disagree.
    """
    wanted = {
        (
            algorithm_name(findings.model, f.head_name),
            algorithm_version(findings.model, f.head_version),
        ): f.head_name
        for f in findings.findings
        if f.task == SEGMENTATION_TASK
    }
    found: dict[str, _SegmentRef] = {}
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
            head = wanted.get(_segment_algorithm(segment))
            if head is None:
                continue
            if head in found:
                raise ReportError(f'head "{head}" has more than one segment to reference')
            tracking_uid = str(segment.get("TrackingUID", "") or "")
            found[head] = _SegmentRef(
                reference=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=uid,
                    segment_number=int(segment.SegmentNumber),
                    source_series=hd.sr.SourceSeriesForSegmentation(findings.series_instance_uid),
                ),
                tracking_uid=tracking_uid if _is_uid(tracking_uid) else None,
            )
            used = True
        if not used:
            raise ReportError(
                f"segmentation {uid} has no segment made by a reported mask head "
                f"(looked for algorithms {sorted(name for name, _ in wanted)})"
            )
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise ReportError(
            f"mask head(s) {missing} have no segment among the given segmentations: pass "
            "the Segmentation each of them produced"
        )
    return found


# --- the document --------------------------------------------------------------------------


def split_findings(findings: SeriesFindings) -> list[SeriesFindings]:
    """The findings as the SRs they go into: every head first, then mask heads.

    The first part holds every finding as a TID 1501 group drawn on its key slice, so one
    document shows all of them in viewers that draw SR coordinates (OHIF draws no group
    without any): there a mask head's finding reads like a classifier's (absent/present,
    outlined where its mask is largest). The second part, when there are mask heads,
    holds their TID 1411 groups referencing the segments: give it the Segmentations
    (``segmentations=``). Each part is a copy of ``findings``.
    """
    as_classes = [
        replace(f, task=CLASSIFICATION_TASK) if f.task == SEGMENTATION_TASK else f
        for f in findings.findings
    ]
    masks = [f for f in findings.findings if f.task == SEGMENTATION_TASK]
    return [replace(findings, findings=part) for part in (as_classes, masks) if part]


def result_series_description(base: str, demo: bool) -> str:
    """SeriesDescription (LO, 64 chars) that keeps the demo warning when it must cut."""
    if not demo:
        return base[:_LO_MAX]
    return base[: _LO_MAX - len(_DEMO_SERIES_SUFFIX)] + _DEMO_SERIES_SUFFIX


def ihe_air_equipment(
    device: DeviceIdentity,
    now: datetime.datetime,
    description: str = "AI classification results",
) -> Dataset:
    """IHE AIR ContributingEquipmentSequence item (highdicom refuses this purpose code)."""
    item = Dataset()
    item.Manufacturer = device.manufacturer
    if device.institution_name:
        item.InstitutionName = device.institution_name
    item.ManufacturerModelName = device.model_name
    item.SoftwareVersions = device.software_version
    item.DeviceUID = device.device_uid
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(_IHE_PROCESSING_ALGORITHM)]
    return item


def build_sr(
    sources: Sequence[Dataset],
    findings: SeriesFindings,
    templates: Mapping[str, ReportTemplate],
    device: DeviceIdentity,
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    series_description: str = "Curia AI results",
    supersedes: str | Dataset | None = None,
    segmentations: Sequence[Dataset] = (),
    series_instance_uid: str | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR for one analysed series.

    ``sources`` are the series' instances (read without pixels); they are never
    changed. ``supersedes`` is an earlier SR this one replaces: given as a dataset (its
    header is enough) it goes into PredecessorDocumentsSequence; given as a bare SOP
    Instance UID (its series is unknown, and that sequence needs it) it is named in a
    note in the content tree instead.

    ``segmentations`` are the DICOM Segmentations that the mask heads in ``findings``
    (task :data:`SEGMENTATION_TASK`) produced for this series (their headers are
    enough). Each such head's group is a TID 1411 group referencing its segment, and the
    Segmentations are recorded as evidence. Mask heads and series-level heads go into
    separate documents (see :func:`split_findings`); ``series_instance_uid`` lets the
    two share one results series (with different ``instance_number``).
    """
    if not findings.findings:
        raise ReportError(f"series {findings.series_instance_uid}: no findings to report")
    if len({f.task == SEGMENTATION_TASK for f in findings.findings}) > 1:
        raise ReportError(
            "mask heads and series-level heads in one SR: build one SR for each "
            "(split_findings splits them). The standard allows both kinds of group in one "
            "document, but PixelMed's validator applies TID 1411 to every group as soon "
            "as one references a segment, and reports the others as errors."
        )
    if series_instance_uid is not None and not _is_uid(series_instance_uid):
        raise ReportError(f"series_instance_uid is not a valid UID: {series_instance_uid!r}")
    prepared = prepare_sources(sources)
    if findings.series_instance_uid not in {str(ds.SeriesInstanceUID) for ds in prepared}:
        raise ReportError(
            f"findings are for series {findings.series_instance_uid}, which none of the "
            "sources belong to"
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in prepared}
    segments = _referenced_segments(segmentations, findings, str(prepared[0].StudyInstanceUID))

    demo = findings.model.demo or any(f.demo for f in findings.findings)
    groups = []
    for finding in findings.findings:
        template = templates.get(finding.head_name)
        if template is None:
            raise ReportError(
                f'no SR template for head "{finding.head_name}" '
                f"(templates for: {sorted(templates) or 'none'})"
            )
        _check_finding(finding)
        segment = segments.get(finding.head_name)
        groups.append(
            _measurement_group(findings, finding, template, device, by_uid, demo, segment)
        )

    modality = str(prepared[0].get("Modality", "") or "")
    procedure = _PROCEDURE_BY_MODALITY.get(modality, codes.cid100.ImagingProcedure)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.device_uid,
            name=device.device_name,
            manufacturer_name=device.manufacturer,
            model_name=device.model_name,
        ),
    )
    # The Image Library is built apart and attached once the document exists (see
    # _attach_image_library), so highdicom never copies or re-parses it.
    library = _image_library(prepared)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    supersedes_uid: str | None = None
    previous: list[Dataset] | None = None
    if isinstance(supersedes, Dataset):
        previous = [supersedes]
    elif supersedes is not None:
        if not _is_uid(supersedes):
            raise ReportError(f"supersedes is not a valid SOP Instance UID: {supersedes!r}")
        supersedes_uid = supersedes
    notes = _document_notes(findings, templates, demo, supersedes_uid)
    if notes is not None:
        # Row 12 follows the Imaging Measurements container (row 6), as TID 1500 orders them.
        report[0].ContentSequence.append(notes)

    now = datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*prepared, *segmentations],
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        institution_name=device.institution_name,
        is_complete=True,
        # An unverified machine result: PRELIMINARY until a radiologist signs off.
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[procedure],
        previous_versions=previous,
        series_description=result_series_description(series_description, demo),
    )
    _attach_image_library(sr, library)
    if any(f.task not in (SEGMENTATION_TASK, REGRESSION_TASK) for f in findings.findings):
        _declare_label_scheme(sr, device)
    sr.ManufacturerModelName = device.model_name
    sr.SoftwareVersions = device.software_version
    sr.DeviceUID = device.device_uid
    sr.ContributingEquipmentSequence.append(ihe_air_equipment(device, now))
    return sr


def _declare_label_scheme(sr: Dataset, device: DeviceIdentity) -> None:
    """Name the private scheme of the viewer labels (PS3.3 C.12.1.1.2.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = LABEL_SCHEME
    item.CodingSchemeName = "Curia Node finding labels"
    item.CodingSchemeResponsibleOrganization = device.manufacturer
    schemes = list(sr.get("CodingSchemeIdentificationSequence", []))
    sr.CodingSchemeIdentificationSequence = [*schemes, item]


def write_sr(ds: Dataset, path: Path | str) -> Path:
    """Write ``ds`` as a DICOM file (Explicit VR Little Endian), atomically.

    A temp file in the same folder, fsync, then rename: a reader (or a crash) never sees
    a half-written SR under the final name.
    """
    path = Path(path)
    meta = FileMetaDataset(ds.file_meta) if hasattr(ds, "file_meta") else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            pydicom.dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
