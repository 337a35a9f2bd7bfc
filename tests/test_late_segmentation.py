"""Segmentations and study completion: waiting for one, and re-running for a late one.

A real catalogue (SQLite) and spool; the watcher completes series as the node's does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import PipelineRun, RunState, Series, SeriesState
from node.core.settings import CompletionSettings
from node.workflow.completion import CompletionWatcher
from node.workflow.routing import Router
from tests.support.series_rows import CT, NOW, add_series, header

FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def _analysed(catalogue: Catalogue, spool: Path, study: str, findings: dict) -> str:
    """An image series already analysed (done), its run's findings as given."""
    image = header(CT, FrameOfReferenceUID=FRAME_OF_REFERENCE)
    uid = add_series(
        catalogue, spool, [image], ae=None, study=study, ago=600, state=SeriesState.DONE
    )
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        session.add(
            PipelineRun(series=series, run_key=uid, state=RunState.SUCCEEDED, findings=findings)
        )
    return uid


def _seg(image_uid: str, *, by_series: bool = True) -> Dataset:
    seg = header(SegmentationStorage, Modality="SEG", FrameOfReferenceUID=FRAME_OF_REFERENCE)
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
    add_series(
        catalogue,
        tmp_path,
        [_seg(image, by_series=by_series)],
        ae=None,
        study="1.1",
        ago=60,
        modality="SEG",
    )
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
    add_series(catalogue, tmp_path, [seg], ae=None, study="2.1", ago=60, modality="SEG")
    assert _watcher(catalogue, tmp_path).complete_quiet_series(NOW) == []
    assert _reruns(catalogue, read) == []

    appended = _analysed(catalogue, tmp_path, "2.2", WANTED)
    add_series(catalogue, tmp_path, [_seg(appended)], ae=None, study="2.2", ago=60, modality="SEG")
    policy = _watcher(catalogue, tmp_path, late_instances="append")
    assert policy.complete_quiet_series(NOW) == []
    assert _reruns(catalogue, appended) == []


def test_required_series_makes_the_study_wait_for_its_segmentation(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    image = header(CT, FrameOfReferenceUID=FRAME_OF_REFERENCE)
    uid = add_series(catalogue, tmp_path, [image], ae=None, study="3.1", ago=60)
    w = _watcher(catalogue, tmp_path, required_series=[{"sop_class": "SegmentationStorage"}])
    assert w.complete_quiet_series(NOW) == []
    add_series(catalogue, tmp_path, [_seg(uid)], ae=None, study="3.1", ago=30, modality="SEG")
    assert len(w.complete_quiet_series(NOW)) == 1  # the CT's run; the SEG is not analysed
    with catalogue.session() as session:
        states = {s.modality: s.state for s in session.scalars(sa.select(Series))}
    assert states == {"CT": SeriesState.COMPLETE, "SEG": SeriesState.NOT_ANALYSED}
