"""Mask heads, series masks in the stored orientation, the SEG they become, the SR that
references it; every written object is checked with the standard validators.

Most tests use a stand-in backbone whose first token feature is the patch's mean input
value: with a linear head on that feature the mask must cover the bright pixels, which
makes "the mask lies on the stored pixels it was computed from" checkable exactly.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid
from torch import nn

from node.core.settings import packaged_templates_dir
from pipelines.findings import (
    SEGMENTATION_TASK,
    CodeRef,
    HeadClass,
    HeadFinding,
    ModelIdentity,
    SegmentationError,
    SeriesFindings,
    SeriesMask,
)
from pipelines.model.backbone import CURIA_TINY, Backbone, demo_backbone
from pipelines.model.masks import (
    PRESENT_CLASS,
    MaskHead,
    demo_mask_head,
    load_mask_head,
    make_series_mask,
    save_mask_head,
    segment_series,
    to_stored_orientation,
)
from pipelines.model.preprocess import Reorientation, plan_series
from pipelines.reporting.content import DEMO_STATEMENT, ReportError
from pipelines.reporting.document import build_sr, split_findings
from pipelines.reporting.files import write_dataset
from pipelines.reporting.measurement_groups import LABEL_SCHEME
from pipelines.reporting.provenance import DeviceIdentity, algorithm_name
from pipelines.reporting.seg import build_seg
from pipelines.reporting.templates import ReportTemplate, load_templates
from pipelines.reporting.uids import derived_uid
from tests.support.validators import (
    assert_dcentvfy_clean,
    assert_dciodvfy_clean,
    assert_dsrdump_clean,
    assert_pixelmed_sr_clean,
)

TEMPLATES_DIR = packaged_templates_dir()
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Stored layouts that Curia's PL orientation flips and/or transposes.
REORIENTED = [
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
    (0.0, -1.0, 0.0, 1.0, 0.0, 0.0),
]


# --- helpers -------------------------------------------------------------------------------


class _PatchMeans(nn.Module):
    """Stand-in for Curia: token feature 0 is the patch's mean (z-scored) input value."""

    def __init__(self, hidden: int, patch: int) -> None:
        super().__init__()
        self.hidden, self.patch = hidden, patch
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(x, self.patch).flatten(1)
        tokens = torch.zeros(x.shape[0], 1 + means.shape[1], self.hidden)
        tokens[:, 1:, 0] = means
        return tokens + self.anchor


def _patch_means_backbone() -> Backbone:
    model = _PatchMeans(CURIA_TINY.hidden_size, CURIA_TINY.patch_size).eval()
    identity = ModelIdentity(name="patch-means", version="test", demo=True)
    return Backbone(model=model, spec=CURIA_TINY, identity=identity)


def _bright_patch_head() -> MaskHead:
    """A mask head that marks patches brighter than their slice's mean."""
    head = demo_mask_head(CURIA_TINY.hidden_size)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.weight[0, 0] = 10.0
        head.linear.bias.zero_()
    return head


def _rectangle(k: int) -> tuple[slice, slice]:
    """A bright rectangle that moves with the slice number (so slices can be told apart)."""
    return slice(8 + 4 * k, 24 + 4 * k), slice(4 + 6 * k, 28 + 6 * k)


