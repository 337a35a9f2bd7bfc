"""Segmentations a site would send with a study: a SEG (highdicom) and an RTSTRUCT (pydicom).

Both are drawn on a real CT series from known masks, so a test can compare what the node
makes of them with the masks themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from tests.support.whole_study import copy_patient_study

LIVER = CodedConcept("10200004", "SCT", "Liver")


def write_seg(
    sources: Sequence[Path], mask: np.ndarray, label: str, dest: Path, *, seed: str
) -> Path:
    """A BINARY SEG of ``mask`` (one frame per source, in ``sources`` order) labelled
    ``label``, drawn on ``sources`` (its frames reference them)."""
    images = [dcmread(path) for path in sources]
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label=label,
                segmented_property_category=codes.SCT.Organ,
                segmented_property_type=LIVER,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=generate_uid(entropy_srcs=[seed, "seg-series"]),
        series_number=40,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, "seg"]),
        instance_number=1,
        manufacturer="Reading Room",
        manufacturer_model_name="Contouring",
        software_versions="1",
        device_serial_number="1",
    )
    path = dest / f"{seg.SOPInstanceUID}.dcm"
    seg.save_as(path)
    return path


def rectangle_contour(ds: Dataset, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
    """The closed contour (4, 3) in patient mm whose inside, by pixel centres, is exactly the
    pixels ``rows[0]..rows[1]-1`` x ``columns[0]..columns[1]-1`` of the slice ``ds``."""
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    along_row, down_column = np.array(iop[:3]), np.array(iop[3:])
    spacing_rows, spacing_cols = (float(v) for v in ds.PixelSpacing)
    corners = [
        (rows[0] - 0.5, columns[0] - 0.5),
        (rows[0] - 0.5, columns[1] - 0.5),
        (rows[1] - 0.5, columns[1] - 0.5),
        (rows[1] - 0.5, columns[0] - 0.5),
    ]
    return np.array(
        [origin + c * spacing_cols * along_row + r * spacing_rows * down_column for r, c in corners]
    )


def write_rtstruct(
    sources: Sequence[Path],
    contours: dict[int, np.ndarray],
    roi_name: str,
    dest: Path,
    *,
    seed: str,
) -> Path:
    """An RT Structure Set with one ROI ``roi_name``: a closed planar contour on each slice
    ``sources[k]`` for the points ``contours[k]`` (N, 3), each referencing its image."""
    images = [dcmread(path, stop_before_pixels=True) for path in sources]
    first = images[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "rtstruct"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_patient_study(first, ds, blank_missing=True)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "rtstruct-series"])
    ds.SeriesNumber = 41
    ds.InstanceNumber = 1
    ds.Manufacturer = "Reading Room"
    ds.StructureSetLabel = "Contours"
    ds.StructureSetDate = "20261205"
    ds.StructureSetTime = "080000"
    frame_of_reference = str(first.FrameOfReferenceUID)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([_image_ref(image) for image in images])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_of_reference
    roi.ROIName = roi_name
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = DicomSequence([roi])
    items = []
    for k, points in sorted(contours.items()):
        item = Dataset()
        item.ContourImageSequence = DicomSequence([_image_ref(images[k])])
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(points)
        item.ContourData = [f"{v:.6f}" for v in np.asarray(points).ravel()]
        items.append(item)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = DicomSequence(items)
    ds.ROIContourSequence = DicomSequence([roi_contour])
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    path = dest / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _image_ref(image: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return ref
