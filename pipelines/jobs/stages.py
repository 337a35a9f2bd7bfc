"""The pipeline's stages: prepare and analyse a series, report it, dispatch the results.

Each stage takes a catalogue id, CLAIMS its work (:mod:`node.workflow.runs` for a run,
:mod:`node.delivery.deliveries` for a delivery), does its one job, and records the outcome
only while it still holds the claim. A second execution of the same stage (a redelivered
task after a worker was killed, a time-out) finds the work held by a live worker
(:class:`StageBusy`: retry later, by then it is done) or done (go on to the next stage),
so one run gets one analysis, one set of results and one send per delivery. A dead
worker's claim runs out and is taken over, and the work finishes.

SR and SEG UIDs derive from the run key, so whatever a taken-over stage writes again is
the same object under the same name. The Celery bindings are in :mod:`pipelines.jobs.tasks`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.claims import keep_alive
from node.catalogue.models import Instance, PipelineRun, Result
from node.delivery import deliveries
from node.delivery.transport import DispatchError
from node.workflow import runs
from node.workflow.routing import first_header
from pipelines.findings import (
    SEGMENTATION_TASK,
    SeriesFindings,
    SeriesMask,
    findings_from_dict,
    findings_to_dict,
)
from pipelines.jobs.runtime import Runtime

if TYPE_CHECKING:
    from pipelines.model.masks import MaskHead

log = logging.getLogger(__name__)

#: How soon a stage that found its work held by another execution looks again.
BUSY_RETRY_SECONDS = 2.0


class StageBusy(Exception):
    """Another execution of this stage holds the work and is alive: try again later, by
    when it has finished (and this execution finds it done) or died (and its claim ran
    out)."""

    def __init__(self, what: str, retry_in: float = BUSY_RETRY_SECONDS) -> None:
        super().__init__(f"{what} is held by another execution")
        self.retry_in = retry_in


class StageFailed(Exception):
    """The stage failed while holding its run; the run is failed and the error recorded."""


def fail_run(runtime: Runtime, run_id: int, error: str) -> None:
    """Fail a run whose stage broke before it held a claim (the catalogue, say)."""
    runs.fail(runtime.catalogue, run_id, error)
    discard_prepared(runtime, run_id)


@contextmanager
def _holding(runtime: Runtime, held: runs.RunClaim) -> Iterator[None]:
    """Keep the claim alive while the stage works; an error fails the run (only while the
    claim is still ours) and is raised again as :class:`StageFailed`."""
    try:
        with keep_alive(lambda: runs.renew(runtime.catalogue, held)):
            yield
    except Exception as exc:
        runs.fail(runtime.catalogue, held.run_id, f"{type(exc).__name__}: {exc}", held)
        discard_prepared(runtime, held.run_id)
        raise StageFailed(f"run {held.run_id}: {held.stage} failed: {exc}") from exc


def _claim(runtime: Runtime, run_id: int, stage: runs.Stage) -> runs.RunClaim:
    held = runs.claim(runtime.catalogue, run_id, stage)
    if held.outcome is runs.Claimed.BUSY:
        raise StageBusy(f"run {run_id} ({stage})")
    return held


def _run(session: Session, run_id: int) -> PipelineRun:
    """A run this stage holds a claim on (and so exists)."""
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    return run


def prepared_folder(runtime: Runtime, run_id: int) -> Path:
    """Where a run's series is decoded ahead of inference (data folder, shared by workers)."""
    return runtime.settings.data_path / "prepared" / str(run_id)


def _instance_paths(runtime: Runtime, session: Session, series_id: int) -> list[Path]:
    """The series' files, in catalogue order (the first is the one routing rules read)."""
    rows = session.scalars(
        select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)
    ).all()
    return [runtime.spool.absolute(path) for path in rows]


