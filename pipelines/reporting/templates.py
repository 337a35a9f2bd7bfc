"""Declarative SR templates: one YAML file per classification head.

A site adds or edits a head's report without touching code, so every code the report
uses for a head (finding type, evaluation concepts, probability concept and unit,
presence values) lives in the YAML file and is validated here, at load. A bad file is
refused with a ``TemplateError`` naming the file, the YAML line and the field, because
an administrator fixing a template needs to know exactly where to look; silently
producing a malformed report at 3 a.m. would be worse.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.findings import CodeRef

__all__ = [
    "SUMMARY_FIELDS",
    "CodeSpec",
    "PredictedClassSpec",
    "PresenceSpec",
    "ProbabilitySpec",
    "ReportTemplate",
    "SummarySpec",
    "TemplateError",
    "load_template",
    "load_templates",
]

# Placeholders a summary pattern may use; report.py fills exactly these.
SUMMARY_FIELDS: frozenset[str] = frozenset(
    {"head", "task", "predicted", "predicted_meaning", "probability"}
)

_DIGITS = re.compile(r"[0-9]+")
# Verhoeff tables: every SNOMED CT identifier ends in a Verhoeff check digit, so a typo
# in an SCT code value is caught here instead of reaching the archive.
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def _verhoeff_ok(number: str) -> bool:
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][int(digit)]]
    return check == 0


class TemplateError(ValueError):
    """A template file that cannot be used, with where (file, line, field) and why."""

    def __init__(
        self, path: Path | str, reason: str, *, line: int | None = None, field: str = ""
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = str(self.path) if line is None else f"{self.path}:{line}"
        if field:
            where = f"{where}: field '{field}'"
        super().__init__(f"{where}: {reason}")


class _Strict(BaseModel):
    """Unknown keys are refused: a misspelt optional key would otherwise be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class CodeSpec(_Strict):
    """A coded concept as written in YAML: ``{value, scheme, meaning}``."""

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]

    @field_validator("value", "scheme", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: Any) -> Any:
        # YAML reads 69536005 as an int and 1 (UCUM) as an int; both are code strings.
        if isinstance(v, bool):
            return v
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _check_scheme_rules(self) -> CodeSpec:
        if any(c.isspace() for c in self.value):
            raise ValueError(f"code value {self.value!r} contains whitespace")
        if self.scheme in {"SRT", "SNM3", "SNOMED"}:
            raise ValueError(
                f"scheme {self.scheme!r} is not used for SNOMED CT in DICOM; write 'SCT'"
            )
        if self.scheme == "SCT":
            if not _DIGITS.fullmatch(self.value) or not 6 <= len(self.value) <= 18:
                raise ValueError(f"SCT code value {self.value!r} is not a SNOMED CT identifier")
            if not _verhoeff_ok(self.value):
                raise ValueError(
                    f"SCT code value {self.value!r} fails the SNOMED CT check digit "
                    "(probably a typo)"
                )
        if self.scheme == "DCM" and not _DIGITS.fullmatch(self.value):
            raise ValueError(f"DCM code value {self.value!r} is not numeric")
        return self

    def to_ref(self) -> CodeRef:
        """The plain, library-independent form used by the report builder."""
        return CodeRef(value=self.value, scheme=self.scheme, meaning=self.meaning)


class PredictedClassSpec(_Strict):
    """How the predicted class appears in the report."""

    evaluation_concept: CodeSpec | None = Field(
        default=None,
        description="Concept name of a qualitative evaluation whose value is the class code "
        "(e.g. Target Region for a body-region head); omitted = no such evaluation.",
    )
    as_finding_site: bool = Field(
        default=False,
        description="Also report the predicted class code as a Finding Site (anatomic "
        "classes, CID 4031).",
    )


