"""Turn a series' head findings into a DICOM Comprehensive 3D SR (TID 1500).

The SR is what a radiologist sees in the viewer, so it must be attached to the right
patient and study, traceable to the exact model and node that made it, and honest
about demo weights. Everything head-specific comes from the SR templates
(:mod:`pipelines.reporting.templates`); this module only knows the document structure:
the groups (:mod:`~pipelines.reporting.measurement_groups`; a per-slice head's slices in
:mod:`~pipelines.reporting.slice_groups`), the notes
(:mod:`~pipelines.reporting.notes`), the image library
(:mod:`~pipelines.reporting.image_library`) and the segments a mask head's group
references (:mod:`~pipelines.reporting.segments`).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import replace

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.findings import (
    CLASSIFICATION_TASK,
    REGRESSION_TASK,
    SEGMENTATION_TASK,
    SeriesFindings,
)
from pipelines.reporting.content import (
    ReportError,
    is_uid,
    prepare_sources,
    result_series_description,
)
from pipelines.reporting.image_library import attach_image_library, image_library
from pipelines.reporting.measurement_groups import LABEL_SCHEME, check_finding, measurement_group
from pipelines.reporting.notes import document_notes
from pipelines.reporting.provenance import DeviceIdentity, ihe_air_equipment
from pipelines.reporting.segments import referenced_segments
from pipelines.reporting.slice_groups import slice_groups
from pipelines.reporting.templates import ReportTemplate
from pipelines.reporting.uids import new_uid

__all__ = ["build_sr", "split_findings"]

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
    uid_key: str | None = None,
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

    ``uid_key`` names this document among every result the node writes (e.g. its run and
    part): given, its SeriesInstanceUID (unless ``series_instance_uid`` is given),
    SOPInstanceUID and tracking UIDs are derived from it, so that building it again (a
    retried report) gives the same object rather than a second one; None gives fresh
    random UIDs.
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
    if series_instance_uid is not None and not is_uid(series_instance_uid):
        raise ReportError(f"series_instance_uid is not a valid UID: {series_instance_uid!r}")
    prepared = prepare_sources(sources)
    if findings.series_instance_uid not in {str(ds.SeriesInstanceUID) for ds in prepared}:
        raise ReportError(
            f"findings are for series {findings.series_instance_uid}, which none of the "
            "sources belong to"
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in prepared}
    segments = referenced_segments(segmentations, findings, str(prepared[0].StudyInstanceUID))

    demo = findings.model.demo or any(f.demo for f in findings.findings)
    groups = []
    for finding in findings.findings:
        template = templates.get(finding.head_name)
        if template is None:
            raise ReportError(
                f'no SR template for head "{finding.head_name}" '
                f"(templates for: {sorted(templates) or 'none'})"
            )
        check_finding(finding)
        segment = segments.get((finding.head_name, finding.stack))
        groups.append(
            measurement_group(
                findings, finding, template, device, by_uid, demo, segment, uid_key=uid_key
            )
        )
        groups += slice_groups(findings, finding, template, device, by_uid, demo, uid_key)

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
    # attach_image_library), so highdicom never copies or re-parses it.
    library = image_library(prepared)
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
        if not is_uid(supersedes):
            raise ReportError(f"supersedes is not a valid SOP Instance UID: {supersedes!r}")
        supersedes_uid = supersedes
    notes = document_notes(findings, templates, demo, supersedes_uid)
    if notes is not None:
        # Row 12 follows the Imaging Measurements container (row 6), as TID 1500 orders them.
        report[0].ContentSequence.append(notes)

    now = datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*prepared, *segmentations],
        content=report[0],
        series_instance_uid=series_instance_uid or new_uid(uid_key, "SR series"),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_key, "SR instance"),
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
    attach_image_library(sr, library)
    if any(f.task not in (SEGMENTATION_TASK, REGRESSION_TASK) for f in findings.findings):
        _declare_label_scheme(sr, device)
    sr.ManufacturerModelName = device.model_name
    sr.SoftwareVersions = device.software_version
    sr.DeviceUID = device.device_uid
    # a plain item: highdicom's ContributingEquipment refuses the IHE AIR purpose code
    sr["ContributingEquipmentSequence"].value.append(ihe_air_equipment(device, now))
    return sr


def _declare_label_scheme(sr: Dataset, device: DeviceIdentity) -> None:
    """Name the private scheme of the viewer labels (PS3.3 C.12.1.1.2.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = LABEL_SCHEME
    item.CodingSchemeName = "Curia Node finding labels"
    item.CodingSchemeResponsibleOrganization = device.manufacturer
    schemes = list(sr.get("CodingSchemeIdentificationSequence", []))
    sr.CodingSchemeIdentificationSequence = [*schemes, item]