def prepare(runtime: Runtime, run_id: int) -> bool:
    """Decode the run's series on a CPU worker, so the inference worker only embeds it.

    False when there is nothing to do (unknown or failed run); True when the run is ready
    for analysis (decoded here, or already past this stage).
    """
    from pipelines.model.prepared import load_prepared, prepare_series

    held = _claim(runtime, run_id, "prepare")
    if held.outcome is not runs.Claimed.CLAIMED:
        return held.outcome is runs.Claimed.DONE
    with _holding(runtime, held):
        with runtime.catalogue.session() as session:
            series_id = _run(session, run_id).series_id
            paths = _instance_paths(runtime, session, series_id)
        folder = prepared_folder(runtime, run_id)
        if load_prepared(folder) is None:
            started = time.perf_counter()
            prepare_series(paths, folder)
            log.info(
                "run %d: %d slices decoded in %.2f s",
                run_id,
                len(paths),
                time.perf_counter() - started,
            )
    runs.release(runtime.catalogue, held)
    return True


def discard_prepared(runtime: Runtime, run_id: int) -> None:
    shutil.rmtree(prepared_folder(runtime, run_id), ignore_errors=True)


def analyse(runtime: Runtime, run_id: int) -> bool:
    """Run the backbone and heads on the run's series; False if there is nothing (more)
    for this execution to do, True when the report is next.

    Mask heads also produce a SEG here, while the mask is in memory; the SEG's result row is
    recorded with the findings, so a crash leaves either both or neither.
    """
    from pipelines.model.heads import heads_for
    from pipelines.model.inference import analyse_series_and_masks
    from pipelines.model.prepared import load_prepared

    held = _claim(runtime, run_id, "analyse")
    if held.outcome is runs.Claimed.DONE:
        discard_prepared(runtime, run_id)
        return True  # inferred before: go on to the report
    if held.outcome is not runs.Claimed.CLAIMED:
        return False
    with _holding(runtime, held):
        with runtime.catalogue.session() as session:
            run = _run(session, run_id)
            series = run.series
            paths = _instance_paths(runtime, session, series.id)
            run_key, series_uid, modality = run.run_key, series.series_instance_uid, series.modality
            chosen = ((series.routing or {}).get("attributes") or {}).get("heads")
        started = time.perf_counter()
        heads = heads_for(runtime.heads, modality)
        mask_heads = runtime.mask_heads
        if chosen is not None:  # a routing rule named the heads to run
            heads = [head for head in heads if head.name in chosen]
            mask_heads = [head for head in mask_heads if head.name in chosen]
        headers: list[Dataset] = []
        if mask_heads:
            # A SEG must share its source images' frame of reference: for a series without
            # FrameOfReferenceUID (non-conformant, but seen) there is no SEG, the SR is made.
            headers = [dcmread(path, stop_before_pixels=True) for path in paths]
            if any(not h.get("FrameOfReferenceUID") for h in headers):
                log.warning("run %d: no SEG: the series has no FrameOfReferenceUID", run_id)
                mask_heads = []
        # decoded by a CPU worker when the prepare stage ran; decoded here otherwise
        source = load_prepared(prepared_folder(runtime, run_id)) or paths
        findings, masks = analyse_series_and_masks(
            source,
            runtime.backbone,
            heads,
            series_instance_uid=series_uid,
            batch_size=runtime.settings.model.batch_size,
            mask_heads=mask_heads,
        )
        segs = [
            (mask.finding, head, _write_seg(runtime, headers, mask, head, run_key))
            for head, mask in zip(mask_heads, masks, strict=True)
        ]
        findings.findings.extend(finding for finding, _, _ in segs)
        log.info(
            "run %d: %d slices analysed in %.2f s",
            run_id,
            len(paths),
            time.perf_counter() - started,
        )
        with runtime.catalogue.session() as session:
            recorded = runs.record_inferred(
                session,
                held,
                findings_to_dict(findings),
                backbone=f"{findings.model.name} {findings.model.version}",
                heads=", ".join(f"{f.head_name} {f.head_version}" for f in findings.findings),
                results=[
                    runs.ResultFile(
                        kind="seg",
                        part=head.name,
                        sop_instance_uid=seg.SOPInstanceUID,
                        series_instance_uid=seg.SeriesInstanceUID,
                        path=_relative(seg),
                        summary=f"{finding.head_name}: segmentation",
                    )
                    for finding, head, seg in segs
                ],
            )
        del source  # the memory map, before its file goes
    if not recorded:
        log.warning("run %d: analysed, but another execution had taken the run over", run_id)
        return False
    discard_prepared(runtime, run_id)
    return True


