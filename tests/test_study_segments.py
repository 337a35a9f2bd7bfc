"""Masks from the study's SEG and RTSTRUCT objects: read, placed on the stack, pooled in.

The SEG is made with highdicom and the RTSTRUCT with pydicom on the real sample CT, from
known masks; what the node reads back is compared with those masks, and a mask-pooled
head's output with the one it gives on the known mask directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread

from node.core.rules import RulesError, SeriesFacts, evaluate, parse_rules
from pipelines.jobs.segment_reader import read_rtstruct, read_seg, read_segments
from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.head_card import CodeCard, HeadCard, SegmentRef
from pipelines.model.heads import Head, demo_head
from pipelines.model.mask_pooling import NO_MASK, mask_pooled_prediction
from pipelines.model.segment_masks import fill_polygon, segment_masks, stack_grid
from pipelines.model.series_plan import SeriesPlan, plan_series
from pipelines.model.stack_analysis import analyse_units, choose_units
from pipelines.model.stacks import SeriesStacks
from tests.support.segmentations import rectangle_contour, write_rtstruct, write_seg
from tests.support.testdata import repaired_ct_series


def test_polygon_fill_takes_the_pixels_whose_centre_is_inside() -> None:
    # a diamond with non-integer corners: no pixel centre lies on its edge
    centre_r, centre_c, half_r, half_c = 20.3, 31.7, 9.4, 14.2
    rows, cols = (
        [centre_r - half_r, centre_r, centre_r + half_r, centre_r],
        [
            centre_c,
            centre_c + half_c,
            centre_c,
            centre_c - half_c,
        ],
    )
    got = fill_polygon(48, 64, np.array(rows), np.array(cols))
    r, c = np.mgrid[0:48, 0:64]
    expected = np.abs(r - centre_r) / half_r + np.abs(c - centre_c) / half_c < 1
    assert got.sum() > 100
    np.testing.assert_array_equal(got, expected)


def test_polygon_fill_clips_to_the_image() -> None:
    got = fill_polygon(10, 10, np.array([-5.5, -5.5, 4.5, 4.5]), np.array([-5.5, 4.5, 4.5, -5.5]))
    expected = np.zeros((10, 10), dtype=bool)
    expected[:5, :5] = True
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SeriesPlan:
    return plan_series(repaired_ct_series(tmp_path_factory.mktemp("ct"), "study-segments"))


def _known_mask(plan: SeriesPlan) -> np.ndarray:
    mask = np.zeros((len(plan), plan.rows, plan.columns), dtype=bool)
    r, c = np.mgrid[0 : plan.rows, 0 : plan.columns]
    for k in range(6, 11):
        mask[k] = (r - 260) ** 2 / 60**2 + (c - 300) ** 2 / (40 + 4 * k) ** 2 < 1
    return mask


def _rectangles(plan: SeriesPlan) -> tuple[dict[int, np.ndarray], np.ndarray]:
    contours = {}
    expected = np.zeros((len(plan), plan.rows, plan.columns), dtype=bool)
    for k in (7, 8, 9):
        ds = dcmread(plan.paths[k], stop_before_pixels=True)
        contours[k] = rectangle_contour(ds, (200, 300), (150 + k, 280))
        expected[k, 200:300, 150 + k : 280] = True
    return contours, expected


@pytest.fixture(scope="module")
def seg_path(ct: SeriesPlan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seg(ct.paths, _known_mask(ct), "Liver", tmp_path_factory.mktemp("seg"), seed="a")


@pytest.fixture(scope="module")
def rtstruct_path(ct: SeriesPlan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    contours, _ = _rectangles(ct)
    return write_rtstruct(ct.paths, contours, "LIVER", tmp_path_factory.mktemp("rt"), seed="a")


@pytest.mark.parametrize(
    "ref",
    [
        SegmentRef(segment=" liver "),
        SegmentRef(segment=CodeCard(value="10200004", scheme="SCT", meaning="Liver")),
        SegmentRef(segment="Liver", objects=["SEG"]),
    ],
)
def test_a_seg_segment_lands_on_the_slices_it_was_drawn_on(
    ct: SeriesPlan, seg_path: Path, ref: SegmentRef
) -> None:
    found = segment_masks(stack_grid(ct), {"h": ref}, read_seg(seg_path))
    mask, segment = found["h"]
    np.testing.assert_array_equal(mask, _known_mask(ct))
    assert segment.kind == "SEG" and segment.label == "Liver"


def test_a_seg_without_source_references_is_placed_by_position(
    ct: SeriesPlan, seg_path: Path, tmp_path: Path
) -> None:
    ds = dcmread(seg_path)
    for group in ds.PerFrameFunctionalGroupsSequence:
        del group.DerivationImageSequence
    ds.ReferencedSeriesSequence = []
    path = tmp_path / "by-position.dcm"
    ds.save_as(path)
    segments = read_seg(path)
    assert not any(frame.source_uid for frame in segments[0].frames)
    found = segment_masks(stack_grid(ct), {"h": SegmentRef(segment="Liver")}, segments)
    np.testing.assert_array_equal(found["h"][0], _known_mask(ct))


def test_an_rtstruct_roi_is_filled_on_the_stack_grid(ct: SeriesPlan, rtstruct_path: Path) -> None:
    _, expected = _rectangles(ct)
    found = segment_masks(
        stack_grid(ct), {"h": SegmentRef(segment="Liver")}, read_rtstruct(rtstruct_path)
    )
    np.testing.assert_array_equal(found["h"][0], expected)


def test_a_segment_of_another_kind_name_or_frame_of_reference_is_not_used(
    ct: SeriesPlan, seg_path: Path, rtstruct_path: Path, tmp_path: Path
) -> None:
    grid = stack_grid(ct)
    segments = read_segments(
        [
            ("1.2.840.10008.5.1.4.1.1.66.4", seg_path),
            ("1.2.840.10008.5.1.4.1.1.481.3", rtstruct_path),
        ]
    )
    assert [s.kind for s in segments] == ["SEG", "RTSTRUCT"]
    assert segment_masks(grid, {"h": SegmentRef(segment="Kidney")}, segments) == {}
    only_rt = segment_masks(
        grid, {"h": SegmentRef(segment="Liver", objects=["RTSTRUCT"])}, segments
    )
    assert only_rt["h"][1].kind == "RTSTRUCT"
    # both name the liver: the latest to arrive is taken
    assert (
        segment_masks(grid, {"h": SegmentRef(segment="Liver")}, segments)["h"][1].kind == "RTSTRUCT"
    )
    elsewhere = dcmread(rtstruct_path)
    elsewhere.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = "1.2.3.4"
    elsewhere.save_as(tmp_path / "elsewhere.dcm")
    assert (
        segment_masks(
            grid, {"h": SegmentRef(segment="Liver")}, read_rtstruct(tmp_path / "elsewhere.dcm")
        )
        == {}
    )


def _segment_head(backbone: Backbone, name: str, source: str | SegmentRef) -> Head:
    base = demo_head(backbone.spec.hidden_size, seed=3)
    card = HeadCard.model_validate(
        {**base.card.model_dump(), "name": name, "pooling": "mask", "mask_source": source}
    )
    return Head(card=card, linear=base.linear)


def test_a_mask_pooled_head_reads_the_study_segment_as_it_reads_the_mask_itself(
    ct: SeriesPlan, seg_path: Path
) -> None:
    backbone = demo_backbone("tiny", seed=0)
    head = _segment_head(backbone, "liver-state", {"segment": "Liver"})  # type: ignore[arg-type]
    lost = _segment_head(backbone, "kidney-state", {"segment": "Kidney"})  # type: ignore[arg-type]
    units, skipped = choose_units(SeriesStacks(stacks=[ct], skipped=[]), [head, lost], [])
    segments = read_seg(seg_path)
    grid = stack_grid(ct)

    def given(unit: object) -> dict[str, np.ndarray]:
        wanted = {h.name: h.card.segment_source for h in (head, lost)}
        return {n: m for n, (m, _) in segment_masks(grid, wanted, segments).items()}  # type: ignore[arg-type]

    findings, _ = analyse_units(
        units, skipped, backbone, series_instance_uid=ct.series_instance_uid, given_masks=given
    )
    (finding,) = findings.findings
    clip, variant = head.card.preprocessing(backbone.preprocessing)
    reference = mask_pooled_prediction(
        head, ct, _known_mask(ct), backbone, clip_below_air=clip, variant=variant
    )
    assert reference is not None
    np.testing.assert_allclose(finding.probabilities, reference.outputs.numpy(), atol=1e-6)
    assert finding.key_slice == reference.key_slice and 6 <= finding.key_slice <= 10
    assert findings.heads_not_run == {"kidney-state": NO_MASK}


def test_cards_and_rules_name_study_segments() -> None:
    backbone_width = 64
    base = demo_head(backbone_width).card.model_dump()
    card = HeadCard.model_validate(
        {**base, "pooling": "mask", "mask_source": {"segment": "Liver", "objects": ["SEG"]}}
    )
    assert card.segment_source == SegmentRef(segment="Liver", objects=["SEG"])
    assert card.mask_head is None
    assert HeadCard.model_validate_json(card.model_dump_json()) == card
    named = HeadCard.model_validate({**base, "pooling": "mask", "mask_source": "heart"})
    assert (named.mask_head, named.segment_source) == ("heart", None)
    with pytest.raises(ValidationError, match="objects"):
        HeadCard.model_validate(
            {**base, "pooling": "mask", "mask_source": {"segment": "Liver", "objects": ["CT"]}}
        )
    rules = parse_rules(
        "rules:\n  - name: liver\n    when: {modality: CT}\n"
        "    then: {mask_segments: {liver-state: Liver contour}}\n"
    )
    decision = evaluate(rules, SeriesFacts(modality="CT"))
    assert decision.mask_segments == {"liver-state": "Liver contour"}
    with pytest.raises(RulesError, match="mask_segments"):
        parse_rules(
            "rules:\n  - name: late\n    when: {finding: {head: a, label: b}}\n"
            "    then: {mask_segments: {a: b}}\n"
        )
