"""Results and their deliveries: listing, dead-letter re-queue, and a readable rendering.

Shared by the CLI and the HTTP API so both say and do exactly the same thing. Runs and
deliveries change state only through :mod:`node.workflow.runs` and
:mod:`node.delivery.deliveries`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    PipelineRun,
    Result,
    Series,
    Study,
)
from node.core.uids import validate_uid
from node.delivery import deliveries
from node.workflow import runs

SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
}


class ResultsError(ValueError):
    """A request about results that cannot be met; the message says why."""


@dataclass(frozen=True)
class DeliveryView:
    id: int
    destination: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    result_kind: str  # sr | seg | series (the original series, forwarded by a rule)
    result_uid: str
    series_uid: str
    rule: str | None = None


def list_deliveries(catalogue: Catalogue, state: str | None = None) -> list[DeliveryView]:
    with catalogue.session() as session:
        query = select(Delivery).order_by(Delivery.id.desc()).limit(500)
        if state is not None:
            query = query.where(Delivery.state == DeliveryState(state))
        return [_view(d) for d in session.scalars(query)]


def _view(d: Delivery) -> DeliveryView:
    # a delivery sends either a result of a run of a series, or the series itself
    series = d.result.run.series if d.result is not None else d.series
    if series is None:
        raise ResultsError(f"delivery {d.id} has neither a result nor a series")
    return DeliveryView(
        id=d.id,
        destination=d.destination,
        state=d.state.value,
        attempts=d.attempts,
        last_error=d.last_error,
        sent_at=d.sent_at,
        result_kind=d.result.kind if d.result else "series",
        result_uid=d.result.sop_instance_uid if d.result else series.series_instance_uid,
        series_uid=series.series_instance_uid,
        rule=d.rule,
    )


def requeue(
    catalogue: Catalogue, delivery_id: int, actor: str, enqueue: Callable[[int], object]
) -> None:
    """Put a dead-lettered delivery back in the queue (only a failed one: never a sent one)."""
    with catalogue.session() as session:
        try:
            before, run_id = deliveries.requeue_failed(session, delivery_id)
        except (LookupError, ValueError) as exc:
            raise ResultsError(str(exc)) from exc
        runs.reopen(session, run_id)
        session.add(
            AuditEvent(
                actor=actor,
                action="delivery-requeued",
                target=str(delivery_id),
                details={"before": before},
            )
        )
    enqueue(delivery_id)


def request_rerun(
    catalogue: Catalogue, series_uid: str, actor: str, enqueue: Callable[[int], object]
) -> int:
    """Analyse a series again on purpose: a new run, recorded, whose SR supersedes the last.

    Without such a request the same series and model are never reported twice.
    """
    validate_uid(series_uid, "SeriesInstanceUID")
    with catalogue.session() as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            raise ResultsError(f"no series {series_uid}")
        if not series.runs:
            raise ResultsError("this series has not been analysed yet; nothing to re-run")
        latest = max(run.id for run in series.runs)
        run_id = runs.create_rerun(session, series, "rerun", actor).id
        session.add(
            AuditEvent(
                actor=actor,
                action="rerun-requested",
                target=series_uid,
                details={"supersedes_run": latest},
            )
        )
    runs.send(catalogue, [run_id], lambda run, _priority: enqueue(run))
    return run_id


def result_files(catalogue: Catalogue, results_dir: Path, study_uid: str) -> list[Path]:
    """The files of every result the node wrote for a study, oldest first."""
    validate_uid(study_uid, "StudyInstanceUID")
    with catalogue.session() as session:
        rows = session.scalars(
            select(Result)
            .join(PipelineRun)
            .join(Series)
            .join(Study)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Result.id)
        ).all()
        return [results_dir / row.path for row in rows]


def render_text(ds: Dataset) -> str:
    """The SR content tree as indented text: what a radiologist reads in a text viewer."""
    lines = [
        f"{ds.get('SeriesDescription', '')}",
        f"Completion: {ds.get('CompletionFlag', '')}  "
        f"Verification: {ds.get('VerificationFlag', '')}",
        "",
    ]

    def walk(items: list[Dataset], depth: int) -> None:
        for item in items:
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            value = _value(item)
            lines.append(f"{'  ' * depth}{name}{': ' + value if value else ''}")
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    title = ds.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in ds else ""
    lines.append(title)
    walk(ds.get("ContentSequence", []), 1)
    return "\n".join(lines)


def _value(item: Dataset) -> str:
    kind = item.get("ValueType", "")
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "NUM":
        measured = item.MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
        return f"{measured.NumericValue} {'' if unit == '1' else unit}".strip()
    if kind == "UIDREF":
        return str(item.UID)
    if kind == "IMAGE":
        return f"image {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}"
    if kind == "SCOORD":
        corners = [round(float(v)) for v in item.GraphicData]
        points = ", ".join(f"({c}, {r})" for c, r in zip(corners[::2], corners[1::2], strict=True))
        return f"{str(item.GraphicType).lower()} {points} (column, row) on"
    return ""


def render_html(path: Path) -> str:
    """HTML as DCMTK's dsr2html renders it, or the text rendering in a <pre> without it."""
    if shutil.which("dsr2html"):
        done = subprocess.run(
            ["dsr2html", "+U8", str(path)], capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0:
            return done.stdout
    import html

    return f"<pre>{html.escape(render_text(dcmread(path)))}</pre>"
