"""Routing rules: declarative conditions on a series and on Curia's findings -> actions.

Rules are YAML an admin writes (see ``docs/examples/routing-rules.yaml``); they are parsed into
typed models and evaluated by code here, never by ``eval``. A rule fires when every
condition in its ``when`` holds; its ``then`` says what to do:

* ``heads``: run only these heads (union over the rules that fired; default: all heads);
* ``priority``: ``routine``, ``urgent`` or ``stat`` (the highest wins; stat work overtakes
  routine work in the queues);
* ``forward``: send the original series to these destinations;
* ``results_to``: send the node's results to these destinations too;
* ``discard``: do not analyse or forward the series;
* ``stop``: evaluate no later rule once this one fired.

Evaluation is deterministic and happens twice per series. When the series completes, rules
on DICOM attributes only are decided ("attributes" phase): heads, priority, discard and
forwards apply at once, so routing does not wait for the GPU. After inference ("findings"
phase) every rule is evaluated again with the findings known, and the forwards and result
destinations of the rules that fired then are added. A rule that tests findings may only
forward (``forward``, ``results_to``): what runs and how urgently is decided before there
are findings. ``fallback`` applies when no rule fired at all, after the findings are known.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import dictionary_VR, keyword_dict

from node.core import sop_classes

PRIORITIES = {"routine": 0, "urgent": 5, "stat": 9}
Phase = Literal["attributes", "findings"]


class RulesError(ValueError):
    """A rule set that cannot be used; the message names the rule and the problem."""


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int | float) else value


class FindingCondition(BaseModel):
    """A condition on one head's output.

    With ``label`` and no threshold: that label is the predicted class. With a threshold:
    the probability of ``label`` (or, for a regression head, its value) is in range. With
    neither: the head ran on the series.
    """

    model_config = ConfigDict(extra="forbid")

    head: str
    label: str | None = None
    min_probability: float | None = Field(None, ge=0.0, le=1.0)
    max_probability: float | None = Field(None, ge=0.0, le=1.0)
    min_value: float | None = None
    max_value: float | None = None

    @model_validator(mode="after")
    def _label_for_thresholds(self) -> FindingCondition:
        if (self.min_probability is not None or self.max_probability is not None) and not (
            self.label
        ):
            raise ValueError("a probability threshold needs the label it applies to")
        return self


class Condition(BaseModel):
    """Every field given must hold. Text matches are case-insensitive glob patterns
    (``*`` and ``?``); a list matches if any pattern does; ``""`` matches a missing value."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    modality: list[str] | None = None
    body_part: list[str] | None = None
    series_description: list[str] | None = None
    study_description: list[str] | None = None
    manufacturer: list[str] | None = None
    calling_ae_title: list[str] | None = None
    orientation: list[Literal["axial", "coronal", "sagittal", "oblique"]] | None = None
    sop_class: list[str] | None = Field(
        None,
        description="SOP class of any object in the series: UID, keyword "
        "(XRayRadiationDoseSRStorage) or name, with wildcards",
    )
    min_slices: int | None = Field(None, ge=0)
    max_slices: int | None = Field(None, ge=0)
    tags: dict[str, list[str]] | None = None
    finding: FindingCondition | None = None
    any_of: list[Condition] | None = Field(None, alias="any")
    all_of: list[Condition] | None = Field(None, alias="all")
    none_of: list[Condition] | None = Field(None, alias="not")

    @field_validator(
        "modality",
        "body_part",
        "series_description",
        "study_description",
        "manufacturer",
        "calling_ae_title",
        "orientation",
        "sop_class",
        mode="before",
    )
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("tags", mode="before")
    @classmethod
    def _known_keywords(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for keyword in value:
            if keyword not in keyword_dict:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. SliceThickness)")
            if dictionary_VR(keyword_dict[keyword]) == "SQ":
                raise ValueError(f"{keyword!r} is a sequence; match a plain attribute")
        return {k: _as_list(v) for k, v in value.items()}

    @field_validator("any_of", "all_of", "none_of", mode="before")
    @classmethod
    def _nested_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def uses_findings(self) -> bool:
        nested = (self.any_of or []) + (self.all_of or []) + (self.none_of or [])
        return self.finding is not None or any(c.uses_findings() for c in nested)


