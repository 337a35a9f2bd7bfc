"""The DICOM Segmentation a mask head's series mask becomes.

A BINARY Segmentation (the most widely displayed type) over the series the mask was made
from, in that series' study, so a viewer can overlay it; the SR references its segment
(:mod:`pipelines.reporting.segments`). The mask arrives in the stored orientation, one
slice per source instance (:class:`pipelines.findings.SeriesMask`), and the segment names
its algorithm exactly as the SR does.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from concurrent.futures import Executor

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.findings import (
    SegmentationError,
    SegmentDefinition,
    SegmentSource,
    SeriesMask,
)
from pipelines.reporting.content import (
    DEMO_STATEMENT,
    LO_MAX,
    concept,
    prepare_sources,
    result_series_description,
)
from pipelines.reporting.provenance import (
    DeviceIdentity,
    algorithm_name,
    algorithm_version,
    ihe_air_equipment,
)
from pipelines.reporting.uids import new_uid

__all__ = ["build_seg", "why_no_seg"]

_ST_MAX = 1024
_DEMO_LABEL_SUFFIX = " (DEMO)"


def _in_mask_order(sources: Sequence[Dataset], mask: SeriesMask) -> list[Dataset]:
    """The sources in the mask's slice order: frame i of the SEG must be slice i."""
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in sources}
    missing = [uid for uid in mask.sop_instance_uids if uid not in by_uid]
    if missing:
        raise SegmentationError(
            f"{len(missing)} slice(s) of the mask have no source instance, e.g. {missing[0]}"
        )
    extra = set(by_uid) - set(mask.sop_instance_uids)
    if extra or len(sources) != len(mask.sop_instance_uids):
        raise SegmentationError(
            f"{len(sources)} sources for a mask of {len(mask.sop_instance_uids)} slices: "
            "pass exactly the series the mask was made from"
        )
    return [by_uid[uid] for uid in mask.sop_instance_uids]


def _check_geometry(ordered: Sequence[Dataset], mask: SeriesMask) -> None:
    if mask.mask.ndim != 3 or mask.mask.shape[0] != len(ordered):
        raise SegmentationError(
            f"mask shape {mask.mask.shape} does not match {len(ordered)} source slices"
        )
    for ds in ordered:
        if (int(ds.Rows), int(ds.Columns)) != mask.mask.shape[1:]:
            raise SegmentationError(
                f"source {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns} but the mask is "
                f"{mask.mask.shape[1]}x{mask.mask.shape[2]}"
            )


def why_no_seg(sources: Sequence[Dataset]) -> str | None:
    """Why these source headers cannot carry a Segmentation; None when they can.

    A Segmentation shares its sources' frame of reference, and is placed frame by frame
    in the patient: a source without FrameOfReferenceUID (non-conformant, but seen), or
    a multi-frame source whose functional groups give no plane positions, has none.
    """
    if any(not ds.get("FrameOfReferenceUID") for ds in sources):
        return "a source has no FrameOfReferenceUID"
    for ds in sources:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and not _has_plane_positions(ds):
            return "the multi-frame source gives no plane position for its frames"
    return None


def _has_plane_positions(ds: Dataset) -> bool:
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or [])]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if any("PlanePositionSequence" in g for g in groups):
        return True
    return bool(per_frame) and all("PlanePositionSequence" in g for g in per_frame)


def _on_source_frames(
    sources: Sequence[Dataset], mask: SeriesMask
) -> tuple[list[Dataset], np.ndarray]:
    """A mask of frames of one multi-frame object, as one mask frame per source frame.

    highdicom builds a Segmentation of a multi-frame source on its frames, one mask frame
    per source frame in frame order (each SEG frame then references its source frame).
    The mask covers the stack that was analysed; the object's other frames (another
    stack of the same object) stay empty, and empty frames are left out of the SEG.
    """
    uids = set(mask.sop_instance_uids)
    if len(uids) != 1 or len(sources) != 1:
        raise SegmentationError(
            f"a mask of {len(uids)} multi-frame object(s) over {len(sources)} source(s): a "
            "Segmentation is built on the frames of one multi-frame source"
        )
    source = sources[0]
    if str(source.get("SOPInstanceUID", "")) not in uids:
        raise SegmentationError("the source is not the multi-frame object the mask was made on")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    rows, columns = int(source.Rows), int(source.Columns)
    if mask.mask.shape[1:] != (rows, columns) or len(mask.frames) != mask.mask.shape[0]:
        raise SegmentationError(
            f"mask shape {mask.mask.shape} does not fit {len(mask.frames)} frames of "
            f"{rows}x{columns}"
        )
    if not all(1 <= f <= frames for f in mask.frames):
        raise SegmentationError(f"mask frames {mask.frames} outside the source's {frames}")
    full = np.zeros((frames, rows, columns), dtype=bool)
    full[[f - 1 for f in mask.frames]] = mask.mask
    return [source], full


