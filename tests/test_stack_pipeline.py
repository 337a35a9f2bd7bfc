"""The pipeline stages on multi-frame objects and non-axial stacks, in one process.

Enhanced MR (pydicom's test files) and the real CT as a Legacy Converted Enhanced CT, in
several transfer syntaxes, are received, prepared, analysed and reported by a demo node: the
SR's key image and the SEG's frames reference frames of the multi-frame source, and the
validators pass. A coronal stack resliced from the real CT is analysed by a head whose card
accepts coronal stacks; a localizer series is not analysed, with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import PipelineRun, Result
from node.core.settings import Settings
from node.store.ingest import Ingestor
from node.store.spool import Spool
from node.workflow.completion import CompletionWatcher
from pipelines.findings import findings_from_dict
from pipelines.jobs.runtime import Runtime, run_key_for
from pipelines.jobs.stages import analyse, prepare, report
from tests.support.stacks import legacy_enhanced_ct, resliced, sample
from tests.support.testdata import repaired_ct_series
from tests.support.validators import assert_dciodvfy_clean, assert_pixelmed_sr_clean

pytestmark = pytest.mark.slow


def _received(tmp_path: Path, files: list[Path]) -> tuple[Runtime, int]:
    """A tiny demo node that received ``files`` (one series), completed into a run."""
    settings = Settings(
        data_dir=tmp_path / "data", archive={"enabled": False}, model={"demo_size": "tiny"}
    )
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    ingestor = Ingestor(Spool(settings.spool_dir, settings.quarantine_dir), catalogue)
    for path in files:
        assert ingestor.ingest(path.read_bytes(), "MODALITY").status == 0x0000
    watcher = CompletionWatcher(catalogue, lambda *_: None, run_key_for(settings), 0, 1)
    [run_id] = watcher.complete_quiet_series()
    return Runtime(settings), run_id


def _renamed(source: Path, dest: Path, label: str) -> Path:
    """A copy under new study/series/instance UIDs, pixel data untouched (its syntax kept)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[label, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[label, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[label, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = ds.get("PatientID") or "CURIA-TEST-4711"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


def _results(runtime: Runtime, run_id: int) -> dict[str, list[Dataset]]:
    with runtime.catalogue.session() as session:
        rows = session.scalars(
            sa.select(Result).where(Result.run_id == run_id).order_by(Result.id)
        ).all()
        out: dict[str, list[Dataset]] = {}
        for row in rows:
            out.setdefault(row.kind, []).append(
                pydicom.dcmread(runtime.settings.results_dir / row.path)
            )
    return out


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _frame_references(ds: Dataset, uid: str) -> list[int]:
    """Every ReferencedFrameNumber given with a reference to instance ``uid``."""
    frames = []
    for item in _walk(ds):
        if str(item.get("ReferencedSOPInstanceUID", "")) == uid and "ReferencedFrameNumber" in item:
            value = item.ReferencedFrameNumber
            frames += [int(v) for v in (value if isinstance(value, MultiValue) else [value])]
    return frames


def _analysed(runtime: Runtime, run_id: int) -> PipelineRun:
    assert prepare(runtime, run_id)
    assert analyse(runtime, run_id)
    assert report(runtime, run_id) == [], "no destination is configured"
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        session.expunge(run)
    return run


def _check_frames_referenced(
    runtime: Runtime, run_id: int, source_uid: str, frames: int, *, seg: bool = True
) -> None:
    run = _analysed(runtime, run_id)
    findings = findings_from_dict(run.findings or {})
    assert findings.frames_sorted and set(findings.sop_instance_uids_sorted) == {source_uid}
    results = _results(runtime, run_id)
    assert sorted(results) == (["seg", "sr"] if seg else ["sr"])
    classification = next(
        sr for sr in results["sr"] if "segmentation" not in str(sr.SeriesDescription)
    )
    [body_region] = [f for f in findings.findings if f.head_name == "body-region"]
    assert body_region.key_slice is not None
    key_frames = {
        findings.frame_of(f.key_slice) for f in findings.findings if f.key_slice is not None
    }
    referenced = _frame_references(classification, source_uid)
    assert findings.frame_of(body_region.key_slice) in referenced, "the key frame is referenced"
    assert set(referenced) <= key_frames, "every image reference names a finding's key frame"
    for sr in results["sr"]:
        assert_dciodvfy_clean(sr.filename)
        assert_pixelmed_sr_clean(sr.filename)
    if not seg:
        return
    [segmentation] = results["seg"]
    seg_frames = [
        int(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for group in segmentation.PerFrameFunctionalGroupsSequence
    ]
    assert seg_frames and all(1 <= f <= frames for f in seg_frames)
    mask_finding = next(f for f in findings.findings if f.task == "segmentation")
    if mask_finding.key_slice is not None:
        assert findings.frame_of(mask_finding.key_slice) in seg_frames
    assert_dciodvfy_clean(segmentation.filename)


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"]
)
def test_enhanced_mr_is_analysed_and_results_reference_its_frames(
    tmp_path: Path, name: str
) -> None:
    path = _renamed(sample(name), tmp_path / "in", name)
    runtime, run_id = _received(tmp_path, [path])
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    # these files place no frame in the patient (no plane positions): an SR, no SEG
    _check_frames_referenced(runtime, run_id, uid, 10, seg=False)


def test_enhanced_ct_with_plane_positions_gets_a_seg_on_its_frames(tmp_path: Path) -> None:
    path = _renamed(sample("eCT_Supplemental.dcm"), tmp_path / "in", "ect")
    runtime, run_id = _received(tmp_path, [path])
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    _check_frames_referenced(runtime, run_id, uid, 2)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_legacy_converted_ct_is_analysed_on_its_frames(tmp_path: Path, syntax: str) -> None:
    ct = repaired_ct_series(tmp_path / "ct", f"lce-{syntax}")
    path = legacy_enhanced_ct(ct, tmp_path / "lce", syntax)
    runtime, run_id = _received(tmp_path, [path])
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    _check_frames_referenced(runtime, run_id, uid, 20)


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_non_axial_stack_is_analysed_by_a_head_that_reads_its_plane(
    tmp_path: Path, plane: str
) -> None:
    ct = repaired_ct_series(tmp_path / "ct", f"{plane}-run")
    runtime, run_id = _received(tmp_path, resliced(ct, tmp_path / plane, plane))
    [demo] = runtime.heads
    demo.card = demo.card.model_copy(update={"planes": ["axial", plane]})
    runtime.__dict__["mask_heads"] = []
    run = _analysed(runtime, run_id)
    assert run.state.value == "succeeded"
    [sr] = _results(runtime, run_id)["sr"]
    assert_dciodvfy_clean(sr.filename)


def test_coronal_stack_no_head_reads_is_not_analysed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not analysed is an outcome, not a failure: no error logged, one INFO line."""
    ct = repaired_ct_series(tmp_path / "ct", "coronal-skip")
    runtime, run_id = _received(tmp_path, resliced(ct, tmp_path / "coronal", "coronal"))
    assert prepare(runtime, run_id)
    with caplog.at_level(logging.INFO):
        assert not analyse(runtime, run_id)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    said = [r.getMessage() for r in caplog.records if "not analysed" in r.getMessage()]
    assert len(said) == 1 and "every head is axial-only" in said[0], said
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        assert run.state.value == "not_analysed"
        assert run.series.state.value == "not_analysed"
        assert "coronal stack, every head is axial-only" in str(run.series.state_reason)
    assert _results(runtime, run_id) == {}


def test_an_object_holding_two_stacks_gets_results_per_stack(tmp_path: Path) -> None:
    """One Legacy Converted Enhanced CT whose frames form two stacks (Stack ID 1 and 2)."""
    ct = repaired_ct_series(tmp_path / "ct", "two-stacks")
    path = legacy_enhanced_ct(ct, tmp_path / "lce", ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if "FrameContentSequence" not in group:
            group.FrameContentSequence = [Dataset()]
        content = group.FrameContentSequence[0]
        content.StackID = str(1 + n % 2)
        content.InStackPositionNumber = 1 + n // 2
    ds.save_as(path)
    uid = str(ds.SOPInstanceUID)
    runtime, run_id = _received(tmp_path, [path])
    run = _analysed(runtime, run_id)
    assert run.state.value == "succeeded"
    findings = findings_from_dict(run.findings or {})
    stacks = sorted({f.stack for f in findings.findings})
    assert len(stacks) == 2 and all("stack 1" in s or "stack 2" in s for s in stacks), stacks
    assert sorted(f.head_name for f in findings.findings) == [
        "body-region",
        "body-region",
        "demo-region-mask",
        "demo-region-mask",
    ]
    assert sorted(findings.frames_sorted) == list(range(1, 21))
    assert sorted(findings.stacks.values()) == [[0, 10], [10, 20]]
    for f in findings.findings:  # each key slice lies in the stack its head read
        assert f.key_slice is None or f.key_slice in findings.slices_of(f.stack)
    results = _results(runtime, run_id)
    assert len(results["seg"]) == 2, "one SEG per stack"
    for seg, parity in zip(results["seg"], (1, 0), strict=True):
        frames = {
            int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for g in seg.PerFrameFunctionalGroupsSequence
        }
        assert frames and {f % 2 for f in frames} == {parity}, "a SEG covers its stack only"
        assert_dciodvfy_clean(seg.filename)
    for sr in results["sr"]:
        assert _frame_references(sr, uid) or "segmentation" in str(sr.SeriesDescription)
        assert_dciodvfy_clean(sr.filename)
