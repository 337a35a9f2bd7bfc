"""QIDO-RS requests: matching keys, paging and the attributes asked for, parsed and checked,
and how DICOM wildcards become SQL."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, SQLColumnExpression

from node.dicomweb.common import MAX_QIDO_RESULTS, Level, bad_request, checked_uid

_UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
_STUDY_KEYS = {"StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber"}
_MATCHING_KEYS: dict[Level, set[str]] = {
    "study": _STUDY_KEYS | {"ModalitiesInStudy"},
    "series": _STUDY_KEYS | {"SeriesInstanceUID", "Modality", "SeriesDescription"},
}
_MATCHING_KEYS["instance"] = _MATCHING_KEYS["series"] | {"SOPInstanceUID"}


@dataclass
class Query:
    """A parsed QIDO-RS request: matching keys, paging and the attributes to return."""

    level: Level
    uids: dict[str, list[str]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    date: tuple[str, str] | None = None  # inclusive, either end may be ""
    limit: int = MAX_QIDO_RESULTS
    offset: int = 0
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, level: Level, params: Iterable[tuple[str, str]]) -> Query:
        query = cls(level)
        ignored: list[str] = []
        for key, value in params:
            if key == "limit":
                query.limit = min(_non_negative(key, value), MAX_QIDO_RESULTS)
            elif key == "offset":
                query.offset = _non_negative(key, value)
            elif key == "fuzzymatching":
                if value.strip().lower() == "true":
                    query.warnings.append("fuzzy matching is not supported; literal matching used")
            elif key == "includefield":
                for name in filter(None, (item.strip() for item in value.split(","))):
                    if name == "all":
                        query.include_all = True
                    else:
                        query.include.append(_keyword(name))
            else:
                query._add_key(_keyword(key), value, ignored)
        if ignored:
            query.warnings.append(f"not supported for matching, ignored: {', '.join(ignored)}")
        return query

    def _add_key(self, keyword: str, value: str, ignored: list[str]) -> None:
        if self.level == "study" and keyword == "Modality":
            keyword = "ModalitiesInStudy"
        self.include.append(keyword)
        if keyword not in _MATCHING_KEYS[self.level]:
            ignored.append(keyword)
        elif keyword in _UID_KEYS:
            values = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
            if values:  # an empty value is universal matching
                self.uids.setdefault(keyword, []).extend(checked_uid(v, keyword) for v in values)
        elif keyword == "StudyDate":
            self.date = _date_range(value)
        else:
            self.text[keyword] = value

    def restrict(self, keyword: str, uid: str) -> None:
        """A UID from the request path: a matching key the client cannot widen."""
        given = self.uids.get(keyword)
        self.uids[keyword] = [uid] if given is None or uid in given else []


MAX_QIDO_OFFSET = 10**9  # far past any catalogue; keeps the SQL OFFSET within 64 bits


def _non_negative(name: str, value: str) -> int:
    """A paging parameter: ASCII digits only, at most :data:`MAX_QIDO_OFFSET`, else 400."""
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        raise bad_request(f"{name} must be an integer from 0 to {MAX_QIDO_OFFSET}")
    number = int(value)
    if number > MAX_QIDO_OFFSET:
        raise bad_request(f"{name} must be an integer from 0 to {MAX_QIDO_OFFSET}")
    return number


def _keyword(name: str) -> str:
    """An attribute named by keyword or by 8-digit hex tag."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise bad_request(f"unknown or unsupported attribute {name!r}")


def _date_range(value: str) -> tuple[str, str] | None:
    if value in ("", "*"):
        return None
    low, dash, high = value.partition("-")
    for part in (low, high):
        if part and not (len(part) == 8 and part.isdigit()):
            raise bad_request("StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if not dash:
        return low, low
    if not low and not high:
        raise bad_request("StudyDate range needs at least one end")
    return low, high


def pattern_condition(
    column: SQLColumnExpression[Any], pattern: str, dialect: str
) -> ColumnElement[bool] | None:
    """Single-value matching with DICOM wildcards (* and ?), case-sensitive; None = any."""
    if pattern in ("", "*"):
        return None
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    if dialect == "sqlite":  # LIKE ignores case in SQLite; GLOB does not
        return column.op("GLOB")(pattern.replace("[", "[[]"))
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def pattern_matches(value: str | None, pattern: str) -> bool:
    if pattern in ("", "*"):
        return True
    return value is not None and fnmatchcase(value, pattern.replace("[", "[[]"))
