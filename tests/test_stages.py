"""The pipeline stages in one process: what a series without a frame of reference gets."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from pydicom import dcmread

from benchmarks.ingest import write_series
from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import PipelineRun, Result
from node.completion import CompletionWatcher
from node.ingest import Ingestor
from node.settings import Settings
from node.storage import Spool
from pipelines.runtime import Runtime, run_key_for
from pipelines.stages import analyse, report


def test_series_without_frame_of_reference_gets_an_sr_but_no_seg(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", archive={"enabled": False}, model={"demo_size": "tiny"}
    )
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    ingestor = Ingestor(Spool(settings.spool_dir, settings.quarantine_dir), catalogue)
    for path in write_series(tmp_path / "series", 4):
        ds = dcmread(path)
        del ds.FrameOfReferenceUID  # seen in the wild, though the CT IOD requires it
        ds.save_as(path)
        assert ingestor.ingest(path.read_bytes(), "CT1").status == 0x0000

    watcher = CompletionWatcher(catalogue, lambda *_: None, run_key_for(settings), 0, 1)
    [run_id] = watcher.complete_quiet_series()
    runtime = Runtime(settings)
    assert analyse(runtime, run_id)
    assert report(runtime, run_id) == [], "no destination is configured"
    with catalogue.session() as session:
        kinds = sorted(r.kind for r in session.scalars(sa.select(Result)))
        run = session.get(PipelineRun, run_id)
        assert kinds == ["sr"], "the SR is made; a SEG cannot be without a frame of reference"
        assert run.state.value == "succeeded"
        assert [f["head_name"] for f in run.findings["findings"]] == ["body-region"]
