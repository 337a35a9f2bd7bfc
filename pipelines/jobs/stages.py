"""The pipeline's stages: prepare and analyse a series, report it, dispatch the results.

Each stage takes a catalogue id, CLAIMS its work (:mod:`node.workflow.runs` for a run,
:mod:`node.delivery.deliveries` for a delivery), does its one job, and records the outcome
only while it still holds the claim. A second execution of the same stage (a redelivered
task after a worker was killed, a time-out) finds the work held by a live worker
(:class:`StageBusy`: retry later, by then it is done) or done (go on to the next stage),
so one run gets one analysis, one set of results and one send per delivery. A dead
worker's claim runs out and is taken over, and the work finishes.

A series none of whose stacks any head accepts (a localizer, a stack in a plane no head
reads) ends its run "not analysed" in the prepare or analyse stage, with the reasons: an
outcome, not a failure, so nothing is retried or logged as an error.

SR and SEG UIDs derive from the run key, so whatever a taken-over stage writes again is
the same object under the same name. The Celery bindings are in :mod:`pipelines.jobs.tasks`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Sequence
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
from node.core.logs import warnings_summarised
from node.delivery import deliveries
from node.delivery.transport import DispatchError
from node.workflow import runs
from node.workflow.routing import first_header
from node.workflow.segmentations import study_segmentations
from pipelines.findings import (
    SEGMENTATION_TASK,
    HeadFinding,
    NotAnalysed,
    SeriesFindings,
    SeriesMask,
    findings_from_dict,
    findings_to_dict,
)
from pipelines.jobs.runtime import Runtime
from pipelines.jobs.study_masks import StudyMasks

if TYPE_CHECKING:
    from pipelines.model.masks import MaskHead
    from pipelines.model.series_plan import PreparedSeries
    from pipelines.model.stack_analysis import StackMask

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
    claim is still ours) and is raised again as :class:`StageFailed`. :class:`NotAnalysed`
    is no error: it passes through, for the stage to record."""
    try:
        with keep_alive(lambda: runs.renew(runtime.catalogue, held)):
            yield
    except NotAnalysed:
        raise
    except Exception as exc:
        runs.fail(runtime.catalogue, held.run_id, f"{type(exc).__name__}: {exc}", held)
        discard_prepared(runtime, held.run_id)
        raise StageFailed(f"run {held.run_id}: {held.stage} failed: {exc}") from exc


def _not_analysed(runtime: Runtime, held: runs.RunClaim, outcome: NotAnalysed) -> None:
    """End the run as not analysed: no head applies to any stack of its series. Its
    forwards were decided when the series completed; nothing is reported."""
    discard_prepared(runtime, held.run_id)
    with runtime.catalogue.session() as session:
        runs.not_analysed(session, held, outcome.reason)


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
    """Decode the run's stacks on a CPU worker, so the inference worker only embeds them.

    False when there is nothing to do (unknown or failed run, or a series with no stack
    Curia can read: the run is then not analysed); True when the run is ready for analysis
    (decoded here, or already past this stage). Every stack is decoded, one folder each;
    which heads accept which stack is the analysis' choice.
    """
    from pipelines.model.prepared import load_prepared, prepare_plan
    from pipelines.model.stacks import plan_stacks

    held = _claim(runtime, run_id, "prepare")
    if held.outcome is not runs.Claimed.CLAIMED:
        return held.outcome is runs.Claimed.DONE
    try:
        with _holding(runtime, held), warnings_summarised(f"series of run {run_id}"):
            with runtime.catalogue.session() as session:
                series_id = _run(session, run_id).series_id
                paths = _instance_paths(runtime, session, series_id)
            planned = plan_stacks(paths)
            if not planned.stacks:
                raise planned.not_analysed()
            started = time.perf_counter()
            for index, plan in enumerate(planned.stacks):
                folder = prepared_folder(runtime, run_id) / str(index)
                if load_prepared(folder, expected=plan) is None:
                    prepare_plan(plan, folder)
            log.info(
                "run %d: %d slices of %d stack(s) decoded in %.2f s",
                run_id,
                sum(len(plan) for plan in planned.stacks),
                len(planned.stacks),
                time.perf_counter() - started,
            )
    except NotAnalysed as outcome:
        _not_analysed(runtime, held, outcome)
        return False
    runs.release(runtime.catalogue, held)
    return True


def discard_prepared(runtime: Runtime, run_id: int) -> None:
    shutil.rmtree(prepared_folder(runtime, run_id), ignore_errors=True)


