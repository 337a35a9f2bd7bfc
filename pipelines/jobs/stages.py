"""The pipeline's stages: analyse a series, report it, dispatch the results.

Each stage takes a catalogue id, does its one job, and records the outcome. Every stage
first checks what is already recorded, so a redelivered task (after a worker was killed)
finishes the work instead of repeating it: one run, one set of results, one delivery each.
The Celery bindings are in :mod:`pipelines.jobs.tasks`.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.catalogue.models import (
    Delivery,
    DeliveryState,
    Instance,
    PipelineRun,
    Result,
    RunState,
    Series,
    SeriesState,
)
from node.core.metrics import DELIVERY_FAILURES
from node.delivery.transport import DispatchError
from node.workflow.routing import forward_deliveries
from pipelines.findings import SeriesFindings, findings_from_dict, findings_to_dict
from pipelines.jobs.runtime import Runtime
from pipelines.reporting.sr import SEGMENTATION_TASK

if TYPE_CHECKING:
    from pipelines.model.segmentation import MaskHead, SeriesMask

log = logging.getLogger(__name__)


def fail_run(runtime: Runtime, run_id: int, error: str) -> None:
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None:
            return
        run.state = RunState.FAILED
        run.error = error[:2000]
        run.finished_at = datetime.now(UTC)
        run.series.state = SeriesState.FAILED
    discard_prepared(runtime, run_id)


def prepared_folder(runtime: Runtime, run_id: int) -> Path:
    """Where a run's series is decoded ahead of inference (data folder, shared by workers)."""
    return runtime.settings.data_path / "prepared" / str(run_id)


def prepare(runtime: Runtime, run_id: int) -> bool:
    """Decode the run's series on a CPU worker, so the inference worker only embeds it.

    False when there is nothing to do (unknown or failed run). Decoding again after a
    crash is harmless: the folder appears whole or not at all.
    """
    from pipelines.model.preprocess import load_prepared, prepare_series

    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.state == RunState.FAILED:
            return False
        if run.findings is not None:
            return True  # inferred before a crash: nothing to decode
        rows = session.scalars(select(Instance).where(Instance.series_id == run.series_id)).all()
        paths = [runtime.spool.absolute(row.path) for row in rows]
    folder = prepared_folder(runtime, run_id)
    if load_prepared(folder) is None:
        started = time.perf_counter()
        prepare_series(paths, folder)
        log.info(
            "run %d: %d slices decoded in %.2f s", run_id, len(paths), time.perf_counter() - started
        )
    return True


def discard_prepared(runtime: Runtime, run_id: int) -> None:
    shutil.rmtree(prepared_folder(runtime, run_id), ignore_errors=True)


def analyse(runtime: Runtime, run_id: int) -> bool:
    """Run the backbone and heads on the run's series; False if there is nothing to do.

    Mask heads also produce a SEG here, while the mask is in memory; the SEG's result row is
    committed with the findings, so a crash leaves either both or neither.
    """
    from pipelines.model.heads import heads_for
    from pipelines.model.inference import analyse_series_and_masks
    from pipelines.model.preprocess import load_prepared

    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.state == RunState.FAILED:
            return False
        if run.findings is not None:
            discard_prepared(runtime, run_id)
            return True  # inferred before a crash: go on to the report
        series: Series = run.series
        rows = session.scalars(select(Instance).where(Instance.series_id == series.id)).all()
        paths = [runtime.spool.absolute(row.path) for row in rows]
        series_uid = series.series_instance_uid
        modality = series.modality
        chosen = ((series.routing or {}).get("attributes") or {}).get("heads")
        run.state = RunState.RUNNING
        run.started_at = datetime.now(UTC)
        series.state = SeriesState.PROCESSING
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
    segmentations = [
        (mask.finding, _write_seg(runtime, headers, mask, head))
        for head, mask in zip(mask_heads, masks, strict=True)
    ]
    findings.findings.extend(finding for finding, _ in segmentations)
    log.info(
        "run %d: %d slices analysed in %.2f s", run_id, len(paths), time.perf_counter() - started
    )
    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        run.findings = findings_to_dict(findings)
        run.backbone = f"{findings.model.name} {findings.model.version}"
        run.heads = ", ".join(f"{f.head_name} {f.head_version}" for f in findings.findings)
        run.inferred_at = datetime.now(UTC)
        for finding, seg in segmentations:
            session.add(
                Result(
                    run=run,
                    kind="seg",
                    sop_instance_uid=seg.SOPInstanceUID,
                    series_instance_uid=seg.SeriesInstanceUID,
                    path=_relative(seg),
                    summary=f"{finding.head_name}: segmentation",
                )
            )
    del source  # the memory map, before its file goes
    discard_prepared(runtime, run_id)
    return True


