"""What a segmentation object (SEG or RT Structure Set) says it was drawn on: the image
series it references, by either object's way of saying so. Read where segmentations are
matched to series (study completion) and where their segments are read (the model's
masks), from the same rule."""

from __future__ import annotations

from pydicom.dataset import Dataset


def referenced_series(ds: Dataset) -> frozenset[str]:
    """Series Instance UIDs a SEG (Referenced Series Sequence) or an RTSTRUCT (through its
    Referenced Frame of Reference, RT Referenced Study and Series Sequences) points at."""
    uids = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence") or []}
    for frame_ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame_ref.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                uids.add(str(series.SeriesInstanceUID))
    return frozenset(uids)