def analyse(runtime: Runtime, run_id: int) -> bool:
    """Run the backbone and heads on the run's stacks; False if there is nothing (more)
    for this execution to do, True when the report is next.

    Each stack of the series gets the heads whose cards accept it (plane, modality, slice
    count); a series none of whose stacks any head accepts is not analysed, with the
    reasons. Heads whose mask is a segment of the study's SEG or RTSTRUCT objects (named by
    their card or a routing rule's ``mask_segments``) get it placed on each stack. Mask
    heads also produce a SEG per stack here, while the mask is in memory; the SEG's result
    row is recorded with the findings, so a crash leaves either both or neither.
    """
    from pipelines.model.heads import heads_for
    from pipelines.model.prepared import load_prepared
    from pipelines.model.stack_analysis import StackUnit, analyse_units, plan_units

    held = _claim(runtime, run_id, "analyse")
    if held.outcome is runs.Claimed.DONE:
        discard_prepared(runtime, run_id)
        return True  # inferred before: go on to the report
    if held.outcome is not runs.Claimed.CLAIMED:
        return False
    try:
        with _holding(runtime, held), warnings_summarised(f"series of run {run_id}"):
            with runtime.catalogue.session() as session:
                run = _run(session, run_id)
                series = run.series
                paths = _instance_paths(runtime, session, series.id)
                run_key, series_uid = run.run_key, series.series_instance_uid
                modality = series.modality
                attributes = (series.routing or {}).get("attributes") or {}
                chosen = attributes.get("heads")
                segmentations = [
                    (sop_class, runtime.spool.absolute(path))
                    for sop_class, path in study_segmentations(session, series)
                ]
            started = time.perf_counter()
            heads = heads_for(runtime.heads, modality)
            mask_heads = runtime.mask_heads
            if chosen is not None:  # a routing rule named the heads to run
                heads = [head for head in heads if head.name in chosen]
                mask_heads = [head for head in mask_heads if head.name in chosen]
                if not heads and not mask_heads:
                    raise NotAnalysed(f"the routing rules chose no installed head ({chosen})")
            units, skipped = plan_units(paths, heads, mask_heads)
            folder = prepared_folder(runtime, run_id)
            study_masks = StudyMasks.for_heads(
                heads, attributes.get("mask_segments") or {}, segmentations
            )

            def decoded(unit: StackUnit) -> PreparedSeries | None:
                # decoded by a CPU worker when the prepare stage ran; decoded here otherwise
                return load_prepared(folder / str(unit.index), expected=unit.plan)

            findings, masks = analyse_units(
                units,
                skipped,
                runtime.backbone,
                series_instance_uid=series_uid,
                batch_size=runtime.settings.model.batch_size,
                prepared=decoded,
                given_masks=study_masks.on_stack,
            )
            study_masks.mark(findings)
            segs = _write_segs(runtime, run_id, masks, run_key)
            findings.findings.extend(finding for finding, _, _ in segs)
            log.info(
                "run %d: %d slices of %d stack(s) analysed in %.2f s",
                run_id,
                findings.slice_count,
                len(units),
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
                            part=part,
                            sop_instance_uid=seg.SOPInstanceUID,
                            series_instance_uid=seg.SeriesInstanceUID,
                            path=_relative(seg),
                            summary=f"{finding.head_name}: segmentation",
                        )
                        for finding, part, seg in segs
                    ],
                )
    except NotAnalysed as outcome:
        _not_analysed(runtime, held, outcome)
        return False
    if not recorded:
        log.warning("run %d: analysed, but another execution had taken the run over", run_id)
        return False
    discard_prepared(runtime, run_id)
    return True


def _write_segs(
    runtime: Runtime, run_id: int, masks: list[StackMask], run_key: str
) -> list[tuple[HeadFinding, str, Dataset]]:
    """One SEG per mask head and stack: (finding, result part, SEG).

    A stack whose sources cannot carry a SEG (no frame of reference, a multi-frame
    object without plane positions: see :func:`pipelines.reporting.seg.why_no_seg`) has
    none; the SR is made. The part is the head's name, with the stack's position when the
    series has several.
    """
    from pipelines.reporting.seg import why_no_seg

    several = len({m.unit.index for m in masks}) > 1
    written = []
    for stack_mask in masks:
        plan = stack_mask.unit.plan
        headers = [dcmread(path, stop_before_pixels=True) for path in dict.fromkeys(plan.paths)]
        reason = why_no_seg(headers)
        if reason is None and plan.frames and len(headers) > 1:
            reason = "the stack spans several multi-frame objects"
        if reason is not None:
            log.warning("run %d: no SEG: %s", run_id, reason)
            continue
        name = stack_mask.head.name
        part = f"{name}@{stack_mask.unit.index}" if several else name
        seg = _write_seg(
            runtime, headers, stack_mask.mask, stack_mask.head, f"{run_key}:seg:{part}"
        )
        written.append((stack_mask.mask.finding, part, seg))
    return written


def _relative(ds: Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _write_seg(
    runtime: Runtime, headers: Sequence[Dataset], mask: SeriesMask, head: MaskHead, uid_key: str
) -> Dataset:
    """Write one mask head's SEG into the results folder; return it."""
    from pipelines.reporting.files import write_dataset
    from pipelines.reporting.seg import build_seg

    seg = build_seg(headers, mask, head, runtime.device_identity, uid_key=uid_key)
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
    # the analysed instances only: a series may also hold objects that were set aside
    analysed = set(findings.sop_instance_uids_sorted)
    with warnings_summarised(f"series of run {held.run_id}"):
        sources = [
            ds
            for ds in (dcmread(path, stop_before_pixels=True) for path in paths)
            if not analysed or str(ds.get("SOPInstanceUID", "")) in analysed
        ]
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