def _relative(ds: Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _write_seg(
    runtime: Runtime, headers: list[Dataset], mask: SeriesMask, head: MaskHead
) -> Dataset:
    """Write one mask head's SEG into the results folder; return it."""
    from pipelines.model.segmentation import build_seg
    from pipelines.reporting.sr import write_sr

    seg = build_seg(headers, mask, head, runtime.device_identity)
    path = runtime.settings.results_dir / _relative(seg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sr(seg, path)
    return seg


def report(runtime: Runtime, run_id: int) -> list[int]:
    """Write the run's SRs (once) and create every result's deliveries; return ids to send.

    Series-level heads and mask heads go into two SRs of one results series (a mask head's
    group references its SEG segment); both SRs are written and catalogued together.
    """
    from pipelines.reporting.sr import build_sr, split_findings, write_sr

    with runtime.catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.findings is None:
            return []
        existing = session.scalars(select(Result).where(Result.run_id == run_id)).all()
        findings = findings_from_dict(run.findings)
        if not findings.findings:  # no head applies to this series: nothing to report
            decision = runtime.router.decide(session, run.series, run.findings)
            _finish(run)
            return forward_deliveries(session, run.series, decision)
        if not any(result.kind == "sr" for result in existing):
            rows = session.scalars(
                select(Instance).where(Instance.series_id == run.series_id)
            ).all()
            sources = [
                dcmread(runtime.spool.absolute(row.path), stop_before_pixels=True) for row in rows
            ]
            segs = [
                dcmread(runtime.settings.results_dir / r.path, stop_before_pixels=True)
                for r in existing
                if r.kind == "seg"
            ]
            # Each SR in its own series: viewers such as OHIF show one SR per series.
            for part in split_findings(findings):
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
                    supersedes=_superseded_report(runtime, session, run),
                    segmentations=segs if is_mask_part else (),
                )
                relative = _relative(sr)
                path = runtime.settings.results_dir / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                write_sr(sr, path)
                session.add(
                    Result(
                        run=run,
                        kind="sr",
                        sop_instance_uid=sr.SOPInstanceUID,
                        series_instance_uid=sr.SeriesInstanceUID,
                        path=relative,
                        summary=_summary(part),
                    )
                )
            session.flush()
        run.state = RunState.REPORTED
        decision = runtime.router.decide(session, run.series, run.findings)
        delivery_ids = forward_deliveries(session, run.series, decision)
        destinations = list(dict.fromkeys([*runtime.result_destinations(), *decision.results_to]))
        results = session.scalars(select(Result).where(Result.run_id == run_id)).all()
        for result in results:
            for name in destinations:
                delivery = session.scalar(
                    select(Delivery).where(
                        Delivery.result_id == result.id, Delivery.destination == name
                    )
                )
                if delivery is None:
                    delivery = Delivery(
                        result=result, destination=name, rule=decision.results_to.get(name)
                    )
                    session.add(delivery)
                    session.flush()
                if delivery.state == DeliveryState.PENDING:
                    delivery_ids.append(delivery.id)
        if not _pending_results(run):
            _finish(run)
    return delivery_ids


def _pending_results(run: PipelineRun) -> bool:
    return any(d.state != DeliveryState.SENT for r in run.results for d in r.deliveries)


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


def _finish(run: PipelineRun) -> None:
    run.state = RunState.SUCCEEDED
    run.finished_at = datetime.now(UTC)
    run.series.state = SeriesState.DONE


def dispatch(runtime: Runtime, delivery_id: int) -> None:
    """Send one result, or a forwarded series, to one destination; raise DispatchError to
    be retried. A forwarded series is sent whole, from the spool, in one association."""
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return
        destination = runtime.destinations().get(delivery.destination)
        if delivery.result is not None:
            paths = [runtime.settings.results_dir / delivery.result.path]
        else:
            rows = session.scalars(
                select(Instance)
                .where(Instance.series_id == delivery.series_id)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
            paths = [runtime.spool.absolute(row.path) for row in rows]
        delivery.attempts += 1
    if destination is None:
        raise DispatchError(f"destination {delivery.destination!r} is no longer configured")
    destination.send(paths)
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        delivery.state = DeliveryState.SENT
        delivery.sent_at = datetime.now(UTC)
        delivery.last_error = None
        if delivery.result is not None and not _pending_results(delivery.result.run):
            _finish(delivery.result.run)


def record_delivery_failure(
    runtime: Runtime, delivery_id: int, error: str, max_attempts: int
) -> tuple[int, bool]:
    """Record a failed send; return (attempts so far, whether it is now dead-lettered)."""
    with runtime.catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return 0, True
        DELIVERY_FAILURES.labels(delivery.destination).inc()
        delivery.last_error = error[:2000]
        final = delivery.attempts >= max_attempts
        if final:
            delivery.state = DeliveryState.FAILED
            if delivery.result is not None:
                delivery.result.run.state = RunState.FAILED
                delivery.result.run.error = f"delivery to {delivery.destination} failed: {error}"
        return delivery.attempts, final