def _demo_label(label: str) -> str:
    """The segment label with a demo marker, unless it already says demo."""
    if "demo" in label.lower():
        return label
    return label[: LO_MAX - len(_DEMO_LABEL_SUFFIX)] + _DEMO_LABEL_SUFFIX


def _segment_description(
    mask: SeriesMask, segment: SegmentDefinition, device: DeviceIdentity, uid_key: str | None
) -> hd.seg.SegmentDescription:
    """The one segment: coded category/type, AUTOMATIC, the algorithm as the SR names it."""
    demo = mask.finding.demo
    parameters = {"threshold": f"{segment.threshold:g}"}
    if mask.model.weights_digest:
        parameters["backbone weights digest"] = mask.model.weights_digest
    if demo:
        parameters["weights"] = "demo (random, untrained); not for diagnosis"
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=_demo_label(segment.label) if demo else segment.label,
        segmented_property_category=concept(segment.category),
        segmented_property_type=concept(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name(mask.model, segment.head_name),
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm_version(mask.model, segment.head_version),
            source=device.manufacturer,
            parameters=parameters,
        ),
        tracking_uid=new_uid(uid_key, "SEG segment 1 tracking"),
        tracking_id=segment.label,
    )
    text = segment.description
    if demo and DEMO_STATEMENT not in text:
        text = f"{DEMO_STATEMENT} {text}".strip()
    if text:
        description.SegmentDescription = text[:_ST_MAX]
    return description


def build_seg(
    sources: Sequence[Dataset],
    mask: SeriesMask,
    mask_head: SegmentSource,
    device: DeviceIdentity,
    *,
    series_number: int = 9902,
    instance_number: int = 1,
    series_description: str = "Curia AI segmentation",
    workers: int | Executor = 0,
    uid_key: str | None = None,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation of ``mask`` over its series, in the source study.

    ``mask_head`` is the head that made the mask (checked against the mask's finding); its
    segment definition says what the segment is. ``sources`` are the series' instances;
    headers (``stop_before_pixels``) are enough and they are never changed. They are put
    in the mask's spatial order so that mask slice i is paired with source i (highdicom
    then orders the frames along its own axis, each frame referencing its source slice).
    Empty frames are left out; when every frame is empty highdicom keeps them all, as a
    Segmentation needs frames. ``workers`` goes to highdicom, which uses it to compress
    frames (a number of processes, or a reused executor); BINARY frames are bit-packed and
    stored uncompressed here, so the default of none is the fast choice.

    ``uid_key`` names this Segmentation among every result the node writes: given, its
    SeriesInstanceUID, SOPInstanceUID and segment tracking UID are derived from it, so
    that building it again (a retried stage) gives the same object; None gives fresh
    random UIDs.
    """
    segment = mask_head.segment_definition
    if mask.finding.head_name != segment.head_name:
        raise SegmentationError(
            f"mask was made by head {mask.finding.head_name!r}, not {segment.head_name!r}"
        )
    if any(mask.frames):
        ordered, pixel_array = _on_source_frames(sources, mask)
    else:
        ordered = _in_mask_order(sources, mask)
        _check_geometry(ordered, mask)
        pixel_array = mask.mask
    prepared = prepare_sources(ordered)
    demo = mask.finding.demo
    content = f"{segment.head_name} mask" + (" - DEMO, NOT FOR DIAGNOSIS" if demo else "")
    seg = hd.seg.Segmentation(
        source_images=prepared,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(mask, segment, device, uid_key)],
        series_instance_uid=new_uid(uid_key, "SEG series"),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_key, "SEG instance"),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        # The node has no hardware serial number; its device UID identifies it uniquely.
        device_serial_number=device.device_uid,
        institution_name=device.institution_name,
        content_label="CURIA_MASK",
        content_description=content[:LO_MAX],
        series_description=result_series_description(series_description, demo),
        omit_empty_frames=True,
        workers=workers,
    )
    seg.DeviceUID = device.device_uid
    equipment = list(seg.get("ContributingEquipmentSequence") or [])
    equipment.append(ihe_air_equipment(device, datetime.datetime.now(), "AI segmentation results"))
    seg.ContributingEquipmentSequence = equipment
    return seg
