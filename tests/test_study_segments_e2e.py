"""Mask-pooled heads fed by the site's own segmentations, through a real node.

The real CT is sent first over DIMSE: its two mask-pooled heads (one reading a SEG
segment, one an RTSTRUCT ROI) have no mask yet and say so. The SEG (highdicom) and the
RTSTRUCT (pydicom) drawn on it arrive afterwards in their own series; their completion
re-runs the CT, whose heads now read them. Each head's output must equal the one the same
head gives on the known mask itself, computed here with the same demo backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import PipelineRun, Series
from pipelines.model.backbone import demo_backbone
from pipelines.model.head_card import HeadCard
from pipelines.model.heads import Head, demo_head, save_head
from pipelines.model.mask_pooling import NO_MASK, mask_pooled_prediction
from pipelines.model.series_plan import plan_series
from tests.support.env import node_env
from tests.support.modality import association, store
from tests.support.peers import Orthanc, wait_for
from tests.support.segmentations import rectangle_contour, write_rtstruct, write_seg
from tests.support.storescu import send_to_node
from tests.support.validators import assert_dciodvfy_clean, assert_pixelmed_sr_clean

TEMPLATE = Path(__file__).resolve().parents[1] / "sr_templates" / "body-region.yaml"
SOURCES = {
    "liver-seg": {"segment": "Liver", "objects": ["SEG"]},
    "liver-rt": {"segment": "liver", "objects": ["RTSTRUCT"]},
}


def _heads(hidden: int, heads_dir: Path, templates: Path) -> dict[str, Head]:
    templates.mkdir(parents=True)
    heads = {}
    for n, (name, source) in enumerate(SOURCES.items()):
        base = demo_head(hidden, seed=11 + n)
        card = HeadCard.model_validate(
            {
                **base.card.model_dump(),
                "name": name,
                "pooling": "mask",
                "mask_source": source,
                "demo": True,
            }
        )
        heads[name] = Head(card=card, linear=base.linear)
        save_head(heads[name], heads_dir / name)
        text = TEMPLATE.read_text().replace("head: body-region", f"head: {name}")
        (templates / f"{name}.yaml").write_text(text)
    return heads


def _runs(catalogue: Catalogue, series_uid: str) -> list[tuple[str, dict | None]]:
    with catalogue.session() as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return []
        rows = session.scalars(
            select(PipelineRun).where(PipelineRun.series_id == series.id).order_by(PipelineRun.id)
        ).all()
        return [(str(run.state), run.findings) for run in rows]


@pytest.mark.e2e
def test_segmentations_sent_after_the_images_feed_the_mask_pooled_heads(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path
) -> None:
    backbone = demo_backbone("tiny", seed=0)
    heads = _heads(backbone.spec.hidden_size, tmp_path / "heads", tmp_path / "templates")
    env = node_env(
        tmp_path,
        orthanc,
        CURIA_MODEL__HEADS_DIR=str(tmp_path / "heads"),
        CURIA_TEMPLATES_DIR=str(tmp_path / "templates"),
    )
    node = node_factory(env)
    catalogue = Catalogue(f"sqlite:///{tmp_path / 'data' / 'catalogue.sqlite'}")
    plan = plan_series(ct_series)
    series_uid = plan.series_instance_uid

    send_to_node(node, ct_series)
    first = wait_for(
        lambda: [r for r in _runs(catalogue, series_uid) if r[0] == "succeeded"],
        120,
        "the CT analysed without segmentations",
    )
    findings = first[0][1]
    assert findings["findings"] == []
    assert findings["heads_not_run"] == {"liver-seg": NO_MASK, "liver-rt": NO_MASK}
    assert sorted(findings["segment_heads"]) == ["liver-rt", "liver-seg"]

    # the site's segmentations: an ellipse per slice (SEG), rectangles (RTSTRUCT)
    seg_mask = np.zeros((len(plan), plan.rows, plan.columns), dtype=bool)
    r, c = np.mgrid[0 : plan.rows, 0 : plan.columns]
    for k in range(5, 12):
        seg_mask[k] = (r - 250) ** 2 / 50**2 + (c - 310) ** 2 / 70**2 < 1
    rt_mask = np.zeros_like(seg_mask)
    contours = {}
    for k in (8, 9, 10, 11):
        ds = dcmread(plan.paths[k], stop_before_pixels=True)
        contours[k] = rectangle_contour(ds, (180, 260 + 3 * k), (120, 240))
        rt_mask[k, 180 : 260 + 3 * k, 120:240] = True
    folder = tmp_path / "segmentations"
    folder.mkdir()
    seg = write_seg(plan.paths, seg_mask, "Liver", folder, seed="e2e")
    rtstruct = write_rtstruct(plan.paths, contours, "LIVER", folder, seed="e2e")
    with association(node, [seg, rtstruct]) as assoc:  # a reading room's workstation
        store(assoc, [seg, rtstruct])

    runs = wait_for(
        lambda: (
            done
            if len(done := [r for r in _runs(catalogue, series_uid) if r[0] == "succeeded"]) > 1
            else None
        ),
        180,
        "the CT re-run once its segmentations arrived",
    )
    assert len(_runs(catalogue, series_uid)) == 2  # one re-run for both objects
    latest = runs[-1][1]
    assert latest["heads_not_run"] == {}
    assert sorted(latest["segmentations_read"]) == sorted(
        [dcmread(seg).SOPInstanceUID, dcmread(rtstruct).SOPInstanceUID]
    )
    by_head = {f["head_name"]: f for f in latest["findings"]}
    for name, mask in (("liver-seg", seg_mask), ("liver-rt", rt_mask)):
        head = heads[name]
        clip, variant = head.card.preprocessing(backbone.preprocessing)
        reference = mask_pooled_prediction(
            head, plan, mask, backbone, clip_below_air=clip, variant=variant
        )
        assert reference is not None
        np.testing.assert_allclose(
            by_head[name]["probabilities"], reference.outputs.numpy(), atol=1e-5
        )
        assert by_head[name]["key_slice"] == reference.key_slice
        kind, source = ("SEG", seg) if name == "liver-seg" else ("RTSTRUCT", rtstruct)
        label = "Liver" if kind == "SEG" else "LIVER"
        assert by_head[name]["mask_from"] == (
            f"segment {label!r} of {kind} {dcmread(source).SOPInstanceUID}"
        )
    # the re-run's SR names the segmentation each head read, and is valid
    reports = [dcmread(p) for p in (tmp_path / "data" / "results").rglob("*.dcm")]
    assert reports, "no results written"
    named = [r for r in reports if any("mask: segment" in t for t in _texts(r))]
    assert len(named) == 1, [sorted(set(_texts(r))) for r in reports]
    assert_dciodvfy_clean(named[0].filename)
    assert_pixelmed_sr_clean(named[0].filename)


def _texts(ds: Dataset) -> list[str]:
    """Every TEXT value in an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out
