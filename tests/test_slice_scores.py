"""Per-slice scores of a per-slice head: kept with the finding, and in the SR on each slice.

The SR built on the real sample CT must give each slice where the head saw its finding a
measurement group on that slice (source image and a labelled outline), best first, and stay
valid under dciodvfy, dsrdump, dcentvfy and the PixelMed SR validator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from node.core.settings import packaged_templates_dir
from pipelines.findings import (
    HeadFinding,
    ModelIdentity,
    SeriesFindings,
    findings_from_dict,
    findings_to_dict,
)
from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.heads import demo_head
from pipelines.model.inference import analyse_series, embed_chunks
from pipelines.model.series_plan import plan_series
from pipelines.reporting import slice_groups
from pipelines.reporting.document import build_sr
from pipelines.reporting.files import write_dataset
from pipelines.reporting.provenance import DeviceIdentity, algorithm_identification
from pipelines.reporting.slice_groups import reported_slices
from pipelines.reporting.templates import load_templates
from tests.support.slice_findings import FIRING, firing_head, synthetic_series
from tests.support.testdata import repaired_ct_series
from tests.support.validators import (
    assert_dcentvfy_clean,
    assert_dciodvfy_clean,
    assert_dsrdump_clean,
    assert_pixelmed_sr_clean,
)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return demo_backbone("tiny", seed=0)


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_a_per_slice_finding_keeps_each_slice_score_of_the_finding_class(
    backbone: Backbone, aggregation: str
) -> None:
    series = synthetic_series()
    head = firing_head(
        backbone, series, pooling="slice", aggregation=aggregation, negative_class="absent"
    )
    expected = head.predict(embed_chunks([series.pixels], backbone))[:, 1]
    (finding,) = analyse_series(series, backbone, [head], series_instance_uid="1").findings
    # with max "present" is predicted; with mean "absent" (nothing found) is, and the
    # scores are still those of the finding class
    assert finding.predicted.name == ("present" if aggregation == "max" else "absent")
    assert finding.slice_class == 1
    np.testing.assert_allclose(finding.slice_scores, expected.numpy(), atol=1e-5)
    assert {i for i, s in enumerate(finding.slice_scores) if s >= 0.5} == set(FIRING)


def test_a_series_mean_head_keeps_no_slice_scores(backbone: Backbone) -> None:
    series = synthetic_series()
    head = firing_head(backbone, series, pooling="series_mean_cls")
    (finding,) = analyse_series(series, backbone, [head], series_instance_uid="1").findings
    assert finding.slice_scores == () and finding.slice_class is None


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return repaired_ct_series(tmp_path_factory.mktemp("ct"), "slice-scores")


def _findings(ct: list[Path], scores: list[float]) -> SeriesFindings:
    plan = plan_series(ct)
    classes = demo_head(64).card.head_classes
    chest = [c.name for c in classes].index("chest")
    probabilities = [0.05] * len(classes)
    probabilities[chest] = max(scores)
    finding = HeadFinding(
        head_name="body-region",
        head_version="1",
        task="classification",
        classes=classes,
        probabilities=tuple(probabilities),
        predicted_index=chest,
        key_slice=int(np.argmax(scores)),
        aggregation=f"per-slice scores, max over {len(scores)} slices",
        slice_scores=tuple(scores),
        slice_class=chest,
    )
    return SeriesFindings(
        series_instance_uid=plan.series_instance_uid,
        model=ModelIdentity(name="Curia-B", version="1", demo=False),
        findings=[finding],
        slice_count=len(plan),
        sop_instance_uids_sorted=list(plan.sop_instance_uids),
    )


def _walk(items: list) -> list:
    out = []
    for item in items:
        out.append(item)
        out.extend(_walk(list(item.get("ContentSequence", []))))
    return out


def test_the_sr_has_a_group_on_each_slice_where_the_finding_was_seen(
    ct: list[Path], tmp_path: Path
) -> None:
    scores = [0.1] * 20
    scores[4], scores[9], scores[10] = 0.62, 0.97, 0.8
    findings = _findings(ct, scores)
    again = findings_from_dict(json.loads(json.dumps(findings_to_dict(findings))))
    assert again == findings
    device = DeviceIdentity(
        model_name="Curia Node", software_version="1", device_uid=generate_uid(), device_name="N"
    )
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
    templates = load_templates(packaged_templates_dir())
    sr = build_sr(sources, findings, templates, device)
    path = write_dataset(sr, tmp_path / "sr.dcm")

    groups = [
        item
        for item in _walk(list(sr.ContentSequence))
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]
    per_slice = []
    for group in groups:
        children = list(group.ContentSequence)
        tracking = next(
            c.TextValue
            for c in children
            if c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
        )
        if " - slice " not in tracking:
            continue
        image = next(c for c in children if c.ValueType == "IMAGE")
        num = next(c for c in children if c.ValueType == "NUM")
        value = float(num.MeasuredValueSequence[0].NumericValue)
        per_slice.append((tracking, image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, value))
    uids = findings.sop_instance_uids_sorted
    assert per_slice == [
        ("Body region classification - slice 10", uids[9], 97.0),
        ("Body region classification - slice 11", uids[10], 80.0),
        ("Body region classification - slice 5", uids[4], 62.0),
    ]
    assert len(groups) == 4  # the series group, then the three slices
    assert_dciodvfy_clean(path)
    assert_dsrdump_clean(path)
    assert_pixelmed_sr_clean(path)
    assert_dcentvfy_clean(ct, [path])


def test_at_most_the_best_slices_get_a_group(
    ct: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slice_groups, "MAX_SLICE_GROUPS", 5)
    scores = [float(s) for s in np.random.default_rng(1).uniform(0.5, 1.0, 20)]
    findings = _findings(ct, scores)
    chosen = reported_slices(findings, findings.findings[0])
    assert [i for i, _ in chosen] == sorted(range(20), key=lambda i: -scores[i])[:5]
    assert torch.tensor([s for _, s in chosen]).diff().le(0).all()


def test_the_segmentation_a_mask_pooled_head_read_is_named_in_its_parameters() -> None:
    finding = HeadFinding(
        head_name="infarct",
        head_version="1",
        task="classification",
        classes=demo_head(64).card.head_classes[:2],
        probabilities=(0.3, 0.7),
        predicted_index=1,
        mask_from="segment 'LV scar' of SEG 1.2.3",
    )
    device = DeviceIdentity(
        model_name="node", software_version="1", device_uid=generate_uid(), device_name="n"
    )
    model = ModelIdentity(name="Curia-B", version="1", demo=False)
    parameters = [
        item.TextValue
        for item in algorithm_identification(model, finding, device)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    assert parameters == ["mask: segment 'LV scar' of SEG 1.2.3"]
