"""Routing rules: parsing, safe evaluation, explanations, and the two decision phases."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.core.rules import Finding, RulesError, SeriesFacts, evaluate, parse_rules

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "routing-rules.yaml"
DESTINATIONS = ["archive", "neuro-stat", "abdominal-pacs", "dose-registry"]


def ct(**overrides: object) -> SeriesFacts:
    values: dict[str, object] = {
        "modality": "CT",
        "body_part": "HEAD",
        "series_description": "Routine head",
        "slices": 120,
        "calling_ae_title": "CT1",
    }
    values.update(overrides)
    return SeriesFacts(**values)  # type: ignore[arg-type]


def region(label: str, p: float) -> Finding:
    labels = ("head", "neck", "chest", "abdomen", "pelvis")
    rest = (1 - p) / (len(labels) - 1)
    probabilities = tuple(p if name == label else rest for name in labels)
    return Finding("body-region", labels, probabilities, label)


def test_example_rules_are_valid_and_refuse_unknown_destinations() -> None:
    rules = parse_rules(EXAMPLE.read_text(), DESTINATIONS)
    assert [r.name for r in rules.rules][:2] == ["skip-localisers", "ct-head-stat"]
    with pytest.raises(RulesError, match=r"unknown destination.*neuro-stat"):
        parse_rules(EXAMPLE.read_text(), ["archive", "abdominal-pacs"])


def test_head_ct_is_stat_and_forwarded_before_inference() -> None:
    rules = parse_rules(EXAMPLE.read_text())
    decision = evaluate(rules, ct())
    assert decision.phase == "attributes"
    assert decision.fired == ["ct-head-stat"]
    assert decision.priority == 9 and decision.to_dict()["priority_name"] == "stat"
    assert decision.forward == {"neuro-stat": "ct-head-stat"}
    states = {o.rule: o.state for o in decision.outcomes}
    assert states["ct-head-haemorrhage"] == "waits for findings"
    assert states["skip-localisers"] == "not matched"
    explained = {o.rule: o.reasons for o in decision.outcomes}
    assert "120 slices > 3" in explained["skip-localisers"]
    assert any("BodyPartExamined 'HEAD' matches" in r for r in explained["ct-head-stat"])


def test_description_pattern_catches_a_head_ct_without_body_part() -> None:
    decision = evaluate(
        parse_rules(EXAMPLE.read_text()), ct(body_part=None, series_description="CT BRAIN w/o")
    )
    assert "ct-head-stat" in decision.fired


def test_localiser_is_discarded_and_stops_evaluation() -> None:
    decision = evaluate(parse_rules(EXAMPLE.read_text()), ct(slices=2))
    assert decision.discard and decision.fired == ["skip-localisers"]
    assert {o.state for o in decision.outcomes[1:]} == {"stopped"}


def test_route_by_curia_region_when_the_header_is_missing_or_wrong() -> None:
    rules = parse_rules(EXAMPLE.read_text())
    for header in (None, "CHEST"):
        facts = ct(body_part=header, series_description="", findings=[region("abdomen", 0.9)])
        decision = evaluate(rules, facts)
        assert decision.phase == "findings"
        assert decision.forward == {"abdominal-pacs": "abdomen-by-curia"}, header
    # A correct header, or an unsure model, does not re-route.
    assert (
        "abdomen-by-curia"
        not in evaluate(rules, ct(body_part="ABDOMEN", findings=[region("abdomen", 0.9)])).fired
    )
    unsure = evaluate(rules, ct(body_part=None, findings=[region("abdomen", 0.5)]))
    assert "abdomen-by-curia" not in unsure.fired
    reasons = next(o.reasons for o in unsure.outcomes if o.rule == "abdomen-by-curia")
    assert "body-region: P(abdomen) = 0.500 fails >= 0.6" in reasons


def test_threshold_on_a_head_that_did_not_run_does_not_fire() -> None:
    decision = evaluate(parse_rules(EXAMPLE.read_text()), ct(findings=[region("head", 0.9)]))
    outcome = next(o for o in decision.outcomes if o.rule == "ct-head-haemorrhage")
    assert outcome.state == "not matched"
    assert "head 'haemorrhage' did not run on this series" in outcome.reasons


def test_haemorrhage_sends_results_to_neuro() -> None:
    bleed = Finding("haemorrhage", ("absent", "present"), (0.1, 0.9), "present")
    decision = evaluate(parse_rules(EXAMPLE.read_text()), ct(findings=[bleed]))
    assert decision.results_to == {"neuro-stat": "ct-head-haemorrhage"}
    assert decision.forward == {"neuro-stat": "ct-head-stat"}  # attribute rules still hold


def test_fallback_applies_only_after_findings_when_nothing_fired() -> None:
    rules = parse_rules(
        """
