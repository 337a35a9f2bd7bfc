"""Segmentations and study completion: waiting for one, and re-running for a late one.

A real catalogue (SQLite) and spool; the watcher completes series as the node's does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance, PipelineRun, RunState, Series, SeriesState, Study
from node.core.settings import CompletionSettings
from node.workflow.completion import CompletionWatcher
from node.workflow.routing import Router

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def _object(sop_class: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for name, value in values.items():
        setattr(ds, name, value)
    return ds


def _series(
    catalogue: Catalogue,
    spool: Path,
    study: str,
    ds: Dataset,
    *,
    ago: float,
    state: SeriesState = SeriesState.RECEIVING,
    modality: str = "CT",
) -> str:
    uid = str(ds.get("SeriesInstanceUID") or generate_uid())
    ds.SeriesInstanceUID = uid
    ds.StudyInstanceUID = study
    path = f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(spool / path, enforce_file_format=True)
    when = NOW - timedelta(seconds=ago)
    with catalogue.session() as session:
        row = session.scalar(sa.select(Study).where(Study.study_instance_uid == study))
        series = Series(
            series_instance_uid=uid,
            study=row or Study(study_instance_uid=study),
            modality=modality,
            instance_count=1,
            state=state,
            first_received_at=when - timedelta(seconds=5),
            last_received_at=when,
            completed_at=when if state != SeriesState.RECEIVING else None,
        )
        session.add(series)
        session.add(
            Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                series=series,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                path=path,
                size=1,
                sha256="0" * 64,
                received_at=when,
            )
        )
    return uid


def _analysed(catalogue: Catalogue, spool: Path, study: str, findings: dict) -> str:
    """An image series already analysed (done), its run's findings as given."""
    image = _object(CT, FrameOfReferenceUID=FRAME_OF_REFERENCE)
    uid = _series(catalogue, spool, study, image, ago=600, state=SeriesState.DONE)
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        session.add(
            PipelineRun(series=series, run_key=uid, state=RunState.SUCCEEDED, findings=findings)
        )
    return uid


def _seg(image_uid: str, *, by_series: bool = True) -> Dataset:
    seg = _object(SegmentationStorage, Modality="SEG", FrameOfReferenceUID=FRAME_OF_REFERENCE)
    if by_series:
        ref = Dataset()
        ref.SeriesInstanceUID = image_uid
        seg.ReferencedSeriesSequence = [ref]
    return seg


def _watcher(catalogue: Catalogue, spool: Path, **policy: object) -> CompletionWatcher:
    return CompletionWatcher(
        catalogue,
        lambda run_id, _priority: None,
        lambda s: s.series_instance_uid,
        router=Router(catalogue, spool),
        policy=CompletionSettings(series_quiet_seconds=10, **policy),
    )


def _reruns(catalogue: Catalogue, uid: str) -> list[str]:
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        assert series is not None
        return [r.requested_by or "" for r in series.runs if r.rerun_of is not None]


WANTED = {"findings": [], "segment_heads": ["infarct"], "segmentations_read": []}


@pytest.mark.parametrize("by_series", [True, False])
def test_a_late_segmentation_reruns_the_series_it_lies_on(
    catalogue: Catalogue, tmp_path: Path, by_series: bool
) -> None:
    image = _analysed(catalogue, tmp_path, "1.1", WANTED)
    other = _analysed(catalogue, tmp_path, "1.1", {**WANTED, "segment_heads": []})
    _series(catalogue, tmp_path, "1.1", _seg(image, by_series=by_series), ago=60, modality="SEG")
    run_ids = _watcher(catalogue, tmp_path).complete_quiet_series(NOW)
    assert len(run_ids) == 1
    assert _reruns(catalogue, image) == ["late-segmentation"]
    assert _reruns(catalogue, other) == []  # no head of its last run reads a segment


def test_a_segmentation_already_read_or_policy_append_reruns_nothing(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    seg = _seg("")
    read = _analysed(
        catalogue, tmp_path, "2.1", {**WANTED, "segmentations_read": [seg.SOPInstanceUID]}
    )
    _series(catalogue, tmp_path, "2.1", seg, ago=60, modality="SEG")
    assert _watcher(catalogue, tmp_path).complete_quiet_series(NOW) == []
    assert _reruns(catalogue, read) == []

    appended = _analysed(catalogue, tmp_path, "2.2", WANTED)
    _series(catalogue, tmp_path, "2.2", _seg(appended), ago=60, modality="SEG")
    policy = _watcher(catalogue, tmp_path, late_instances="append")
    assert policy.complete_quiet_series(NOW) == []
    assert _reruns(catalogue, appended) == []


def test_required_series_makes_the_study_wait_for_its_segmentation(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    image = _object(CT, FrameOfReferenceUID=FRAME_OF_REFERENCE)
    uid = _series(catalogue, tmp_path, "3.1", image, ago=60)
    w = _watcher(catalogue, tmp_path, required_series=[{"sop_class": "SegmentationStorage"}])
    assert w.complete_quiet_series(NOW) == []
    _series(catalogue, tmp_path, "3.1", _seg(uid), ago=30, modality="SEG")
    assert len(w.complete_quiet_series(NOW)) == 1  # the CT's run; the SEG is not analysed
    with catalogue.session() as session:
        states = {s.modality: s.state for s in session.scalars(sa.select(Series))}
    assert states == {"CT": SeriesState.COMPLETE, "SEG": SeriesState.NOT_ANALYSED}