class Actions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heads: list[str] | None = None
    mask_segments: dict[str, str] = Field(
        default_factory=dict,
        description="head name -> label of the SEG segment or RTSTRUCT ROI of the study "
        "that the head's mask comes from (a mask-pooled or lesion-centred head)",
    )
    priority: Literal["routine", "urgent", "stat"] | None = None
    forward: list[str] = Field(default_factory=list)
    results_to: list[str] = Field(default_factory=list)
    discard: bool = False
    stop: bool = False

    @field_validator("heads", "forward", "results_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    def decides_before_inference(self) -> list[str]:
        return [
            name
            for name, given in (
                ("heads", self.heads is not None),
                ("mask_segments", bool(self.mask_segments)),
                ("priority", self.priority is not None),
                ("discard", self.discard),
            )
            if given
        ]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
    description: str | None = None
    enabled: bool = True
    when: Condition = Field(default_factory=Condition)
    then: Actions

    @model_validator(mode="after")
    def _findings_rules_only_route(self) -> Rule:
        early = self.then.decides_before_inference()
        if self.when.uses_findings() and early:
            raise ValueError(
                f"tests findings, so it cannot set {', '.join(early)}: those are decided "
                "before inference; split it into two rules"
            )
        return self


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)
    fallback: Actions | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        if self.fallback is not None and self.fallback.decides_before_inference():
            raise ValueError("fallback may only forward (forward, results_to)")
        return self

    def destinations(self) -> set[str]:
        actions = [rule.then for rule in self.rules] + ([self.fallback] if self.fallback else [])
        return {name for a in actions for name in a.forward + a.results_to}


MAX_RULES_BYTES = 256 * 1024  # far beyond any real rule set


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: an alias (``*name``, or a ``<<`` merge of one) may expand to an
    exponential amount of data from a few hundred bytes, and rules never need one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in rules",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        return super().compose_node(parent, index)


