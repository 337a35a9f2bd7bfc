"""Per-slice heads: a finding on a few slices is reported on its slice, not averaged away."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from pydicom.uid import generate_uid

from pipelines.findings import (
    HeadFinding,
    ModelIdentity,
    SeriesFindings,
    findings_from_dict,
    findings_to_dict,
)
from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.head_card import HeadCard
from pipelines.model.inference import analyse_series, embed_chunks
from pipelines.model.pooling import aggregate_slices
from pipelines.model.stack_analysis import analyse_units, choose_units
from pipelines.model.stacks import SeriesStacks, Skipped
from pipelines.reporting.provenance import DeviceIdentity, algorithm_identification
from tests.support.slice_findings import CLASSES, FIRING, firing_head, synthetic_series


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return demo_backbone("tiny", seed=0)


def test_max_reports_the_finding_on_its_slice_and_the_series_mean_does_not(
    backbone: Backbone,
) -> None:
    series = synthetic_series()
    per_slice = firing_head(
        backbone, series, name="per-slice", pooling="slice", negative_class="absent"
    )
    mean_cls = firing_head(backbone, series, name="mean", pooling="series_mean_cls")
    assert mean_cls.card.pooling == "mean_cls"
    scores = per_slice.predict(embed_chunks([series.pixels], backbone))[:, 1]
    assert set(torch.nonzero(scores > 0.5).flatten().tolist()) == set(FIRING)

    found, averaged = analyse_series(
        series, backbone, [per_slice, mean_cls], series_instance_uid="1"
    ).findings
    assert found.predicted.name == "present" and found.probabilities[1] > 0.9
    assert found.key_slice == int(torch.argmax(scores)) and found.key_slice in FIRING
    assert found.aggregation == "per-slice scores, max over 100 slices"
    assert averaged.predicted.name == "absent" and averaged.probabilities[1] < 0.5
    assert averaged.aggregation is None

    # the per-slice mean dilutes it away too
    mean = firing_head(
        backbone,
        series,
        name="mean-of-slices",
        pooling="slice",
        aggregation="mean",
        negative_class="absent",
    )
    (diluted,) = analyse_series(series, backbone, [mean], series_instance_uid="1").findings
    assert diluted.predicted.name == "absent"


def test_per_slice_head_on_two_stacks_points_at_the_slice_of_the_stack_it_fired_on(
    backbone: Backbone,
) -> None:
    """One multi-frame object holding two axial stacks (and a short one the card refuses):
    the finding is on the second stack, and the report's key slice must be that stack's
    firing slice, with its frame number in the object."""
    first = synthetic_series(
        40, (), seed=1, label="axial stack 1 (40 slices)", frames=tuple(range(1, 41))
    )
    # the second stack's frames are stored in reverse order in the object
    second = synthetic_series(label="axial stack 2 (100 slices)", frames=tuple(range(140, 40, -1)))
    short = synthetic_series(10, (4,), seed=2, label="axial stack 3 (10 slices)")
    head = firing_head(backbone, second, pooling="slice", negative_class="absent", min_slices=30)
    prepared = {s.plan.label: s for s in (first, second, short)}
    planned = SeriesStacks(
        stacks=[first.plan, second.plan, short.plan],
        skipped=[Skipped("localizer (1 slice, 512x512)", "localizer")],
    )
    units, skipped = choose_units(planned, [head], [])
    assert [u.plan.label for u in units] == [first.plan.label, second.plan.label]

    findings, masks = analyse_units(
        units,
        skipped,
        backbone,
        series_instance_uid="1",
        prepared=lambda unit: prepared[unit.plan.label],
    )
    assert masks == []
    quiet, fired = findings.findings
    assert (quiet.stack, fired.stack) == (first.plan.label, second.plan.label)
    assert quiet.predicted.name == "absent" and fired.predicted.name == "present"
    assert fired.aggregation == "per-slice scores, max over 100 slices"
    assert findings.stacks == {first.plan.label: [0, 40], second.plan.label: [40, 140]}
    assert fired.key_slice in findings.slices_of(second.plan.label)
    firing_uids = {second.plan.sop_instance_uids[i] for i in FIRING}
    assert fired.key_slice is not None
    assert findings.sop_instance_uids_sorted[fired.key_slice] in firing_uids
    firing_frames = {second.plan.frames[i] for i in FIRING}
    assert findings.frame_of(fired.key_slice) in firing_frames
    assert quiet.key_slice in findings.slices_of(first.plan.label)
    assert findings.set_aside == [
        "localizer (1 slice, 512x512)",
        "axial stack 3 (10 slices): 10 slices, heads need 30",
    ]
    assert findings.heads_not_run == {}


def test_aggregations() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.95, 0.05]])
    top = aggregate_slices(scores, "top_k_mean", top_k=2, negative_class=0)
    assert top.outputs[1] == pytest.approx(0.45) and top.outputs[0] == pytest.approx(0.55)
    assert top.predicted == 0 and top.key_slice == 3
    biggest = aggregate_slices(scores, "max")
    assert biggest.outputs.tolist() == pytest.approx([0.95, 0.7]) and biggest.key_slice == 3
    values = torch.tensor([[40.0], [60.0], [50.0]])
    assert aggregate_slices(values, "mean", regression=True).outputs[0] == pytest.approx(50.0)
    assert aggregate_slices(values, "mean", regression=True).key_slice is None
    assert aggregate_slices(values, "max", regression=True).key_slice == 1
    with pytest.raises(ValueError, match="S >= 1"):
        aggregate_slices(torch.zeros(0, 2), "max")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pooling": "mean_cls", "aggregation": "max"}, "remove aggregation"),
        ({"pooling": "slice", "aggregation": "top_k_mean"}, "needs top_k"),
        ({"pooling": "slice", "top_k": 3}, "top_k applies"),
        ({"pooling": "slice", "negative_class": "normal"}, "is not one of the classes"),
        ({"pooling": "mean_cls", "negative_class": "absent"}, "negative_class applies"),
        ({"pooling": "slice", "mask_source": "heart"}, "mask_source applies"),
        ({"pooling": "window3d"}, "pooling"),
    ],
)
def test_input_contract_is_checked(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HeadCard(
            name="h",
            version="1",
            task="classification",
            classes=CLASSES,
            hidden_size=8,
            backbone="x",
            **fields,
        )


def test_existing_cards_keep_their_meaning() -> None:
    """A card written before the input contract: series-mean CLS, clamp off, folder variant."""
    card = HeadCard.model_validate(
        {
            "name": "old",
            "version": "1",
            "task": "classification",
            "classes": [{"name": "a"}, {"name": "b"}],
            "pooling": "mean_cls",
            "hidden_size": 8,
            "backbone": "x",
            "clip_below_air": False,
        }
    )
    assert (card.pooling, card.aggregation, card.clip_below_air) == ("mean_cls", None, False)
    assert card.processor is None and card.token_source == "final_norm"


def test_report_names_the_aggregation() -> None:
    finding = HeadFinding(
        head_name="finder",
        head_version="1",
        task="classification",
        classes=tuple(c.to_head_class() for c in CLASSES),
        probabilities=(0.05, 0.95),
        predicted_index=1,
        key_slice=42,
        aggregation="per-slice scores, max over 100 slices",
    )
    model = ModelIdentity(name="Curia-B", version="1", demo=False)
    device = DeviceIdentity(
        model_name="node", software_version="1", device_uid=generate_uid(), device_name="n"
    )
    algorithm = algorithm_identification(model, finding, device)
    parameters = [
        item.TextValue
        for item in algorithm
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    assert "series value: per-slice scores, max over 100 slices" in parameters


def test_aggregation_stack_and_not_analysed_survive_the_catalogue_round_trip() -> None:
    finding = HeadFinding(
        head_name="finder",
        head_version="1",
        task="classification",
        classes=tuple(c.to_head_class() for c in CLASSES),
        probabilities=(0.05, 0.95),
        predicted_index=1,
        key_slice=42,
        aggregation="per-slice scores, max over 100 slices",
        stack="axial 2",
    )
    findings = SeriesFindings(
        series_instance_uid="1.2.3",
        model=ModelIdentity(name="Curia-B", version="1", demo=False),
        findings=[finding],
        sop_instance_uids_sorted=[f"1.2.3.{i}" for i in range(103)],
        stacks={"localizer": [0, 3], "axial 2": [3, 103]},
        heads_not_run={"infarct": "axial 2: not analysed: no mask"},
        set_aside=["localizer (1 slice, 512x512): localizer"],
    )
    again = findings_from_dict(json.loads(json.dumps(findings_to_dict(findings))))
    assert again == findings