def _write_series(
    folder: Path,
    n: int,
    *,
    iop: tuple[float, ...] = AXIAL,
    rows: int = 64,
    cols: int = 48,
) -> dict[Path, np.ndarray]:
    """CT_small headers with synthetic pixels: one series, shuffled file order.

    Returns each file's stored mask of bright pixels (a rectangle, different per slice).
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    bright: dict[Path, np.ndarray] = {}
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [
            float(v) for v in (np.array([10.0, -20.0, 0.0]) + 3.0 * k * normal)
        ]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = rows, cols
        pixels = np.full((rows, cols), -1000, dtype=np.int16)
        pixels[_rectangle(k)] = 400
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        bright[path] = pixels > 0
    order = list(bright)
    random.Random(3).shuffle(order)
    return {p: bright[p] for p in order}


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def _walk(items: list[Dataset]) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in items:
        out.append(item)
        out.extend(_walk(list(item.get("ContentSequence", []))))
    return out


@pytest.fixture(scope="module")
def device() -> DeviceIdentity:
    return DeviceIdentity(
        model_name="Curia Node",
        software_version="0.1.0",
        device_uid=generate_uid(),
        device_name="CURIA",
        institution_name="Test Hospital",
    )


@pytest.fixture(scope="module")
def templates() -> dict[str, ReportTemplate]:
    return load_templates(TEMPLATES_DIR)


# --- mask head packages --------------------------------------------------------------------


def test_demo_mask_head_round_trips_and_says_demo(tmp_path: Path) -> None:
    head = demo_mask_head(64, seed=3)
    save_mask_head(head, tmp_path / "mask")
    loaded = load_mask_head(tmp_path / "mask")
    assert loaded.card == head.card
    assert torch.equal(loaded.linear.weight, head.linear.weight)
    assert torch.equal(loaded.linear.bias, head.linear.bias)
    card = loaded.card
    assert card.task == SEGMENTATION_TASK and card.demo
    assert "demo" in card.segment.label.lower() and "NOT A DIAGNOSIS" in card.segment.description
    assert (card.segment.category.value, card.segment.type.value) == (
        codes.cid7150.Tissue.value,
        codes.cid7151.Tissue.value,
    )


def _card_dict(**changes: object) -> dict:
    raw = demo_mask_head(8).card.model_dump()
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "classification"}, "not a mask head"),
        ({"threshold": 1.5}, "threshold"),
        ({"name": "bad name"}, "name"),
        (
            {
                "segment": {
                    **_card_dict()["segment"],
                    "category": {"value": "91772007", "scheme": "SCT", "meaning": "Organ"},
                }
            },
            "CID 7150",
        ),
        (
            {
                "segment": {
                    **_card_dict()["segment"],
                    "type": {"value": "12345", "scheme": "99X", "meaning": "Thing"},
                }
            },
            "CID 7151",
        ),
    ],
)
def test_bad_cards_are_refused_naming_the_problem(
    tmp_path: Path, changes: dict, message: str
) -> None:
    folder = tmp_path / "bad"
    save_mask_head(demo_mask_head(8), folder)
    (folder / "head.json").write_text(json.dumps(_card_dict(**changes)))
    with pytest.raises(SegmentationError, match=message) as info:
        load_mask_head(folder)
    assert "head.json" in str(info.value)


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path: Path) -> None:
    save_mask_head(demo_mask_head(16), tmp_path / "small")
    card = demo_mask_head(8).card
    (tmp_path / "small" / "head.json").write_text(card.model_dump_json())
    with pytest.raises(SegmentationError, match=r"classifier\.weight has shape \[1, 16\]"):
        load_mask_head(tmp_path / "small")


def test_head_for_another_backbone_width_is_refused() -> None:
    head = demo_mask_head(32)
    with pytest.raises(SegmentationError, match="expects tokens of size 32"):
        head.patch_probabilities(torch.zeros(1, 1 + 16, 64))


# --- orientation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transpose", "flip_rows", "flip_cols"), list(itertools.product([False, True], repeat=3))
)
def test_stored_orientation_undoes_every_reorientation(
    transpose: bool, flip_rows: bool, flip_cols: bool
) -> None:
    stored = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    r = Reorientation(transpose=transpose, flip_rows=flip_rows, flip_cols=flip_cols)
    assert np.array_equal(to_stored_orientation(r, r.apply(stored)), stored)


def _expected_from_patient_position(ds: Dataset) -> np.ndarray:
    """Anterior quarter x right half of the slice, found from patient coordinates alone."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    r, c = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
    position = ipp + c[..., None] * iop[:3] + r[..., None] * iop[3:]  # 1 mm spacing
    x, y = position[..., 0], position[..., 1]
    width = len(np.unique(np.round(x, 6)))
    height = len(np.unique(np.round(y, 6)))
    return ((y - y.min()) < height / 4) & ((x - x.min()) < width / 2)