class ProbabilitySpec(_Strict):
    """Class probabilities as NUM measurements (TID 300)."""

    concept: CodeSpec
    unit: CodeSpec
    scale: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="Multiplier from a 0..1 probability to the unit (100 for %)."
    )
    classes: Literal["all", "predicted"] | list[Annotated[str, Field(min_length=1)]] = "all"
    qualify_with_finding_site: bool = Field(
        default=False,
        description="Give each NUM its class code as Finding Site, so that several "
        "probabilities with the same concept can be told apart.",
    )

    @field_validator("unit")
    @classmethod
    def _unit_is_ucum(cls, v: CodeSpec) -> CodeSpec:
        if v.scheme != "UCUM":
            raise ValueError(f"measurement units must be UCUM codes, not {v.scheme!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _non_empty(
        cls, v: Literal["all", "predicted"] | list[str]
    ) -> Literal["all", "predicted"] | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("list of classes is empty")
            if len(set(v)) != len(v):
                raise ValueError("list of classes has duplicates")
        return v

    @model_validator(mode="after")
    def _unambiguous(self) -> ProbabilitySpec:
        several = self.classes == "all" or (
            isinstance(self.classes, list) and len(self.classes) > 1
        )
        if several and not self.qualify_with_finding_site:
            raise ValueError(
                "several probabilities with the same concept cannot be told apart: set "
                "qualify_with_finding_site: true (anatomic classes) or report one class"
            )
        return self


class ValueSpec(_Strict):
    """A regression head's output as one NUM measurement (TID 300) in its UCUM unit."""

    concept: CodeSpec
    unit: CodeSpec

    @field_validator("unit")
    @classmethod
    def _unit_is_ucum(cls, v: CodeSpec) -> CodeSpec:
        if v.scheme != "UCUM":
            raise ValueError(f"measurement units must be UCUM codes, not {v.scheme!r}")
        return v


class PresenceSpec(_Strict):
    """Present/absent evaluation for binary heads: positive class probability >= threshold."""

    positive_class: Annotated[str, Field(min_length=1)]
    threshold: Annotated[float, Field(ge=0.0, le=1.0)]
    concept: CodeSpec | None = Field(
        default=None, description="Concept evaluated; defaults to the template's finding_type."
    )
    present: CodeSpec
    absent: CodeSpec


def _check_pattern(v: str) -> str:
    """A format string that uses only :data:`SUMMARY_FIELDS` and formats a sample finding."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
    except ValueError as exc:
        raise ValueError(f"pattern is not a valid format string: {exc}") from None
    unknown = {f for f in fields if f.split(".")[0].split("[")[0] not in SUMMARY_FIELDS}
    if "" in fields or unknown:
        raise ValueError(
            f"unknown placeholder(s) {sorted(unknown) or ['{}']}; allowed: {sorted(SUMMARY_FIELDS)}"
        )
    sample = {
        "head": "head",
        "task": "classification",
        "predicted": "class",
        "predicted_meaning": "Class",
        "probability": 0.5,
    }
    try:
        v.format(**sample)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"pattern cannot be formatted: {exc}") from None
    return v


class SummarySpec(_Strict):
    """A one-line human-readable summary, as a TEXT content item."""

    concept: CodeSpec
    pattern: Annotated[str, Field(min_length=1, max_length=1024)]

    @field_validator("pattern")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        return _check_pattern(v)


class KeyRegionSpec(_Strict):
    """The finding as an image viewer draws it: an outline on the key slice, with a label.

    The outline (a 2D SCOORD on the key slice) is the source of one NUM, a probability in
    %, whose concept name is ``label``: viewers such as OHIF write "<label>: <value> %"
    next to the outline.
    """

    label: Annotated[str, Field(min_length=1, max_length=58)] = Field(
        default="{predicted_meaning} probability",
        description="Text of the label, with the summary's placeholders (at most 58 "
        'characters once filled in; "DEMO " goes in front for demo weights).',
    )
    class_name: str | None = Field(
        default=None,
        description="Class whose probability the label gives (default: the predicted one).",
    )

    @field_validator("label")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        return _check_pattern(v)


class ReportTemplate(_Strict):
    """What one head's TID 1501 measurement group contains."""

    head: Annotated[str, Field(min_length=1, max_length=64)]
    tracking_identifier: Annotated[str, Field(min_length=1, max_length=64)]
    finding_type: CodeSpec
    finding_sites: list[CodeSpec] = Field(
        default_factory=list, description="Fixed finding sites, whatever the prediction."
    )
    class_codes: dict[str, CodeSpec] = Field(
        default_factory=dict,
        description="Codes for classes whose head card gives none (class name -> code).",
    )
    predicted_class: PredictedClassSpec = Field(default_factory=PredictedClassSpec)
    probability: ProbabilitySpec | None = None
    presence: PresenceSpec | None = None
    value: ValueSpec | None = None
    summary: SummarySpec | None = None
    key_region: KeyRegionSpec = Field(default_factory=KeyRegionSpec)

    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file the template was loaded from, for error messages at build time."""
        return self._source

    @model_validator(mode="after")
    def _reports_something(self) -> ReportTemplate:
        if (
            self.predicted_class.evaluation_concept is None
            and not self.predicted_class.as_finding_site
            and self.probability is None
            and self.presence is None
            and self.value is None
        ):
            raise ValueError(
                "template reports nothing about the prediction: give predicted_class, "
                "probability, presence or value"
            )
        return self


# --- loading -------------------------------------------------------------------------


def _check_duplicate_keys(node: yaml.Node, path: Path) -> None:
    """YAML silently keeps the last of two equal keys; a template must not."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise TemplateError(
                    path,
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    line=key_node.start_mark.line + 1,
                    field=str(key),
                )
            seen[key] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path)


