"""Segmentations sent with a study: where a head's mask may come from, and when one is late.

A mask-pooled or lesion-centred head may read its mask from a segment of a Segmentation
(SEG) or an ROI of an RT Structure Set (RTSTRUCT) in the same study. Such an object is its
own series, which the node stores, forwards and marks "not analysed" (there is nothing for
a head to read in it); the analysis of the image series looks it up here.

Order of arrival: a series is analysed with the segmentations stored when its analysis
starts. To make a study wait for its segmentation, an administrator lists it in
``completion.required_series`` (``{sop_class = "SegmentationStorage"}`` or
``{sop_class = "RTStructureSetStorage"}``). A segmentation that completes after the image
series it lies on was analysed follows ``completion.late_instances``: with ``rerun``, when
that series' last run had heads reading a study segment and did not read this object, one
new run analyses the series again (its SR supersedes the previous one); with ``append`` it
is only stored. A series whose run is still under way is left alone: its analysis reads the
segmentation if it had not started yet (``required_series`` is the way to be sure).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.models import Instance, PipelineRun, Series, SeriesState
from node.core import sop_classes
from node.core.segmentation_refs import referenced_series
from node.workflow import runs
from node.workflow.routing import first_header

log = logging.getLogger(__name__)

#: Image series states after which a late segmentation may re-run the series.
_ENDED = (SeriesState.DONE, SeriesState.FAILED)


def study_segmentations(session: Session, series: Series) -> list[tuple[str, str]]:
    """(SOP class UID, spool-relative path) of every SEG and RTSTRUCT in the series' study,
    in the order they arrived."""
    rows = session.execute(
        select(Instance.sop_class_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == series.study_id)
        .where(Instance.sop_class_uid.in_(sop_classes.SEGMENTATIONS))
        .order_by(Instance.received_at, Instance.id)
    ).all()
    return [(str(sop_class), str(path)) for sop_class, path in rows]


def _what_it_lies_on(paths: list[Path]) -> tuple[set[str], set[str]]:
    """(referenced series UIDs, Frame of Reference UIDs) of segmentation objects."""
    series: set[str] = set()
    frames: set[str] = set()
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError):
            continue
        series |= referenced_series(ds)
        if ds.get("FrameOfReferenceUID"):
            frames.add(str(ds.FrameOfReferenceUID))
        for ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
            frames.add(str(ref.FrameOfReferenceUID))
    return series, frames


def rerun_for_late_segmentation(
    session: Session,
    segmentation: Series,
    spool_dir: Path,
    late_instances: str,
    run_key: Callable[[Series], str],
) -> list[int]:
    """Re-run the analysed series of the study that a newly complete segmentation series
    lies on, when their last run read study segments but not these; the new run ids.

    Nothing happens unless ``late_instances`` is ``rerun`` and the series holds a SEG or an
    RTSTRUCT.
    """
    if late_instances != "rerun":
        return []
    objects = session.execute(
        select(Instance.sop_instance_uid, Instance.path)
        .where(Instance.series_id == segmentation.id)
        .where(Instance.sop_class_uid.in_(sop_classes.SEGMENTATIONS))
    ).all()
    if not objects:
        return []
    uids = {str(uid) for uid, _ in objects}
    referenced, frames = _what_it_lies_on([spool_dir / path for _, path in objects])
    created = []
    for image in segmentation.study.series:
        if image.id == segmentation.id or image.state not in _ENDED:
            continue
        last = session.scalars(
            select(PipelineRun).where(PipelineRun.series_id == image.id).order_by(PipelineRun.id)
        ).all()
        findings = (last[-1].findings or {}) if last else {}
        if not findings.get("segment_heads") or uids <= set(findings.get("segmentations_read", [])):
            continue
        if image.series_instance_uid not in referenced:
            header = first_header(session, spool_dir, image)
            if header is None or str(header.get("FrameOfReferenceUID", "")) not in frames:
                continue
        image.state = SeriesState.COMPLETE
        run = runs.create_rerun(
            session, image, "late", "late-segmentation", first_key=run_key(image)
        )
        created.append(run.id)
        log.info(
            "series %d: a segmentation arrived after its analysis, re-run %d queued",
            image.id,
            run.id,
        )
    return created
