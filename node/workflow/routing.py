"""The router: applies the routing rules (:mod:`node.core.rules`) to series in the catalogue.

It keeps the rule sets (versioned; the newest is in force), builds the facts a rule sees
from a series' catalogue row and the header of one of its instances, and records decisions
on the series (its priority and routing record). The forward deliveries a decision asks for
are created by :mod:`node.delivery.deliveries`; sending them is the dispatch queue's job.

A header is read by whoever holds the series' work (the completion pass, the report stage)
and handed in, never cached here: a cache keyed by path would go stale when a duplicate
replaces the file, and would be shared mutable state between threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.catalogue.db import Catalogue
from node.catalogue.models import AuditEvent, Instance, RuleSet, Series
from node.core.rules import Decision, Finding, SeriesFacts, evaluate, parse_rules
from node.core.rules import RuleSet as Rules


@dataclass(frozen=True)
class ActiveRules:
    """The rule set in force: its catalogue id (``None`` before any was saved) and text."""

    id: int | None
    document: str
    created_by: str | None
    created_at: str | None
    rules: Rules


_EMPTY = ActiveRules(None, "", None, None, Rules())
_cache_lock = threading.Lock()
_cache: dict[str, ActiveRules] = {}


def active_rules(catalogue: Catalogue) -> ActiveRules:
    """The newest rule set; parsed once per version per process (a cheap id query each call,
    so a change applies to the next series without a restart)."""
    with catalogue.session() as session:
        newest = session.scalar(select(func.max(RuleSet.id)))
        if newest is None:
            return _EMPTY
        key = f"{catalogue.url}#{newest}"
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        row = session.scalars(select(RuleSet).where(RuleSet.id == newest)).one()
        active = ActiveRules(
            row.id,
            row.document,
            row.created_by,
            row.created_at.isoformat(),
            parse_rules(row.document),
        )
    with _cache_lock:
        _cache[key] = active
    return active


def save_rules(
    catalogue: Catalogue, document: str, actor: str, known_destinations: list[str]
) -> ActiveRules:
    """Validate and store a new rule-set version; audited with the text before and after."""
    parse_rules(document, known_destinations)  # raises RulesError with the reason
    before = active_rules(catalogue)
    with catalogue.session() as session:
        session.add(RuleSet(document=document, created_by=actor))
        session.add(
            AuditEvent(
                actor=actor,
                action="rules-changed",
                target="routing-rules",
                details={"before": before.document, "after": document},
            )
        )
    return active_rules(catalogue)


def first_header(session: Session, spool_dir: Path, series: Series) -> Dataset | None:
    """The header of the series' first catalogued instance (the one rules read), or None
    when it has none or it cannot be read."""
    row = session.scalars(
        select(Instance).where(Instance.series_id == series.id).order_by(Instance.id).limit(1)
    ).first()
    if row is None:
        return None
    try:
        return dcmread(spool_dir / row.path, stop_before_pixels=True)
    except (OSError, ValueError):
        return None


def findings_for_rules(findings: dict[str, Any] | None) -> list[Finding]:
    """The run's stored findings as rules see them (head, labels, probabilities)."""
    out = []
    for item in (findings or {}).get("findings", []):
        labels = tuple(c["name"] for c in item["classes"])
        out.append(
            Finding(
                head=item["head_name"],
                labels=labels,
                probabilities=tuple(item["probabilities"]),
                predicted=labels[item["predicted_index"]],
                regression=item.get("task") == "regression",
            )
        )
    return out


_UNREAD: Any = object()


def facts_for(
    session: Session,
    spool_dir: Path,
    series: Series,
    findings: list[Finding] | None = None,
    header: Dataset | None = _UNREAD,
) -> SeriesFacts:
    """What a rule sees of ``series``; ``header`` is its first instance's, read here when
    the caller has not read it already."""
    if header is _UNREAD:
        header = first_header(session, spool_dir, series)

    def text(keyword: str) -> str | None:
        if header is None:
            return None
        value = header.get(keyword)
        return None if value is None or value == "" else str(value)

    return SeriesFacts(
        orientation=orientation(header),
        modality=series.modality or text("Modality"),
        body_part=series.body_part_examined or text("BodyPartExamined"),
        series_description=series.series_description or text("SeriesDescription"),
        study_description=text("StudyDescription"),
        manufacturer=text("Manufacturer"),
        calling_ae_title=series.calling_ae_title,
        slices=series.instance_count,
        sop_classes=series_sop_classes(session, series),
        tags=text,
        findings=findings,
    )


def series_sop_classes(session: Session, series: Series) -> tuple[str, ...]:
    """The SOP classes of the series' objects, each once (what ``sop_class`` rules match)."""
    return tuple(
        session.scalars(
            select(Instance.sop_class_uid)
            .where(Instance.series_id == series.id)
            .distinct()
            .order_by(Instance.sop_class_uid)
        )
    )


def orientation(header: Dataset | None) -> str | None:
    """axial, coronal or sagittal when the slice normal is within ~35 degrees of a patient
    axis (ImageOrientationPatient), else oblique; None without the attribute."""
    if header is None:
        return None
    try:
        row = [float(v) for v in header.ImageOrientationPatient[:3]]
        col = [float(v) for v in header.ImageOrientationPatient[3:6]]
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    normal = [
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    ]
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.82:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def record(series: Series, decision: Decision) -> None:
    """Keep the decision on the series: the dashboard and the rule tester show it."""
    routing = dict(series.routing or {})
    routing[decision.phase] = decision.to_dict()
    series.routing = routing
    if decision.phase == "attributes":
        series.priority = decision.priority


class Router:
    """Routes series at the two decision points: completion and findings."""

    def __init__(self, catalogue: Catalogue, spool_dir: Path) -> None:
        self.catalogue = catalogue
        self.spool_dir = spool_dir

    def decide(
        self,
        session: Session,
        series: Series,
        findings: dict[str, Any] | None = None,
        header: Dataset | None = _UNREAD,
    ) -> Decision:
        """Evaluate the rules in force on ``series`` and record the decision on it;
        ``header`` is the series' first header when the caller has read it already."""
        facts = facts_for(
            session,
            self.spool_dir,
            series,
            None if findings is None else findings_for_rules(findings),
            header,
        )
        decision = evaluate(active_rules(self.catalogue).rules, facts)
        record(series, decision)
        return decision


def dry_run(
    catalogue: Catalogue, spool_dir: Path, study_uid: str, rules: Rules | None = None
) -> list[dict[str, Any]]:
    """Evaluate ``rules`` (default: those in force) on every series of a stored study, with
    the findings of its latest run when there is one; records nothing. The rule tester."""
    from node.catalogue.models import Study

    rules = rules if rules is not None else active_rules(catalogue).rules
    out = []
    with catalogue.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            raise LookupError(f"no study {study_uid} in the catalogue")
        for series in sorted(study.series, key=lambda s: s.id):
            runs = sorted((r for r in series.runs if r.findings is not None), key=lambda r: r.id)
            findings = findings_for_rules(runs[-1].findings) if runs else None
            decision = evaluate(rules, facts_for(session, spool_dir, series, findings))
            out.append(
                {
                    "series_instance_uid": series.series_instance_uid,
                    "modality": series.modality,
                    "instances": series.instance_count,
                    "decision": decision.to_dict(),
                }
            )
    return out