rules:
  - name: mr-only
    when: {modality: MR}
    then: {forward: [mr-pacs]}
fallback:
  forward: [archive2]
"""
    )
    assert evaluate(rules, ct()).forward == {}
    after = evaluate(rules, ct(findings=[]))
    assert after.fallback_used and after.forward == {"archive2": "fallback"}
    mr = evaluate(rules, ct(modality="MR", findings=[]))
    assert not mr.fallback_used and mr.forward == {"mr-pacs": "mr-only"}


def test_heads_are_the_union_and_priority_the_highest() -> None:
    rules = parse_rules(
        """
rules:
  - {name: a, when: {modality: CT}, then: {heads: [x], priority: urgent}}
  - {name: b, when: {calling_ae_title: "CT*"}, then: {heads: [y], priority: stat}}
  - {name: c, when: {manufacturer: ""}, then: {heads: [z]}}
  - {name: d, enabled: false, when: {}, then: {discard: true}}
"""
    )
    decision = evaluate(rules, ct())
    assert decision.heads == ["x", "y", "z"] and decision.priority == 9
    assert not decision.discard and decision.outcomes[-1].state == "disabled"


def test_tag_conditions_read_any_attribute_by_keyword() -> None:
    rules = parse_rules(
        "rules: [{name: thin, when: {tags: {SliceThickness: ['0.5', '1', '1.0']}}, "
        "then: {forward: [x]}}]"
    )
    tags = {"SliceThickness": "1.0"}
    assert evaluate(rules, ct(tags=tags.get)).fired == ["thin"]
    assert evaluate(rules, ct()).fired == []


def test_sop_class_conditions_match_any_object_by_uid_keyword_or_name() -> None:
    """Dose reports go to the dose registry whatever else their series holds; a CT series
    does not, and a localiser rule on images leaves a one-object dose series alone."""
    rules = parse_rules(EXAMPLE.read_text(), DESTINATIONS)
    dose = ct(modality="SR", slices=1, sop_classes=("1.2.840.10008.5.1.4.1.1.88.67",))
    decision = evaluate(rules, dose)
    assert decision.fired == ["dose-to-registry"] and not decision.discard
    assert decision.forward == {"dose-registry": "dose-to-registry"}
    explained = {o.rule: o.reasons for o in decision.outcomes}
    assert "SOP class X-Ray Radiation Dose SR matches" in explained["dose-to-registry"][0]
    images = ct(sop_classes=("1.2.840.10008.5.1.4.1.1.2",))
    assert "dose-to-registry" not in evaluate(rules, images).fired
    for pattern in ("1.2.840.10008.5.1.4.1.1.88.67", "x-ray radiation dose sr storage", "*Dose*"):
        one = parse_rules(f"rules: [{{name: d, when: {{sop_class: '{pattern}'}}, then: {{}}}}]")
        assert evaluate(one, dose).fired == ["d"], pattern
        assert evaluate(one, images).fired == [], pattern


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("rules: [{name: a, then: {frobnicate: true}}]", "rule 'a' then.frobnicate"),
        ("rules: [{name: a, when: {tags: {NotAKeyword: x}}, then: {}}]", "not a DICOM keyword"),
        (
            "rules: [{name: a, when: {finding: {head: h, label: y}}, then: {priority: stat}}]",
            "cannot set priority: those are decided before inference",
        ),
        ("rules: [{name: a, then: {}}, {name: a, then: {}}]", "rule names must be unique: a"),
        (
            "rules: [{name: a, when: {finding: {head: h, min_probability: 0.5}}, then: {}}]",
            "needs the label",
        ),
        ("rules: {name: a}", "rules"),
        ("- a\n- b", "a rule set is a mapping"),
        ("rules: [{name: a, then: {discard: true", "not valid YAML"),
        ("fallback: {discard: true}", "fallback may only forward"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(document: str, message: str) -> None:
    with pytest.raises(RulesError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_rules(document)


def test_rules_are_never_executed_as_code() -> None:
    payload = 'rules: [{name: a, when: {modality: \'__import__("os").system("false")\'}, then: {}}]'
    decision = evaluate(parse_rules(payload), ct())
    assert decision.fired == []  # a pattern that simply does not match 'CT'
