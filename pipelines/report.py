"""Turn a series' head findings into a DICOM Comprehensive 3D SR (TID 1500).

The SR is what a radiologist sees in the viewer, so it must be attached to the right
patient and study, traceable to the exact model and node that made it, and honest
about demo weights. Everything head-specific comes from the SR templates
(``pipelines.sr_templates``); this module only knows the document structure.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.findings import CodeRef, HeadFinding, SeriesFindings
from pipelines.sr_templates import CodeSpec, ReportTemplate

__all__ = [
    "DEMO_STATEMENT",
    "DeviceIdentity",
    "ReportError",
    "build_sr",
    "write_sr",
]

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


def _prepare_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    """Deep copies of the sources that highdicom can use, never touching the originals.

    The caller's datasets are often cached or about to be stored: mutating them would
    change what the archive receives.
    """
    if not sources:
        raise ReportError("no source instances given: an SR must reference what it describes")
    prepared: list[Dataset] = []
    for i, ds in enumerate(sources):
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                raise ReportError(f"source #{i} has no {keyword}; it cannot be referenced")
        clone = copy.deepcopy(ds)
        for keyword in _TYPE2_COPIED:
            if keyword not in clone:
                setattr(clone, keyword, None)
        prepared.append(clone)
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
    if any(not 0.0 <= p <= 1.0 for p in finding.probabilities):
        raise ReportError(f'head "{finding.head_name}": probabilities outside 0..1')


def _algorithm(
    findings: SeriesFindings, finding: HeadFinding, device: DeviceIdentity
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 naming backbone and head, so a result traces to the exact weights."""
    parameters: list[str] = []
    if findings.model.weights_digest:
        parameters.append(f"backbone weights digest: {findings.model.weights_digest}")
    if findings.model.demo or finding.demo:
        parameters.append("weights: demo (random, untrained); not for diagnosis")
    return hd.sr.AlgorithmIdentification(
        name=f"{findings.model.name} + {finding.head_name}",
        version=f"{findings.model.version} / {finding.head_version}",
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=device.manufacturer,
        parameters=parameters or None,
    )


def _key_image(
    findings: SeriesFindings, finding: HeadFinding, by_uid: Mapping[str, Dataset]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """Reference the head's key slice so a viewer can jump to it."""
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
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)]


def _measurement_group(
    findings: SeriesFindings,
    finding: HeadFinding,
    template: ReportTemplate,
    device: DeviceIdentity,
    by_uid: Mapping[str, Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group for one head, laid out as its template says."""
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

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=template.tracking_identifier
        ),
        finding_type=_concept(template.finding_type),
        algorithm_id=_algorithm(findings, finding, device),
        finding_sites=[hd.sr.FindingSite(anatomic_location=_concept(s)) for s in sites] or None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=_key_image(findings, finding, by_uid),
    )


def _summary(finding: HeadFinding, template: ReportTemplate) -> str | None:
    if template.summary is None:
        return None
    predicted = finding.predicted
    meaning = predicted.code.meaning if predicted.code is not None else predicted.name
    if predicted.code is None and predicted.name in template.class_codes:
        meaning = template.class_codes[predicted.name].meaning
    return template.summary.pattern.format(
        head=finding.head_name,
        task=finding.task,
        predicted=predicted.name,
        predicted_meaning=meaning,
        probability=float(finding.probabilities[finding.predicted_index]),
    )


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


def _concept_key(item: Dataset) -> tuple[str, str] | None:
    if "ConceptNameCodeSequence" not in item:
        return None
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


def _order_library_descriptors(node: Dataset) -> None:
    """Put "Spacing between slices" where TID 1604 lists it (row 3, after the pixel spacings).

    highdicom appends it last; PixelMed (-checkcontentitemorder) then warns about row order
    on every image entry, which would bury warnings that matter.
    """
    seq = node.get("ContentSequence")
    if not seq:
        return
    spacing = codes.DCM.SpacingBetweenSlices
    vertical = codes.DCM.VerticalPixelSpacing
    keys = [_concept_key(item) for item in seq]
    spacing_key = (spacing.value, spacing.scheme_designator)
    vertical_key = (vertical.value, vertical.scheme_designator)
    if spacing_key in keys and vertical_key in keys:
        item = seq.pop(keys.index(spacing_key))
        keys.remove(spacing_key)
        seq.insert(keys.index(vertical_key) + 1, item)
    for child in seq:
        _order_library_descriptors(child)


def _series_description(base: str, demo: bool) -> str:
    """SeriesDescription (LO, 64 chars) that keeps the demo warning when it must cut."""
    if not demo:
        return base[:_LO_MAX]
    return base[: _LO_MAX - len(_DEMO_SERIES_SUFFIX)] + _DEMO_SERIES_SUFFIX


def _air_equipment(device: DeviceIdentity, now: datetime.datetime) -> Dataset:
    """IHE AIR ContributingEquipmentSequence item (highdicom refuses this purpose code)."""
    item = Dataset()
    item.Manufacturer = device.manufacturer
    if device.institution_name:
        item.InstitutionName = device.institution_name
    item.ManufacturerModelName = device.model_name
    item.SoftwareVersions = device.software_version
    item.DeviceUID = device.device_uid
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = "AI classification results"
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
) -> Dataset:
    """Build the Comprehensive 3D SR for one analysed series.

    ``sources`` are the series' instances (read without pixels); they are copied, never
    changed. ``supersedes`` is an earlier SR this one replaces: given as a dataset (its
    header is enough) it goes into PredecessorDocumentsSequence; given as a bare SOP
    Instance UID (its series is unknown, and that sequence needs it) it is named in a
    note in the content tree instead.
    """
    if not findings.findings:
        raise ReportError(f"series {findings.series_instance_uid}: no findings to report")
    prepared = _prepare_sources(sources)
    if findings.series_instance_uid not in {str(ds.SeriesInstanceUID) for ds in prepared}:
        raise ReportError(
            f"findings are for series {findings.series_instance_uid}, which none of the "
            "sources belong to"
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in prepared}

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
        groups.append(_measurement_group(findings, finding, template, device, by_uid))

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
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=prepared,
    )
    library = next(
        item for item in report[0].ContentSequence if item.name == codes.DCM.ImageLibrary
    )
    _order_library_descriptors(library)
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
        evidence=prepared,
        content=report[0],
        series_instance_uid=generate_uid(),
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
        series_description=_series_description(series_description, demo),
    )
    sr.ManufacturerModelName = device.model_name
    sr.SoftwareVersions = device.software_version
    sr.DeviceUID = device.device_uid
    sr.ContributingEquipmentSequence.append(_air_equipment(device, now))
    return sr


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