@pytest.mark.parametrize("iop", [AXIAL, *REORIENTED])
def test_a_known_pl_pattern_lands_where_the_patient_is(
    tmp_path: Path, iop: tuple[float, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head says "anterior quarter, right half" (top-left of the PL grid); in the
    stored orientation that must be the pixels whose patient position is there."""
    paths = list(_write_series(tmp_path / "ct", 2, iop=iop))
    head = _bright_patch_head()
    grid = torch.zeros(32, 32)
    grid[:8, :16] = 1.0
    monkeypatch.setattr(
        head, "patch_probabilities", lambda tokens: grid.expand(tokens.shape[0], 32, 32)
    )
    result = segment_series(paths, _patch_means_backbone(), head, batch_size=2)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in _headers(paths)}
    for i, uid in enumerate(result.sop_instance_uids):
        expected = _expected_from_patient_position(by_uid[uid])
        assert np.array_equal(result.mask[i], expected), f"slice {i} ({iop})"


@pytest.mark.parametrize("iop", [AXIAL, *REORIENTED])
def test_mask_lies_on_the_stored_pixels_in_source_order(
    tmp_path: Path, iop: tuple[float, ...]
) -> None:
    bright = _write_series(tmp_path / "ct", 3, iop=iop)
    result = segment_series(list(bright), _patch_means_backbone(), _bright_patch_head())
    assert result.sop_instance_uids == plan_series(list(bright)).sop_instance_uids
    stored = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): m
        for p, m in bright.items()
    }
    for i, uid in enumerate(result.sop_instance_uids):
        assert _iou(result.mask[i], stored[uid]) > 0.8, f"slice {i}"
        others = [m for u, m in stored.items() if u != uid]
        assert all(_iou(result.mask[i], m) < 0.5 for m in others)
    assert result.finding.predicted.name == PRESENT_CLASS
    assert result.finding.key_slice is not None


def test_tiny_demo_backbone_gives_a_mask_per_stored_slice(tmp_path: Path) -> None:
    paths = list(_write_series(tmp_path / "ct", 3, rows=64, cols=48))
    backbone = demo_backbone("tiny", seed=0)
    head = demo_mask_head(backbone.spec.hidden_size, backbone=backbone.identity.name)
    result = segment_series(paths, backbone, head, batch_size=2)
    assert result.mask.shape == (3, 64, 48) and result.mask.dtype == bool
    assert result.sop_instance_uids == plan_series(paths).sop_instance_uids
    finding = result.finding
    assert finding.task == SEGMENTATION_TASK and finding.demo
    assert finding.head_name == "demo-region-mask"
    assert sum(finding.probabilities) == pytest.approx(1.0)
    present = bool(result.mask.any())
    assert finding.predicted_index == int(present)
    if present:
        areas = result.mask.sum(axis=(1, 2))
        assert finding.key_slice == int(np.argmax(areas))


# --- SEG -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(_write_series(tmp_path_factory.mktemp("seg") / "ct", 4))


@pytest.fixture(scope="module")
def series_mask(series: list[Path]) -> SeriesMask:
    """The series' mask with one slice emptied, so that an empty frame must be left out."""
    result = segment_series(series, _patch_means_backbone(), _bright_patch_head())
    mask = result.mask.copy()
    mask[1] = False
    return make_series_mask(
        mask,
        sop_instance_uids=result.sop_instance_uids,
        series_instance_uid=result.series_instance_uid,
        model=result.model,
        mask_head=_bright_patch_head(),
        highest_probability=result.finding.probabilities[1],
    )


@pytest.fixture(scope="module")
def seg(series: list[Path], series_mask: SeriesMask, device: DeviceIdentity) -> hd.seg.Segmentation:
    return build_seg(_headers(series), series_mask, _bright_patch_head(), device)


@pytest.fixture(scope="module")
def seg_path(seg: hd.seg.Segmentation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(seg, tmp_path_factory.mktemp("seg-out") / "seg.dcm")


def test_seg_frames_are_the_non_empty_slices_on_their_sources(
    seg_path: Path, series_mask: SeriesMask
) -> None:
    seg = hd.seg.segread(seg_path)
    non_empty = [i for i in range(len(series_mask.mask)) if series_mask.mask[i].any()]
    assert 0 < len(non_empty) < len(series_mask.mask)
    assert int(seg.NumberOfFrames) == len(non_empty)
    referenced = [
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    # highdicom orders frames along its own spatial axis; each must still name its slice
    assert sorted(referenced) == sorted(series_mask.sop_instance_uids[i] for i in non_empty)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series_mask.sop_instance_uids), segment_numbers=[1]
    )
    assert np.array_equal(pixels[..., 0].astype(bool), series_mask.mask)


def test_seg_identifies_patient_study_segment_and_algorithm(
    seg: hd.seg.Segmentation, series: list[Path], series_mask: SeriesMask, device: DeviceIdentity
) -> None:
    source = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert (seg.Manufacturer, seg.ManufacturerModelName) == ("Curia Node", "Curia Node")
    assert seg.SoftwareVersions == "0.1.0" and seg.DeviceUID == device.device_uid
    assert any(
        e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        for e in seg.ContributingEquipmentSequence
    )
    (segment,) = seg.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == algorithm_name(series_mask.model, "demo-region-mask")
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("85756007", "SCT")
    # demo weights: said in the series, the label and the description
    assert seg.SeriesDescription.endswith("DEMO, NOT FOR DIAGNOSIS")
    assert "demo" in segment.SegmentLabel.lower()
    assert DEMO_STATEMENT in segment.SegmentDescription


def test_seg_from_unchanged_sources_in_any_order(
    series: list[Path], series_mask: SeriesMask, device: DeviceIdentity
) -> None:
    sources = list(reversed(_headers(series)))
    before = copy.deepcopy(sources)
    seg = build_seg(sources, series_mask, _bright_patch_head(), device)
    assert sources == before
    assert seg.NumberOfFrames == sum(bool(m.any()) for m in series_mask.mask)


def test_seg_refuses_sources_that_are_not_the_masked_series(
    series: list[Path], series_mask: SeriesMask, device: DeviceIdentity
) -> None:
    with pytest.raises(SegmentationError, match="no source instance"):
        build_seg(_headers(series)[1:], series_mask, _bright_patch_head(), device)
    other = demo_mask_head(CURIA_TINY.hidden_size)
    other = MaskHead(card=other.card.model_copy(update={"name": "other"}), linear=other.linear)
    with pytest.raises(SegmentationError, match="made by head"):
        build_seg(_headers(series), series_mask, other, device)


def test_seg_uids_follow_the_uid_key(
    series: list[Path], series_mask: SeriesMask, device: DeviceIdentity
) -> None:
    head = _bright_patch_head()

    def built(key: str | None) -> tuple[str, str, str]:
        seg = build_seg(_headers(series), series_mask, head, device, uid_key=key)
        tracking = str(seg.SegmentSequence[0].TrackingUID)
        return str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID), tracking

    first = built("run-7:seg:demo-region-mask")
    assert built("run-7:seg:demo-region-mask") == first
    assert len(set(first)) == 3
    assert set(first).isdisjoint(built("run-7:seg:other"))
    assert set(built(None)).isdisjoint(built(None))


def test_an_sr_and_a_seg_of_one_key_do_not_share_uids(
    series: list[Path], series_mask: SeriesMask, device: DeviceIdentity
) -> None:
    seg = build_seg(_headers(series), series_mask, _bright_patch_head(), device, uid_key="k")
    assert str(seg.SOPInstanceUID) != derived_uid("k", "SR instance")
    assert str(seg.SeriesInstanceUID) != derived_uid("k", "SR series")


def test_dciodvfy_accepts_the_seg(seg_path: Path) -> None:
    assert_dciodvfy_clean(seg_path)


def test_dcentvfy_accepts_sources_and_seg(series: list[Path], seg_path: Path) -> None:
    assert_dcentvfy_clean(series, [seg_path])


# --- SR referencing the SEG ----------------------------------------------------------------


def _findings(series_mask: SeriesMask) -> SeriesFindings:
    return SeriesFindings(
        series_instance_uid=series_mask.series_instance_uid,
        model=series_mask.model,
        findings=[series_mask.finding],
        slice_count=len(series_mask.sop_instance_uids),
        sop_instance_uids_sorted=list(series_mask.sop_instance_uids),
    )


@pytest.fixture(scope="module")
def sr_path(
    series: list[Path],
    series_mask: SeriesMask,
    seg_path: Path,
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    # The SEG as the report step reads it back from disk: its header is enough.
    seg_header = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr = build_sr(
        _headers(series), _findings(series_mask), templates, device, segmentations=[seg_header]
    )
    return write_dataset(sr, tmp_path_factory.mktemp("sr") / "sr.dcm")


def test_sr_group_references_the_segment(sr_path: Path, seg: hd.seg.Segmentation) -> None:
    sr = pydicom.dcmread(sr_path)
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    (group,) = measurements.ContentSequence
    assert group.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
    segment = items[codes.DCM.ReferencedSegment.value]
    reference = segment.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert reference.ReferencedSegmentNumber == 1
    assert seg.SegmentSequence[0].TrackingUID == items[codes.DCM.TrackingUniqueIdentifier.value].UID
    assert items["85756007"].ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_sr_with_segment_passes_dciodvfy_dsrdump_and_dcentvfy(
    sr_path: Path, seg_path: Path, series: list[Path]
) -> None:
    assert_dciodvfy_clean(sr_path)
    assert "Referenced Segment" in assert_dsrdump_clean(sr_path)
    assert_dcentvfy_clean(series, [seg_path, sr_path])


@pytest.mark.slow
def test_pixelmed_accepts_the_sr_with_segment(sr_path: Path) -> None:
    assert_pixelmed_sr_clean(sr_path)


def test_mask_finding_without_its_seg_is_refused(
    series: list[Path],
    series_mask: SeriesMask,
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
) -> None:
    with pytest.raises(ReportError, match="no segment among the given segmentations"):
        build_sr(_headers(series), _findings(series_mask), templates, device)


def test_seg_of_another_series_is_refused(
    series: list[Path],
    series_mask: SeriesMask,
    seg: hd.seg.Segmentation,
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
) -> None:
    other = copy.deepcopy(seg)
    other.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(ReportError, match="does not reference series"):
        build_sr(_headers(series), _findings(series_mask), templates, device, segmentations=[other])


def _with_body_region(series_mask: SeriesMask) -> SeriesFindings:
    regions = ("Head", "Neck", "Chest", "Abdomen", "Pelvis")
    classes = tuple(
        HeadClass(
            name=r.lower(),
            code=CodeRef(getattr(codes.SCT, r).value, "SCT", getattr(codes.SCT, r).meaning),
        )
        for r in regions
    )
    body = HeadFinding(
        head_name="body-region",
        head_version="0.1.0-demo",
        task="classification",
        classes=classes,
        probabilities=(0.1, 0.1, 0.6, 0.1, 0.1),
        predicted_index=2,
        key_slice=0,
        demo=True,
    )
    findings = _findings(series_mask)
    findings.findings = [body, series_mask.finding]
    return findings


def test_every_head_is_drawn_in_one_sr_and_mask_heads_reference_segments_in_another(
    series: list[Path],
    series_mask: SeriesMask,
    seg: hd.seg.Segmentation,
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
) -> None:
    findings = _with_body_region(series_mask)
    with pytest.raises(ReportError, match="split_findings"):
        build_sr(_headers(series), findings, templates, device, segmentations=[seg])
    everything, masks = split_findings(findings)
    assert [f.head_name for f in everything.findings] == ["body-region", "demo-region-mask"]
    assert [f.head_name for f in masks.findings] == ["demo-region-mask"]
    first = build_sr(_headers(series), everything, templates, device)
    second = build_sr(_headers(series), masks, templates, device, segmentations=[seg])
    assert first.SeriesInstanceUID != second.SeriesInstanceUID

    # In the first SR the mask finding is drawn where the mask is largest, with its label.
    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    labels = [
        (num.ConceptNameCodeSequence[0].CodeMeaning, num)
        for num in walk(first.ContentSequence)
        if num.ValueType == "NUM"
        and num.ConceptNameCodeSequence[0].CodingSchemeDesignator == LABEL_SCHEME
    ]
    meanings = [meaning for meaning, _ in labels]
    assert meanings == ["DEMO Chest probability", "DEMO Segmented region probability"]
    _, mask_label = labels[1]
    finding = series_mask.finding
    scoord = mask_label.ContentSequence[0]
    r0, c0, r1, c1 = finding.key_region
    assert [float(v) for v in scoord.GraphicData] == [c0, r0, c1, r0, c1, r1, c0, r1, c0, r0]
    assert float(mask_label.MeasuredValueSequence[0].NumericValue) == pytest.approx(
        round(finding.probabilities[1] * 100, 2)
    )


# --- the real sample CT --------------------------------------------------------------------


def test_real_ct_seg_and_sr_pass_the_validators(
    ct_series: list[Path],
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
    tmp_path: Path,
) -> None:
    """20 JPEG 2000 slices through the tiny demo backbone and the demo mask head."""
    backbone = demo_backbone("tiny", seed=0)
    head = demo_mask_head(backbone.spec.hidden_size, backbone=backbone.identity.name)
    result = segment_series(ct_series, backbone, head, batch_size=10)
    assert result.mask.shape == (20, 512, 512)
    sources = _headers(ct_series)
    seg_file = write_dataset(build_seg(sources, result, head, device), tmp_path / "seg.dcm")
    seg_header = pydicom.dcmread(seg_file, stop_before_pixels=True)
    sr = build_sr(sources, _findings(result), templates, device, segmentations=[seg_header])
    sr_file = write_dataset(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(seg_file)
    assert_dciodvfy_clean(sr_file)
    assert_dsrdump_clean(sr_file)
    assert_dcentvfy_clean(ct_series, [seg_file, sr_file])


def test_empty_mask_reports_absent_and_still_makes_a_valid_seg(
    series: list[Path],
    series_mask: SeriesMask,
    device: DeviceIdentity,
    templates: dict[str, ReportTemplate],
    tmp_path: Path,
) -> None:
    head = _bright_patch_head()
    empty = make_series_mask(
        np.zeros_like(series_mask.mask),
        sop_instance_uids=series_mask.sop_instance_uids,
        series_instance_uid=series_mask.series_instance_uid,
        model=series_mask.model,
        mask_head=head,
        highest_probability=0.2,
    )
    assert empty.finding.predicted.name == "absent" and empty.finding.key_slice is None
    seg = build_seg(_headers(series), empty, head, device)
    assert int(seg.NumberOfFrames) == len(series)  # a SEG needs frames: all are kept
    sr = build_sr(_headers(series), _findings(empty), templates, device, segmentations=[seg])
    evaluation = [
        i
        for i in _walk(list(sr.ContentSequence))
        if i.ConceptNameCodeSequence[0].CodeValue == "85756007"
    ]
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value
    assert_dciodvfy_clean(write_dataset(seg, tmp_path / "seg.dcm"))
