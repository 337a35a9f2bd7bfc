"""A whole study as a modality and an archive hold it, built from the real sample CT.

Besides the axial CT series a real CT study carries objects that are not the images a head
reads: a localizer, the scanner's X-Ray Radiation Dose SR, a Key Object Selection and a
Grayscale Softcopy Presentation State from the reading room, an RT Structure Set from
planning, a Secondary Capture (a screenshot of a reconstruction). Each is a valid object of
its SOP class (highdicom where it builds one, pydicom otherwise), in the CT's study, with
UIDs deterministic per ``label`` so each test gets its own study.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.testdata import repaired_ct_series

XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
MANUFACTURER = "Curia test site"


@dataclass
class WholeStudy:
    """The study's files by kind, and each kind's Series Instance UID."""

    study_instance_uid: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)

    @property
    def all_files(self) -> list[Path]:
        return [path for paths in self.files.values() for path in paths]

    def sop_instance_uids(self, *kinds: str) -> set[str]:
        """The SOP Instance UIDs of the given kinds (all kinds when none is named)."""
        chosen = kinds or tuple(self.files)
        return {
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for kind in chosen
            for path in self.files[kind]
        }


#: kind -> what it is, as a reader of the study would name it
KINDS = {
    "axial": "axial CT series",
    "localizer": "CT localizer",
    "dose": "X-Ray Radiation Dose SR",
    "kos": "Key Object Selection",
    "gsps": "Grayscale Softcopy Presentation State",
    "rtstruct": "RT Structure Set",
    "sc": "Secondary Capture",
}


def build_whole_study(dest: Path, label: str) -> WholeStudy:
    """Write the whole study under ``dest`` (one folder per kind) and describe it."""
    axial = repaired_ct_series(dest / "axial", label)
    images = [dcmread(path) for path in axial]
    images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = images[0]
    study = WholeStudy(str(first.StudyInstanceUID))
    study.files["axial"] = axial
    study.series["axial"] = str(first.SeriesInstanceUID)

    def uid(what: str) -> str:
        return str(generate_uid(entropy_srcs=[label, what]))

    def save(kind: str, ds: Dataset) -> None:
        folder = dest / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.files.setdefault(kind, []).append(path)
        study.series[kind] = str(ds.SeriesInstanceUID)

    save("localizer", _localizer(images[len(images) // 2], uid))
    save("dose", _dose_report(first, uid))
    save(
        "kos",
        hd.ko.KeyObjectSelectionDocument(
            evidence=images[:2],
            content=hd.ko.KeyObjectSelection(
                document_title=codes.DCM.OfInterest,
                referenced_objects=images[:2],
                description="Key images",
            ),
            series_instance_uid=uid("kos-series"),
            series_number=90,
            sop_instance_uid=uid("kos"),
            instance_number=1,
            manufacturer=MANUFACTURER,
        ),
    )
    save(
        "gsps",
        hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=images,
            series_instance_uid=uid("gsps-series"),
            series_number=91,
            sop_instance_uid=uid("gsps"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="reading room",
            software_versions="1",
            device_serial_number="1",
            content_label="WINDOW",
            voi_lut_transformations=[
                hd.pr.SoftcopyVOILUTTransformation(window_center=40.0, window_width=400.0)
            ],
        ),
    )
    save("rtstruct", _structure_set(images, uid))
    middle = images[len(images) // 2]
    save(
        "sc",
        hd.sc.SCImage.from_ref_dataset(
            ref_dataset=middle,
            pixel_array=np.zeros((64, 64), dtype=np.uint8),
            photometric_interpretation="MONOCHROME2",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=uid("sc-series"),
            series_number=92,
            sop_instance_uid=uid("sc"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "P"),
        ),
    )
    return study


def _localizer(slice_: Dataset, uid: Callable[[str], str]) -> Dataset:
    """One CT image marked as a localizer (ImageType LOCALIZER), in its own series."""
    make = uid
    ds = slice_.copy()
    ds.file_meta = FileMetaDataset(slice_.file_meta)
    ds.SOPInstanceUID = make("localizer")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = make("localizer-series")
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram"
    return ds


def copy_patient_study(source: Dataset, ds: Dataset, *, blank_missing: bool = False) -> None:
    """Give ``ds`` the patient and study of ``source``, as a modality's other objects carry
    them; ``blank_missing`` writes empty values where the source has none (type 2)."""
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword in source:
            ds[keyword] = source[keyword]
        elif blank_missing:
            setattr(ds, keyword, "")
        else:
            setattr(ds, keyword, "")


def _new(sop_class: str, sop_instance: str, source: Dataset) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    copy_patient_study(source, ds)
    ds.Manufacturer = MANUFACTURER
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dose_report(source: Dataset, uid: Callable[[str], str]) -> Dataset:
    """An X-Ray Radiation Dose SR (TID 10011 root) as a CT scanner sends with every study."""
    make = uid
    ds = _new(XRAY_DOSE_SR, make("dose"), source)
    ds.SeriesInstanceUID = make("dose-series")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 997, 1
    ds.SeriesDescription = "Dose Report"
    ds.ContentDate, ds.ContentTime = source.get("StudyDate", ""), source.get("StudyTime", "")
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = Sequence([template])
    event = Dataset()
    event.RelationshipType, event.ValueType = "HAS CONCEPT MOD", "CODE"
    event.ConceptNameCodeSequence = Sequence([_code("121058", "DCM", "Procedure reported")])
    event.ConceptCodeSequence = Sequence([_code("P5-08000", "SRT", "Computed Tomography X-Ray")])
    total = Dataset()
    total.RelationshipType, total.ValueType = "CONTAINS", "NUM"
    total.ConceptNameCodeSequence = Sequence(
        [_code("113813", "DCM", "CT Dose Length Product Total")]
    )
    measured = Dataset()
    measured.NumericValue = "412.5"
    measured.MeasurementUnitsCodeSequence = Sequence([_code("mGy.cm", "UCUM", "mGy.cm")])
    total.MeasuredValueSequence = Sequence([measured])
    ds.ContentSequence = Sequence([event, total])
    return ds


def _structure_set(images: list[Dataset], uid: Callable[[str], str]) -> Dataset:
    """An RT Structure Set with one ROI contoured on the middle slice."""
    make = uid
    first = images[0]
    ds = _new(RT_STRUCTURE_SET, make("rtstruct"), first)
    ds.SeriesInstanceUID = make("rtstruct-series")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", 93, 1
    ds.StructureSetLabel = "Planning"
    ds.StructureSetDate, ds.StructureSetTime = "20260101", "120000"
    ds.OperatorsName = ""
    ds.ManufacturerModelName = "planning"
    frame_of_reference = str(first.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""

    contour_images = []
    for image in images:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Sequence(contour_images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    reference = Dataset()
    reference.FrameOfReferenceUID = frame_of_reference
    reference.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([reference])

    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = 1, frame_of_reference
    roi.ROIName, roi.ROIGenerationAlgorithm = "Marker", "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])

    middle = images[len(images) // 2]
    x0, y0, z = (float(v) for v in middle.ImagePositionPatient)
    points = [x0 + 100, y0 + 100, z, x0 + 120, y0 + 100, z, x0 + 120, y0 + 120, z]
    contour = Dataset()
    image_ref = Dataset()
    image_ref.ReferencedSOPClassUID = middle.SOPClassUID
    image_ref.ReferencedSOPInstanceUID = middle.SOPInstanceUID
    contour.ContourImageSequence = Sequence([image_ref])
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = len(points) // 3
    contour.ContourData = [f"{p:.2f}" for p in points]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = Sequence([contour])
    ds.ROIContourSequence = Sequence([roi_contour])

    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "MARKER", ""
    ds.RTROIObservationsSequence = Sequence([observation])
    return ds