def _relative(ds: Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _write_seg(
    runtime: Runtime, headers: list[Dataset], mask: SeriesMask, head: MaskHead, run_key: str
) -> Dataset:
    """Write one mask head's SEG into the results folder; return it."""
    from pipelines.reporting.files import write_dataset
    from pipelines.reporting.seg import build_seg

    seg = build_seg(
        headers, mask, head, runtime.device_identity, uid_key=f"{run_key}:seg:{head.name}"
    )
    path = runtime.settings.results_dir / _relative(seg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(seg, path)
    return seg


def report(runtime: Runtime, run_id: int) -> list[int]:
    """Write the run's SRs and create every result's deliveries; return ids to send.

    Series-level heads and mask heads go into two SRs of one results series (a mask head's
    group references its SEG segment); both SRs are recorded together with the run's new
    state and its deliveries. Found done already (a redelivered task), it returns the
    deliveries never tried, in case the first execution died before queueing them.
    """
    held = _claim(runtime, run_id, "report")
    if held.outcome is runs.Claimed.DONE:
        with runtime.catalogue.session() as session:
            return deliveries.never_tried(session, run_id)
    if held.outcome is not runs.Claimed.CLAIMED:
        return []
    with _holding(runtime, held):
        with runtime.catalogue.session() as session:
            run = _run(session, run_id)
            findings = findings_from_dict(run.findings or {})
            series_id = run.series_id
        if not findings.findings:  # no head applies to this series: nothing to report
            return _report_nothing(runtime, held, series_id)
        sources = _write_srs(runtime, held, findings)
        with runtime.catalogue.session() as session:
            if not runs.record_reported(session, held, sources.results):
                log.warning("run %d: reported, but another execution had taken it over", run_id)
                return []
            run = _run(session, run_id)
            decision = runtime.router.decide(session, run.series, run.findings, sources.header)
            delivery_ids = deliveries.create_forwards(session, series_id, decision.forward)
            destinations = [*runtime.result_destinations(), *decision.results_to]
            results = session.scalars(select(Result).where(Result.run_id == run_id)).all()
            delivery_ids += deliveries.create_for_results(
                session, results, dict.fromkeys(destinations), decision.results_to
            )
            runs.finish_if_delivered(session, run_id)
    return delivery_ids


def _report_nothing(runtime: Runtime, held: runs.RunClaim, series_id: int) -> list[int]:
    """A run whose series no head applies to: routed on its attributes, and finished."""
    with runtime.catalogue.session() as session:
        series = _run(session, held.run_id).series
        header = first_header(session, runtime.settings.spool_dir, series)
    with runtime.catalogue.session() as session:
        if not runs.finish_empty(session, held):
            return []
        run = _run(session, held.run_id)
        decision = runtime.router.decide(session, run.series, run.findings, header)
        return deliveries.create_forwards(session, series_id, decision.forward)


@dataclass(frozen=True)
class _Written:
    """The SRs a report stage wrote, and the source header its routing reads."""

    results: list[runs.ResultFile]
    header: Dataset | None


def _write_srs(runtime: Runtime, held: runs.RunClaim, findings: SeriesFindings) -> _Written:
    """Build and write the run's SRs (one per part of the findings, each in its own
    series: viewers such as OHIF show one SR per series). The source headers are read
    once, here; the first goes on to the routing rules."""
    from pipelines.reporting.document import build_sr, split_findings
    from pipelines.reporting.files import write_dataset

    with runtime.catalogue.session() as session:
        run = _run(session, held.run_id)
        run_key = run.run_key
        paths = _instance_paths(runtime, session, run.series_id)
        seg_paths = session.scalars(
            select(Result.path)
            .where(Result.run_id == held.run_id, Result.kind == "seg")
            .order_by(Result.id)
        ).all()
        superseded = _superseded_report(runtime, session, run)
    sources = [dcmread(path, stop_before_pixels=True) for path in paths]
    segs = [
        dcmread(runtime.settings.results_dir / path, stop_before_pixels=True) for path in seg_paths
    ]
    written = []
    for n, part in enumerate(split_findings(findings)):
        is_mask_part = any(f.task == SEGMENTATION_TASK for f in part.findings)
        sr = build_sr(
            sources,
            part,
            runtime.templates,
            runtime.device_identity,
            series_number=9903 if is_mask_part else 9901,
            series_description=(
                "Curia AI segmentation report" if is_mask_part else "Curia AI results"
            ),
            supersedes=superseded,
            segmentations=segs if is_mask_part else (),
            uid_key=f"{run_key}:sr:{n}",
        )
        relative = _relative(sr)
        path = runtime.settings.results_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dataset(sr, path)
        written.append(
            runs.ResultFile(
                kind="sr",
                part=str(n),
                sop_instance_uid=sr.SOPInstanceUID,
                series_instance_uid=sr.SeriesInstanceUID,
                path=relative,
                summary=_summary(part),
            )
        )
    return _Written(written, sources[0] if sources else None)


def _summary(findings: SeriesFindings) -> str:
    return "; ".join(
        f"{f.head_name}: segmentation"
        if f.task == SEGMENTATION_TASK
        else f"{f.head_name}: {f.predicted.name} ({f.probabilities[f.predicted_index]:.0%})"
        for f in findings.findings
    )


def _superseded_report(runtime: Runtime, session: Session, run: PipelineRun) -> Dataset | None:
    """For a requested re-run: the header of the SR it replaces, so the new SR cites it."""
    if run.rerun_of is None:
        return None
    earlier = session.scalars(
        select(Result).where(Result.run_id == run.rerun_of, Result.kind == "sr").order_by(Result.id)
    ).first()
    if earlier is None:
        return None
    return dcmread(runtime.settings.results_dir / earlier.path, stop_before_pixels=True)


def dispatch(runtime: Runtime, delivery_id: int, max_attempts: int) -> deliveries.Failure | None:
    """Send one result, or a forwarded series, to one destination, once.

    None when it was sent (here or before) or there is nothing to send; the failure as
    recorded when sending failed (to be retried, or dead-lettered after ``max_attempts``).
    A forwarded series is sent whole, from the spool, in one association.
    """
    catalogue = runtime.catalogue
    held = deliveries.claim(catalogue, delivery_id)
    if held.outcome is deliveries.Claimed.BUSY:
        raise StageBusy(f"delivery {delivery_id}")
    if held.outcome is not deliveries.Claimed.CLAIMED:
        return None
    if held.result_path is not None:
        paths = [runtime.settings.results_dir / held.result_path]
    else:
        paths = [runtime.spool.absolute(path) for path in held.series_paths]
    try:
        destination = runtime.destinations().get(held.destination)
        if destination is None:
            raise DispatchError(f"destination {held.destination!r} is no longer configured")
        with keep_alive(lambda: deliveries.renew(catalogue, held)):
            destination.send(paths)
    except (DispatchError, OSError) as exc:
        with catalogue.session() as session:
            failure = deliveries.record_failure(session, held, str(exc), max_attempts)
            if failure is not None and failure.final:
                runs.fail_delivery(session, failure.run_id, failure.destination, str(exc))
        return failure
    except BaseException:
        deliveries.release(catalogue, held)
        raise
    with catalogue.session() as session:
        runs.finish_if_delivered(session, deliveries.mark_sent(session, held))
    return None
