"""The pipeline stages in one process: no frame of reference, a series prepared ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from pydicom import dcmread

from benchmarks.ingest import write_series
from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import PipelineRun, Result
from node.core.settings import Settings
from node.store.ingest import Ingestor
from node.store.spool import Spool
from node.workflow.completion import CompletionWatcher
from pipelines.jobs.runtime import Runtime, run_key_for
from pipelines.jobs.stages import analyse, prepare, prepared_folder, report
from pipelines.model import preprocess
from pipelines.model.inference import analyse_series
from pipelines.model.prepared import load_prepared, prepare_series
from pipelines.model.preprocess import load_series


def _completed_run(tmp_path: Path, *, frame_of_reference: bool = True) -> tuple[Runtime, int]:
    """A tiny demo node with one received 4-slice CT series, completed into a run."""
    settings = Settings(
        data_dir=tmp_path / "data", archive={"enabled": False}, model={"demo_size": "tiny"}
    )
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    ingestor = Ingestor(Spool(settings.spool_dir, settings.quarantine_dir), catalogue)
    for path in write_series(tmp_path / "series", 4):
        ds = dcmread(path)
        if not frame_of_reference:
            del ds.FrameOfReferenceUID  # seen in the wild, though the CT IOD requires it
        ds.save_as(path)
        assert ingestor.ingest(path.read_bytes(), "CT1").status == 0x0000
    watcher = CompletionWatcher(catalogue, lambda *_: None, run_key_for(settings), 0, 1)
    [run_id] = watcher.complete_quiet_series()
    return Runtime(settings), run_id


def test_series_without_frame_of_reference_gets_an_sr_but_no_seg(tmp_path: Path) -> None:
    runtime, run_id = _completed_run(tmp_path, frame_of_reference=False)
    catalogue = runtime.catalogue
    assert analyse(runtime, run_id)
    assert report(runtime, run_id) == [], "no destination is configured"
    with catalogue.session() as session:
        kinds = sorted(r.kind for r in session.scalars(sa.select(Result)))
        run = session.get(PipelineRun, run_id)
        assert kinds == ["sr"], "the SR is made; a SEG cannot be without a frame of reference"
        assert run.state.value == "succeeded"
        assert [f["head_name"] for f in run.findings["findings"]] == ["body-region"]


def test_stages_executed_again_record_nothing_new(tmp_path: Path) -> None:
    """A redelivered task finds its stage done: no second analysis, SR or result row."""
    runtime, run_id = _completed_run(tmp_path)
    assert prepare(runtime, run_id) and analyse(runtime, run_id)
    with runtime.catalogue.session() as session:
        inferred = session.get(PipelineRun, run_id).inferred_at
    assert prepare(runtime, run_id), "past the prepare stage: go on"
    assert analyse(runtime, run_id), "analysed already: go on to the report"
    assert report(runtime, run_id) == [] and report(runtime, run_id) == []
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        parts = sorted((r.kind, r.part) for r in run.results)
        assert run.inferred_at == inferred and run.state.value == "succeeded"
    assert parts == [("seg", "demo-region-mask"), ("sr", "0"), ("sr", "1")]
    assert len(list(runtime.settings.results_dir.rglob("*.dcm"))) == 3


def test_inference_reads_what_the_prepare_stage_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare decodes (a CPU worker); analyse then decodes nothing and cleans up."""
    runtime, run_id = _completed_run(tmp_path)
    assert prepare(runtime, run_id)
    folder = prepared_folder(runtime, run_id)
    assert (folder / "0" / "pixels.npy").is_file(), "one folder per stack"

    def no_decoding(*_: object) -> None:
        raise AssertionError("the inference stage decoded a prepared series")

    monkeypatch.setattr(preprocess, "_decode", no_decoding)
    assert analyse(runtime, run_id)
    assert not folder.exists(), "prepared pixels are removed once the findings are stored"
    monkeypatch.undo()
    with runtime.catalogue.session() as session:
        stored = session.get(PipelineRun, run_id).findings
        paths = [
            runtime.spool.absolute(i.path)
            for i in session.get(PipelineRun, run_id).series.instances
        ]
    direct = analyse_series(paths, runtime.backbone, runtime.heads, series_instance_uid="x")
    assert [f["probabilities"] for f in stored["findings"][:1]] == [
        list(direct.findings[0].probabilities)
    ]
    assert stored["findings"][0]["key_region"] == list(direct.findings[0].key_region)


def test_prepared_folder_is_whole_or_absent(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "series", 3)
    prepared = prepare_series(paths, tmp_path / "prepared" / "7")
    assert prepared.pixels.shape == (3, 512, 512)
    again = load_prepared(tmp_path / "prepared" / "7")
    assert again is not None and again.plan == prepared.plan
    np.testing.assert_array_equal(np.asarray(again.pixels), load_series(paths).pixels)
    (tmp_path / "prepared" / "7" / "plan.json").unlink()
    assert load_prepared(tmp_path / "prepared" / "7") is None
    with pytest.raises(preprocess.SeriesError):
        prepare_series([tmp_path / "missing.dcm"], tmp_path / "prepared" / "8")
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["7"], "no leftovers"
