"""QIDO-RS answers: one item per match, from catalogue values plus the stored header."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset

from node.dicomweb.common import read_stored
from node.dicomweb.finder import Row
from node.dicomweb.query import Query

_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# Attributes returned by default (PS3.18 Table 6.7.1-2, -2a, -2b) and for includefield=all.
_STUDY_ATTRS = [
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
]
_STUDY_ALL = [
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
]
_SERIES_ATTRS = [
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "TimezoneOffsetFromUTC",
]
_SERIES_ALL = [
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
]
_INSTANCE_ATTRS = [
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "TimezoneOffsetFromUTC",
]


def _copy(target: Dataset, header: Dataset, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if keyword in header and keyword not in target:
            target.add(header[keyword])


def render(row: Row, query: Query, studies_url: str, in_study: bool, in_series: bool) -> Dataset:
    """One QIDO-RS answer item from catalogue values plus the stored file's header.

    Attributes of a higher level are included unless the request path fixes that level
    (``in_study``: /studies/{uid}/..., ``in_series``: .../series/{uid}/...).
    """
    level = query.level
    with_study = level == "study" or not in_study
    wanted: list[str] = []
    if with_study:
        wanted += _STUDY_ATTRS + (_STUDY_ALL if query.include_all else [])
    if level == "series" or (level == "instance" and not in_series):
        wanted += _SERIES_ATTRS + (_SERIES_ALL if query.include_all else [])
    if level == "instance":
        wanted += _INSTANCE_ATTRS
    wanted += query.include
    all_of_instance = level == "instance" and query.include_all
    header = read_stored(row.path, None if all_of_instance else sorted(set(wanted)))
    out = Dataset()
    study = row.study
    out.StudyInstanceUID = study.study_instance_uid
    url = f"{studies_url}/{study.study_instance_uid}"
    if level == "study":
        out.ModalitiesInStudy = sorted(row.modalities)
        out.NumberOfStudyRelatedSeries = row.series_count
        out.NumberOfStudyRelatedInstances = row.instance_count
    else:
        out.SeriesInstanceUID = row.series_uid
        url += f"/series/{row.series_uid}"
        if row.modality:
            out.Modality = row.modality
        if row.series_description:
            out.SeriesDescription = row.series_description
    if level == "series":
        out.NumberOfSeriesRelatedInstances = row.instance_count
    if level == "instance":
        out.SOPInstanceUID = row.sop_uid
        url += f"/instances/{row.sop_uid}"
        if row.sop_class:
            out.SOPClassUID = row.sop_class
        if row.instance_number is not None:
            out.InstanceNumber = row.instance_number
    if with_study:
        for keyword, value in (
            ("PatientID", study.patient_id),
            ("StudyDate", study.study_date),
            ("AccessionNumber", study.accession_number),
        ):
            if value and keyword not in header:
                setattr(out, keyword, value)
    out.InstanceAvailability = "ONLINE"
    out.RetrieveURL = url
    _copy(out, header, wanted)
    if all_of_instance:
        for element in header:
            bulky = element.VR in _BULK_VRS or element.tag.group in (0x0002, 0x7FE0)
            if not bulky and element.tag not in out:
                out.add(element)
    return out
