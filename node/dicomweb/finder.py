"""Matching QIDO-RS queries against the catalogue and the node's results, page by page.

Results are listed with the study they were made for, but not catalogued as received
instances, because a received series is what the completion watcher analyses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session

from node.catalogue.models import Instance, PipelineRun, Result, Series, Study
from node.core.settings import Settings
from node.dicomweb.common import inside, read_stored
from node.dicomweb.query import Query, pattern_condition, pattern_matches


@dataclass
class Row:
    """One match: what the catalogue knows, and a file to read the other attributes from."""

    study: Study
    path: Path | None
    series_uid: str | None = None
    modality: str | None = None
    series_description: str | None = None
    sop_uid: str | None = None
    sop_class: str | None = None
    instance_number: int | None = None
    modalities: set[str] = field(default_factory=set)
    series_count: int = 0
    instance_count: int = 0


@dataclass(frozen=True)
class ResultRow:
    """A result the node wrote, with the study of the series it was made from."""

    study: Study
    series_uid: str
    sop_uid: str
    modality: str
    path: Path


class Finder:
    """Matches queries against the catalogue and the results table."""

    def __init__(self, settings: Settings, session: Session) -> None:
        self.settings = settings
        self.session = session
        self.dialect = session.get_bind().dialect.name

    def _conditions(self, query: Query, columns: dict[str, Any]) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        for keyword, uids in query.uids.items():
            if keyword in columns:
                conditions.append(columns[keyword].in_(uids))
        for keyword, pattern in query.text.items():
            if keyword in columns:
                condition = pattern_condition(columns[keyword], pattern, self.dialect)
                if condition is not None:
                    conditions.append(condition)
        return conditions

    def _study_conditions(self, query: Query) -> list[ColumnElement[bool]]:
        columns = {
            "StudyInstanceUID": Study.study_instance_uid,
            "PatientID": Study.patient_id,
            "AccessionNumber": Study.accession_number,
        }
        conditions = self._conditions(query, columns)
        if query.date is not None:
            low, high = query.date
            if low:
                conditions.append(Study.study_date >= low)
            if high:
                conditions.append(Study.study_date <= high)
        return conditions

    def results(self, query: Query, *extra: ColumnElement[bool]) -> list[ResultRow]:
        """Results matching the query, except those also received as instances."""
        columns = {
            "SeriesInstanceUID": Result.series_instance_uid,
            "SOPInstanceUID": Result.sop_instance_uid,
            "Modality": func.upper(Result.kind),
        }
        stmt = (
            select(Result, Study)
            .join(PipelineRun, Result.run_id == PipelineRun.id)
            .join(Series, PipelineRun.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns), *extra)
            .where(Result.sop_instance_uid.not_in(select(Instance.sop_instance_uid)))
            .order_by(Result.id)
        )
        rows = []
        for result, study in self.session.execute(stmt):
            path = inside(self.settings.results_dir, result.path)
            if path is not None:
                rows.append(
                    ResultRow(
                        study,
                        result.series_instance_uid,
                        result.sop_instance_uid,
                        result.kind.upper(),
                        path,
                    )
                )
        pattern = query.text.get("SeriesDescription", "")
        if pattern not in ("", "*"):
            rows = [
                row
                for row in rows
                if pattern_matches(
                    read_stored(row.path, ["SeriesDescription"]).get("SeriesDescription"), pattern
                )
            ]
        return rows

    def studies(self, query: Query) -> tuple[list[Row], bool]:
        stmt = select(Study).where(*self._study_conditions(query))
        by_series = self._conditions(query, {"ModalitiesInStudy": Series.modality})
        if by_series:  # a study matches if a received series or a result has the modality
            by_result = self._conditions(query, {"ModalitiesInStudy": func.upper(Result.kind)})
            received = select(Series.study_id).where(*by_series)
            made = (
                select(Series.study_id)
                .join(PipelineRun, PipelineRun.series_id == Series.id)
                .join(Result, Result.run_id == PipelineRun.id)
                .where(*by_result)
            )
            stmt = stmt.where(or_(Study.id.in_(received), Study.id.in_(made)))
        found = list(
            self.session.scalars(
                stmt.order_by(Study.id).offset(query.offset).limit(query.limit + 1)
            )
        )
        more = len(found) > query.limit
        studies = {study.id: study for study in found[: query.limit]}
        rows = {study_id: Row(study, None) for study_id, study in studies.items()}
        first: dict[int, int] = {}
        per_series = (
            select(Series.study_id, Series.modality, func.count(Instance.id), func.min(Instance.id))
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(list(studies)))
            .group_by(Series.id)
        )
        for study_id, modality, count, first_id in self.session.execute(per_series):
            row = rows[study_id]
            row.series_count += 1
            row.instance_count += count
            if modality:
                row.modalities.add(modality)
            if first_id is not None:
                first[study_id] = min(first.get(study_id, first_id), first_id)
        paths = self._instance_paths(list(first.values()))
        for study_id, instance_id in first.items():
            rows[study_id].path = paths.get(instance_id)
        result_series: dict[int, set[str]] = {}
        for result in self.results(Query("study"), Study.id.in_(list(studies))):
            row = rows[result.study.id]
            row.instance_count += 1
            row.modalities.add(result.modality)
            result_series.setdefault(result.study.id, set()).add(result.series_uid)
        for study_id, series_uids in result_series.items():
            rows[study_id].series_count += len(series_uids - self._received(series_uids))
        return list(rows.values()), more

    def _received(self, series_uids: Iterable[str]) -> set[str]:
        """Which of these series UIDs are received series (a result may share one)."""
        stmt = select(Series.series_instance_uid).where(
            Series.series_instance_uid.in_(list(series_uids))
        )
        return set(self.session.scalars(stmt))

    def _instance_paths(self, ids: list[int]) -> dict[int, Path]:
        stmt = select(Instance.id, Instance.path).where(Instance.id.in_(ids))
        paths = {i: inside(self.settings.spool_dir, path) for i, path in self.session.execute(stmt)}
        return {i: path for i, path in paths.items() if path is not None}

    def _series_stmt(self, query: Query) -> Select[*tuple[Any, ...]]:
        columns = {
            "SeriesInstanceUID": Series.series_instance_uid,
            "Modality": Series.modality,
            "SeriesDescription": Series.series_description,
        }
        return (
            select(Series, Study, func.count(Instance.id), func.min(Instance.id))
            .join(Study, Series.study_id == Study.id)
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns))
            .group_by(Series.id, Study.id)
        )

    def series(self, query: Query) -> tuple[list[Row], bool]:
        stmt = self._series_stmt(query).order_by(Series.id)

        def catalogued(offset: int, limit: int) -> list[Row]:
            found = self.session.execute(stmt.offset(offset).limit(limit)).all()
            paths = self._instance_paths([first for *_, first in found if first is not None])
            return [
                Row(
                    study,
                    paths.get(first),
                    series_uid=series.series_instance_uid,
                    modality=series.modality,
                    series_description=series.series_description,
                    instance_count=count,
                )
                for series, study, count, first in found
            ]

        def made() -> list[Row]:
            grouped: dict[str, Row] = {}
            for result in self.results(query):
                row = grouped.setdefault(
                    result.series_uid,
                    Row(result.study, result.path, result.series_uid, result.modality),
                )
                row.instance_count += 1
            known = self._received(grouped)
            return [row for uid, row in grouped.items() if uid not in known]

        return self._page(stmt, catalogued, made, query)

    def instances(self, query: Query) -> tuple[list[Row], bool]:
        columns = {
            "SeriesInstanceUID": Series.series_instance_uid,
            "Modality": Series.modality,
            "SeriesDescription": Series.series_description,
            "SOPInstanceUID": Instance.sop_instance_uid,
        }
        stmt = (
            select(Instance, Series, Study)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(*self._study_conditions(query), *self._conditions(query, columns))
            .order_by(Series.id, Instance.instance_number, Instance.id)
        )

        def catalogued(offset: int, limit: int) -> list[Row]:
            return [
                Row(
                    study,
                    inside(self.settings.spool_dir, instance.path),
                    series_uid=series.series_instance_uid,
                    modality=series.modality,
                    series_description=series.series_description,
                    sop_uid=instance.sop_instance_uid,
                    sop_class=instance.sop_class_uid,
                    instance_number=instance.instance_number,
                )
                for instance, series, study in self.session.execute(
                    stmt.offset(offset).limit(limit)
                )
            ]

        def made() -> list[Row]:
            return [
                Row(r.study, r.path, r.series_uid, r.modality, sop_uid=r.sop_uid)
                for r in self.results(query)
            ]

        return self._page(stmt, catalogued, made, query)

    def _page(
        self,
        stmt: Select[*tuple[Any, ...]],
        catalogued: Callable[[int, int], list[Row]],
        made: Callable[[], list[Row]],
        query: Query,
    ) -> tuple[list[Row], bool]:
        """One page of catalogued rows followed by the (few) result rows."""
        rows = catalogued(query.offset, query.limit + 1)
        if len(rows) > query.limit:
            return rows[: query.limit], True
        if rows or query.offset == 0:
            before = query.offset + len(rows)
        else:
            counted = select(func.count()).select_from(stmt.order_by(None).subquery())
            before = self.session.scalar(counted) or 0
        start = max(0, query.offset - before)
        wanted = query.limit - len(rows)
        extra = made()[start : start + wanted + 1]
        return rows + extra[:wanted], len(extra) > wanted