def _children(node: yaml.Node) -> Iterator[tuple[Any, yaml.Node, yaml.Node]]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield key_node.value, key_node, value_node
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield i, item, item


def _line_of(root: yaml.Node, loc: tuple[int | str, ...]) -> int:
    """YAML line (1-based) of the deepest node along a pydantic error location.

    A missing field has no node, so its parent's line is the best place to point at.
    """
    node = root
    line = root.start_mark.line + 1
    for part in loc:
        for key, key_node, value_node in _children(node):
            if key == part or (isinstance(part, str) and str(key) == part):
                # Point at the key itself (where an admin reads the field name).
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part:
            # pydantic adds the union branch (e.g. "list[str]") to the location: noise here.
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _reason(kind: str, msg: str, value: Any) -> str:
    """pydantic's message, reworded where an administrator would not recognise it."""
    if kind in {"model_type", "dict_type"}:
        return f"expected a mapping (e.g. {{value: ..., scheme: ..., meaning: ...}}), got {value!r}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown key (misspelt, or not part of the template format)"
    return msg.removeprefix("Value error, ")


def load_template(path: Path | str) -> ReportTemplate:
    """Load and validate one template file; raise ``TemplateError`` if it is unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(path, f"cannot read file: {exc}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = f"YAML syntax error: {exc.problem or exc.context}"
        raise TemplateError(path, reason, line=line) from exc
    except yaml.YAMLError as exc:
        raise TemplateError(path, f"YAML error: {exc}") from exc
    if root is None or not isinstance(data, dict):
        raise TemplateError(path, "a template must be a YAML mapping (key: value lines)", line=1)
    _check_duplicate_keys(root, path)
    try:
        template = ReportTemplate.model_validate(data)
    except ValidationError as exc:
        problems = sorted(
            (
                _line_of(root, tuple(err["loc"])),
                _format_loc(tuple(err["loc"])),
                _reason(err["type"], err["msg"], err.get("input")),
            )
            for err in exc.errors()
        )
        line, field, reason = problems[0]
        if len(problems) > 1:
            reason += "; also " + "; ".join(
                f"line {ln} field '{fl}': {msg}" for ln, fl, msg in problems[1:]
            )
        raise TemplateError(path, reason, line=line, field=field) from exc
    template._source = path
    return template


def load_templates(folder: Path | str) -> dict[str, ReportTemplate]:
    """Load every ``*.yaml`` / ``*.yml`` template in ``folder``, keyed by head name.

    One bad file (the first in name order is named) refuses the whole set, so a site never
    runs with half of its templates. Two files for the same head are refused as well.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(folder, "template folder does not exist")
    templates: dict[str, ReportTemplate] = {}
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in {".yaml", ".yml"} and not p.name.startswith(".") and p.is_file()
    )
    for path in files:
        template = load_template(path)
        if template.head in templates:
            other = templates[template.head].source
            raise TemplateError(
                path, f"head {template.head!r} already has a template in {other}", field="head"
            )
        templates[template.head] = template
    return templates