def parse_rules(document: str, known_destinations: Iterable[str] | None = None) -> RuleSet:
    """Parse and validate a YAML rule set; unknown destinations are an error when the known
    ones are given (a typo must not silently drop a STAT study)."""
    if len(document.encode()) > MAX_RULES_BYTES:
        raise RulesError(f"a rule set is at most {MAX_RULES_BYTES} bytes")
    try:
        raw = yaml.load(document, Loader=_NoAliasLoader) if document.strip() else {}
    except yaml.YAMLError as exc:
        raise RulesError(f"not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RulesError("a rule set is a mapping with 'rules' (a list) and optional 'fallback'")
    try:
        rules = RuleSet.model_validate(raw)
    except ValidationError as exc:
        raise RulesError(_explain(exc, raw)) from None
    if known_destinations is not None:
        unknown = sorted(rules.destinations() - set(known_destinations))
        if unknown:
            raise RulesError(f"unknown destination(s): {', '.join(unknown)}")
    return rules


def _explain(exc: ValidationError, raw: dict[str, Any]) -> str:
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            with contextlib.suppress(IndexError, AttributeError, KeyError, TypeError):
                where = f"rule {raw['rules'][loc[1]].get('name', loc[1])!r}" + (
                    f" {'.'.join(str(p) for p in loc[2:])}" if loc[2:] else ""
                )
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


@dataclass(frozen=True)
class Finding:
    """What a rule sees of one head's output."""

    head: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    predicted: str
    regression: bool = False


@dataclass
class SeriesFacts:
    """What the rules are evaluated on; ``findings`` is ``None`` before inference."""

    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    manufacturer: str | None = None
    calling_ae_title: str | None = None
    orientation: str | None = None
    slices: int = 0
    sop_classes: tuple[str, ...] = ()  # of every object in the series
    tags: Callable[[str], str | None] = field(default=lambda _keyword: None, repr=False)
    findings: list[Finding] | None = None


def _text_matches(value: str | None, patterns: list[str]) -> bool:
    text = (value or "").strip().upper()
    for pattern in patterns:
        pattern = str(pattern).strip().upper()
        if pattern == "" and text == "":
            return True
        if pattern and fnmatch.fnmatchcase(text, pattern):
            return True
    return False


def _shown(value: str | None) -> str:
    return repr(value) if value else "(missing)"


class _Evaluator:
    """Evaluates conditions, collecting one human-readable reason per test."""

    def __init__(self, facts: SeriesFacts) -> None:
        self.facts = facts

    def check(self, cond: Condition) -> tuple[bool | None, list[str]]:
        """(True, False, or None when it needs findings not known yet), and why."""
        reasons: list[str] = []
        results: list[bool | None] = []
        ok: bool | None
        facts = self.facts
        text_fields = (
            ("modality", "Modality", facts.modality),
            ("body_part", "BodyPartExamined", facts.body_part),
            ("series_description", "SeriesDescription", facts.series_description),
            ("study_description", "StudyDescription", facts.study_description),
            ("manufacturer", "Manufacturer", facts.manufacturer),
            ("calling_ae_title", "calling AE title", facts.calling_ae_title),
            ("orientation", "orientation", facts.orientation),
        )
        for name, label, value in text_fields:
            patterns = getattr(cond, name)
            if patterns is not None:
                ok = _text_matches(value, patterns)
                verb = "matches" if ok else "does not match"
                reasons.append(f"{label} {_shown(value)} {verb} {patterns}")
                results.append(ok)
        if cond.sop_class is not None:
            ok = any(
                sop_classes.matches(uid, pattern)
                for uid in facts.sop_classes
                for pattern in cond.sop_class
            )
            shown = ", ".join(sop_classes.name(uid) for uid in facts.sop_classes) or "(none)"
            reasons.append(
                f"SOP class {shown} {'matches' if ok else 'does not match'} {cond.sop_class}"
            )
            results.append(ok)
        if cond.min_slices is not None:
            ok = facts.slices >= cond.min_slices
            reasons.append(f"{facts.slices} slices {'>=' if ok else '<'} {cond.min_slices}")
            results.append(ok)
        if cond.max_slices is not None:
            ok = facts.slices <= cond.max_slices
            reasons.append(f"{facts.slices} slices {'<=' if ok else '>'} {cond.max_slices}")
            results.append(ok)
        for keyword, patterns in (cond.tags or {}).items():
            value = facts.tags(keyword)
            ok = _text_matches(value, patterns)
            reasons.append(
                f"{keyword} {_shown(value)} {'matches' if ok else 'does not match'} {patterns}"
            )
            results.append(ok)
        if cond.finding is not None:
            ok, why = self._finding(cond.finding)
            reasons.append(why)
            results.append(ok)
        for group, kind in ((cond.all_of, "all"), (cond.any_of, "any"), (cond.none_of, "not")):
            if group is None:
                continue
            outcomes = [self.check(c) for c in group]
            values = [o[0] for o in outcomes]
            if kind == "all":
                ok = False if False in values else (None if None in values else True)
            elif kind == "any":
                ok = True if True in values else (None if None in values else False)
            else:
                ok = False if True in values else (None if None in values else True)
            inner = "; ".join(r for o in outcomes for r in o[1])
            reasons.append(f"{kind}({inner}) -> {_state(ok)}")
            results.append(ok)
        if False in results:
            return False, reasons
        if None in results:
            return None, reasons
        return True, reasons

    def _finding(self, cond: FindingCondition) -> tuple[bool | None, str]:
        if self.facts.findings is None:
            return None, f"finding of head {cond.head!r}: waits for inference"
        finding = next((f for f in self.facts.findings if f.head == cond.head), None)
        if finding is None:
            return False, f"head {cond.head!r} did not run on this series"
        thresholds = (cond.min_probability, cond.max_probability, cond.min_value, cond.max_value)
        if not cond.label and all(t is None for t in thresholds):
            return True, f"{cond.head}: ran (predicted {finding.predicted!r})"
        if cond.label and all(t is None for t in thresholds):
            ok = finding.predicted.lower() == cond.label.lower()
            verb = "is" if ok else "is not"
            return ok, f"{cond.head}: predicted {finding.predicted!r} {verb} {cond.label!r}"
        if finding.regression:
            value = finding.probabilities[0]
            ok = (cond.min_value is None or value >= cond.min_value) and (
                cond.max_value is None or value <= cond.max_value
            )
            bounds = f"[{cond.min_value}, {cond.max_value}]"
            return ok, f"{cond.head}: value {value:.3g} {'in' if ok else 'outside'} {bounds}"
        labels = [name.lower() for name in finding.labels]
        label = (cond.label or finding.predicted).lower()
        if label not in labels:
            return False, f"{cond.head} has no label {cond.label!r} (labels: {finding.labels})"
        p = finding.probabilities[labels.index(label)]
        ok = (cond.min_probability is None or p >= cond.min_probability) and (
            cond.max_probability is None or p <= cond.max_probability
        )
        low = "" if cond.min_probability is None else f">= {cond.min_probability}"
        high = "" if cond.max_probability is None else f"<= {cond.max_probability}"
        bounds = " and ".join(b for b in (low, high) if b)
        verb = "meets" if ok else "fails"
        return ok, f"{cond.head}: P({label}) = {p:.3f} {verb} {bounds}"


def matches(condition: Condition, facts: SeriesFacts) -> bool:
    """Whether ``facts`` meet ``condition`` (a finding not known yet counts as not met)."""
    return _Evaluator(facts).check(condition)[0] is True


def _state(value: bool | None) -> str:
    return {True: "true", False: "false", None: "waits for findings"}[value]


@dataclass
class RuleOutcome:
    rule: str
    state: Literal["fired", "not matched", "waits for findings", "disabled", "stopped"]
    reasons: list[str]


@dataclass
class Decision:
    """What the rules decided for one series, with the reasons (shown by the rule tester)."""

    phase: Phase
    outcomes: list[RuleOutcome] = field(default_factory=list)
    heads: list[str] | None = None
    mask_segments: dict[str, str] = field(default_factory=dict)  # head -> segment label
    priority: int = 0
    discard: bool = False
    forward: dict[str, str] = field(default_factory=dict)  # destination -> rule
    results_to: dict[str, str] = field(default_factory=dict)
    fallback_used: bool = False

    @property
    def fired(self) -> list[str]:
        return [o.rule for o in self.outcomes if o.state == "fired"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fired"] = self.fired
        data["priority_name"] = next(
            (n for n, v in sorted(PRIORITIES.items(), key=lambda i: -i[1]) if self.priority >= v),
            "routine",
        )
        return data


def evaluate(rules: RuleSet, facts: SeriesFacts) -> Decision:
    """Evaluate every rule in order; the phase is "findings" once ``facts.findings`` is set."""
    phase: Phase = "attributes" if facts.findings is None else "findings"
    decision = Decision(phase=phase)
    evaluator = _Evaluator(facts)
    heads: set[str] | None = None
    stopped_by: str | None = None
    for rule in rules.rules:
        if not rule.enabled:
            decision.outcomes.append(RuleOutcome(rule.name, "disabled", []))
            continue
        if stopped_by is not None:
            decision.outcomes.append(
                RuleOutcome(rule.name, "stopped", [f"rule {stopped_by!r} fired with stop"])
            )
            continue
        ok, reasons = evaluator.check(rule.when)
        if not reasons:
            reasons = ["no conditions: always"]
        if ok is None:
            decision.outcomes.append(RuleOutcome(rule.name, "waits for findings", reasons))
            continue
        if not ok:
            decision.outcomes.append(RuleOutcome(rule.name, "not matched", reasons))
            continue
        decision.outcomes.append(RuleOutcome(rule.name, "fired", reasons))
        then = rule.then
        if then.heads is not None:
            heads = (heads or set()) | set(then.heads)
        for head, label in then.mask_segments.items():
            decision.mask_segments.setdefault(head, label)
        if then.priority is not None:
            decision.priority = max(decision.priority, PRIORITIES[then.priority])
        decision.discard = decision.discard or then.discard
        for name in then.forward:
            decision.forward.setdefault(name, rule.name)
        for name in then.results_to:
            decision.results_to.setdefault(name, rule.name)
        if then.stop:
            stopped_by = rule.name
    decision.heads = sorted(heads) if heads is not None else None
    if phase == "findings" and not decision.fired and rules.fallback is not None:
        decision.fallback_used = True
        for name in rules.fallback.forward:
            decision.forward.setdefault(name, "fallback")
        for name in rules.fallback.results_to:
            decision.results_to.setdefault(name, "fallback")
    return decision
