"""Raidium's released head folders: import, refusals, and attentive heads run faithfully.

The reference below follows the published description of Raidium's 3D forward with
transformers' Dinov2Model (not the node's timm backbone) on the real sample CT, so the
node's streaming window path is checked against an independent computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model
from typer.testing import CliRunner

from node.cli.heads import heads_app
from pipelines.findings import CodeRef
from pipelines.model import preprocess
from pipelines.model.backbone import Backbone, demo_backbone, save_hf_folder, timm_to_hf
from pipelines.model.head_card import SegmentRef
from pipelines.model.head_import import HeadImportError, import_raidium_head
from pipelines.model.heads import (
    AttentionBlock,
    AttentionCard,
    Head,
    HeadError,
    WindowCard,
    demo_attentive_head,
    demo_head,
    load_head,
    save_head,
)
from pipelines.model.inference import analyse_series, analyse_series_and_masks
from pipelines.model.mask_pooling import lesion_windows
from pipelines.model.masks import demo_mask_head
from pipelines.model.preprocess import load_series, preprocess_slices
from pipelines.model.stack_analysis import analyse_units, plan_units
from tests.support.testdata import repaired_ct_series

HIDDEN = 64
CLASSES = [("benign", None), ("malignant", CodeRef("86049000", "SCT", "Malignant neoplasm"))]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return demo_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone) -> Path:
    folder = tmp_path_factory.mktemp("curia-tiny")
    save_hf_folder(backbone, folder)
    return folder


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The real 20-slice sample CT (JPEG 2000), with repaired UIDs."""
    return repaired_ct_series(tmp_path_factory.mktemp("ct"), "head-import")


@pytest.fixture(scope="module")
def final_cls(ct: list[Path], backbone_folder: Path) -> torch.Tensor:
    """transformers' last_hidden_state[:, 0] (final-norm CLS) for every slice: (S, D)."""
    model = Dinov2Model.from_pretrained(backbone_folder).eval()
    pixels = preprocess_slices(load_series(ct).pixels)
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state[:, 0]


@pytest.fixture(scope="module")
def last_block_tokens(ct: list[Path], backbone_folder: Path) -> torch.Tensor:
    """transformers' hidden_states[-1] (before the final norm) for every slice: (S, 1+P, D)."""
    model = Dinov2Model.from_pretrained(backbone_folder).eval()
    pixels = preprocess_slices(load_series(ct).pixels)
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]


# --- building a released head folder -----------------------------------------------------


def raidium_config(**fields: Any) -> dict[str, Any]:
    config = {
        "model_type": "dinov2_custom_classifier",
        "architectures": ["Dinov2ForImageClassification"],
        "auto_map": {
            "AutoConfig": "modeling_dinov2.Dinov2ForImageClassificationConfig",
            "AutoModelForImageClassification": "modeling_dinov2.Dinov2ForImageClassification",
        },
        "model_name": "raidium/curia",
        "num_classes": 2,
        "num_slices": 5,
        "kernel_size": None,
        "use_n_blocks": 1,
        "use_class_token": False,
        "use_avgpool_per_slice": False,
        "use_avgpool_on_the_volume": False,
        "attention_cfg": {"num_heads": 2, "num_queries": 3, "block": ["self", "cross"]},
        "regression": False,
        "transformers_version": "4.56.1",
    }
    config.update(fields)
    return config


def raidium_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Head tensors under the released names, random but large enough to move the output."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    d, c = HIDDEN, config["num_classes"]
    attention = config["attention_cfg"]
    # the probe ends in a LayerNorm (unit-scale features): a small classifier keeps the
    # softmax away from 0 and 1, where a wrong forward would still look right
    scale = 0.05 if attention is not None else 0.5
    tensors = {"classifier.weight": rand(c, d, scale=scale), "classifier.bias": rand(c, scale=0.1)}
    if attention is not None:
        for kind in sorted(set(attention.get("block", ["self", "cross"]))):
            base = f"attention_module.{kind}_attention.attention."
            tensors[base + "multihead_attn.in_proj_weight"] = rand(3 * d, d)
            tensors[base + "multihead_attn.in_proj_bias"] = rand(3 * d, scale=0.1)
            tensors[base + "multihead_attn.out_proj.weight"] = rand(d, d)
            tensors[base + "multihead_attn.out_proj.bias"] = rand(d, scale=0.1)
            tensors[base + "norm.weight"] = 1 + rand(d, scale=0.1)
            tensors[base + "norm.bias"] = rand(d, scale=0.1)
        if "cross" in attention.get("block", ["self", "cross"]):
            tensors["attention_module.cross_attention.learned_queries"] = rand(
                attention.get("num_queries", 1), d, scale=1.0
            )
    return tensors


def raidium_folder(
    root: Path, backbone: Backbone, *, seed: int = 0, tensors: dict | None = None, **fields: Any
) -> Path:
    """A folder laid out like Raidium's released heads: config + head + full `dino.` copy."""
    folder = root / f"raidium-{seed}"
    folder.mkdir(parents=True)
    config = raidium_config(**fields)
    weights = tensors if tensors is not None else raidium_tensors(config, seed)
    copy = timm_to_hf(backbone.model.state_dict(), backbone.spec)
    weights = weights | {f"dino.{k}": v for k, v in copy.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- an independent reference of the released 3D forward ---------------------------------


def sinusoid(n: int, d: int) -> torch.Tensor:
    table = torch.zeros(n, d)
    for pos in range(n):
        for i in range(0, d, 2):
            angle = pos / (10000 ** (i / d))
            table[pos, i] = math.sin(angle)
            table[pos, i + 1] = math.cos(angle)
    return table


def reference_logits(
    hidden: torch.Tensor, window: list[int], config: dict, tensors: dict
) -> torch.Tensor:
    """Logits of the released head for one volume, from hidden_states[-1] of every slice."""
    d = hidden.shape[-1]
    slices = []
    for pos, i in enumerate(window):
        patches = hidden[i, 1:]
        if config["use_avgpool_on_the_volume"]:
            slices.append(patches)
            continue
        if config["use_avgpool_per_slice"]:
            patches = patches.mean(dim=0, keepdim=True)
        elif config["kernel_size"]:
            k, side = config["kernel_size"], math.isqrt(patches.shape[0])
            grid = patches.T.reshape(1, d, side, side)
            patches = torch.nn.functional.avg_pool2d(grid, k).flatten(2)[0].T
        if config["use_class_token"]:
            patches = torch.cat([hidden[i, :1], patches])
        slices.append(patches + sinusoid(len(window), d)[pos])
    x = torch.cat(slices).unsqueeze(0)
    if config["use_avgpool_on_the_volume"]:
        pooled = x.mean(dim=1)
    else:
        attention = config["attention_cfg"]
        for kind in attention["block"]:
            base = f"attention_module.{kind}_attention.attention."
            mha = torch.nn.MultiheadAttention(d, attention["num_heads"], batch_first=True)
            mha.load_state_dict(
                {
                    k[len(base + "multihead_attn.") :]: v
                    for k, v in tensors.items()
                    if k.startswith(base + "multihead_attn.")
                }
            )
            norm = torch.nn.LayerNorm(d)
            norm.load_state_dict(
                {"weight": tensors[base + "norm.weight"], "bias": tensors[base + "norm.bias"]}
            )
            query = x
            if kind == "cross":
                query = tensors["attention_module.cross_attention.learned_queries"].unsqueeze(0)
            with torch.no_grad():
                x = norm(query + mha(query, x, x)[0])
        pooled = x.mean(dim=1)
    return pooled @ tensors["classifier.weight"].T + tensors["classifier.bias"]


def centre_window(count: int, size: int) -> list[int]:
    start = count // 2 - size // 2
    return list(range(start, start + size))


# --- imports that run ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kernel_size": 4},
        {"use_class_token": True},
        {"use_avgpool_per_slice": True, "num_slices": 7},
        {"attention_cfg": {"num_heads": 1, "num_queries": 1, "block": ["cross"]}},
        {"attention_cfg": {"num_heads": 1, "num_queries": 1, "block": ["self", "cross"]}},
        {"attention_cfg": {"num_heads": 2, "num_queries": 2, "block": ["self", "self", "cross"]}},
        {"attention_cfg": None, "use_avgpool_on_the_volume": True},
    ],
    ids=[
        "patch",
        "kernel",
        "class-token",
        "slice-mean",
        "cross-only",
        "one-head",
        "shared-self",
        "volume",
    ],
)
def test_imported_window_head_matches_the_released_forward(
    tmp_path: Path,
    backbone: Backbone,
    backbone_folder: Path,
    ct: list[Path],
    last_block_tokens: torch.Tensor,
    fields: dict,
) -> None:
    folder = raidium_folder(tmp_path, backbone, **fields)
    head = import_raidium_head(
        folder,
        tmp_path / "heads" / "lesion",
        name="lesion",
        classes=CLASSES,
        version="1.0",
        backbone_name=backbone.identity.name,
        backbone_folder=backbone_folder,
    )
    assert head.card.imported is not None and head.card.imported.backbone_match is True
    (finding,) = analyse_series(
        ct, backbone, [load_head(tmp_path / "heads" / "lesion")], series_instance_uid="1"
    ).findings

    config, tensors = raidium_config(**fields), raidium_tensors(raidium_config(**fields))
    window = centre_window(len(ct), config["num_slices"])
    expected = torch.softmax(reference_logits(last_block_tokens, window, config, tensors), -1)[0]
    torch.testing.assert_close(torch.tensor(finding.probabilities), expected, atol=1e-5, rtol=0)
    assert min(finding.probabilities) > 0.02  # not saturated: the comparison is sensitive
    assert finding.key_slice in window
    assert finding.classes[1].code == CLASSES[1][1]
    # drawn where the head looked on the key slice, unless each slice is one mean token
    if config["use_avgpool_per_slice"]:
        assert finding.key_region is None
    else:
        plan = preprocess.plan_series(ct)
        rows, columns = plan.rows, plan.columns
        r0, c0, r1, c1 = finding.key_region
        assert 0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= columns


def test_import_writes_a_complete_card(
    tmp_path: Path, backbone: Backbone, backbone_folder: Path
) -> None:
    folder = raidium_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="lesion",
        classes=CLASSES,
        version="2.1",
        backbone_name="Curia-B",
        backbone_folder=backbone_folder,
        clip_below_air=True,
    )
    card = head.card
    assert (card.task, card.pooling, card.hidden_size, card.clip_below_air) == (
        "classification",
        "attentive",
        HIDDEN,
        True,
    )
    assert card.attention == AttentionCard(num_heads=2, num_queries=3, blocks=["self", "cross"])
    assert card.window is not None and card.window.num_slices == 5
    assert card.window.tokens == "patch" and not card.window.final_norm
    record = card.imported
    assert record is not None
    assert record.backbone_copy and len(record.backbone_copy_digest) == 64
    assert record.config["attention_cfg"]["num_queries"] == 3
    assert record.model_name == "raidium/curia"
    assert len(card.backbone_digest) == 64
    # the package holds the head only, under the node's names
    names = sorted(load_file(tmp_path / "out" / "head.safetensors"))
    assert not any(n.startswith("dino.") for n in names)
    assert "attention.cross_attention.learned_queries" in names


def test_backbone_copy_mismatch_is_recorded(tmp_path: Path, backbone_folder: Path) -> None:
    other = demo_backbone("tiny", seed=7)
    folder = raidium_folder(tmp_path, other)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="lesion",
        classes=CLASSES,
        version="1",
        backbone_name="Curia-B",
        backbone_folder=backbone_folder,
    )
    record = head.card.imported
    assert record is not None and record.backbone_match is False
    assert any("differs" in note for note in record.notes)
    assert head.card.backbone_digest == ""


def test_import_without_a_backbone_to_check(tmp_path: Path, backbone: Backbone) -> None:
    head = import_raidium_head(
        raidium_folder(tmp_path, backbone),
        tmp_path / "out",
        name="lesion",
        classes=CLASSES,
        version="1",
        backbone_name="Curia-B",
    )
    record = head.card.imported
    assert record is not None
    assert record.backbone_copy and record.backbone_match is None


def reference_slice_outputs(
    final_cls: torch.Tensor, tensors: dict, regression: bool
) -> torch.Tensor:
    """The released 2D forward on every slice: linear on that slice's final-norm CLS."""
    logits = final_cls @ tensors["classifier.weight"].T + tensors["classifier.bias"]
    return logits if regression else torch.softmax(logits, -1)


def test_2d_head_scores_every_slice(
    tmp_path: Path, backbone: Backbone, ct: list[Path], final_cls: torch.Tensor
) -> None:
    fields = {"attention_cfg": None, "num_classes": 3, "num_slices": None}
    folder = raidium_folder(tmp_path, backbone, **fields)
    classes = [("a", None), ("b", None), ("c", None)]
    head = import_raidium_head(
        folder, tmp_path / "out", name="slices", classes=classes, version="1", backbone_name="x"
    )
    assert (head.card.pooling, head.card.aggregation, head.card.window) == ("slice", "max", None)
    assert head.card.token_source == "final_norm"
    assert any("per-slice head" in note for note in head.card.imported.notes)  # type: ignore[union-attr]
    (finding,) = analyse_series(ct, backbone, [head], series_instance_uid="1").findings
    per_slice = reference_slice_outputs(final_cls, raidium_tensors(raidium_config(**fields)), False)
    expected = per_slice.max(dim=0).values
    torch.testing.assert_close(torch.tensor(finding.probabilities), expected, atol=1e-5, rtol=0)
    predicted = int(expected.argmax())
    assert finding.predicted_index == predicted
    assert finding.key_slice == int(per_slice[:, predicted].argmax())
    assert finding.aggregation == "per-slice scores, max over 20 slices"


def test_2d_regression_head_averages_the_slices(
    tmp_path: Path, backbone: Backbone, ct: list[Path], final_cls: torch.Tensor
) -> None:
    fields = {"attention_cfg": None, "num_classes": 1, "regression": True, "num_slices": None}
    folder = raidium_folder(tmp_path, backbone, **fields)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="age",
        classes=[("age", None)],
        version="1",
        backbone_name="x",
    )
    assert (head.card.pooling, head.card.aggregation) == ("slice", "mean")
    (finding,) = analyse_series(ct, backbone, [head], series_instance_uid="1").findings
    values = reference_slice_outputs(final_cls, raidium_tensors(raidium_config(**fields)), True)
    assert finding.probabilities[0] == pytest.approx(float(values.mean()), abs=1e-5)
    assert finding.key_slice is None


def test_2d_head_can_still_use_the_series_mean(
    tmp_path: Path, backbone: Backbone, ct: list[Path], final_cls: torch.Tensor
) -> None:
    fields = {"attention_cfg": None, "num_slices": None}
    folder = raidium_folder(tmp_path, backbone, **fields)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="mean",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        pooling="mean_cls",
    )
    assert head.card.pooling == "mean_cls" and head.card.aggregation is None
    (finding,) = analyse_series(ct, backbone, [head], series_instance_uid="1").findings
    tensors = raidium_tensors(raidium_config(**fields))
    expected = reference_slice_outputs(final_cls.mean(0, keepdim=True), tensors, False)[0]
    torch.testing.assert_close(torch.tensor(finding.probabilities), expected, atol=1e-5, rtol=0)


def mask_folder(tmp_path: Path, backbone: Backbone) -> Path:
    folder = raidium_folder(tmp_path, backbone, attention_cfg=None, num_slices=None)
    return folder.rename(tmp_path / "emidec-classification-mask")


def test_mask_head_is_not_imported_as_a_cls_head(tmp_path: Path, backbone: Backbone) -> None:
    folder = mask_folder(tmp_path, backbone)
    with pytest.raises(HeadImportError, match="pass --pooling mask"):
        import_raidium_head(
            folder, tmp_path / "out", name="mi", classes=CLASSES, version="1", backbone_name="x"
        )
    assert not (tmp_path / "out").exists()


def test_mask_head_without_a_mask_is_not_analysed(
    tmp_path: Path, backbone: Backbone, ct: list[Path]
) -> None:
    folder = mask_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="mi",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        pooling="mask",
        mask_source="myocardium",
    )
    assert head.card.pooling == "mask" and head.card.mask_source == "myocardium"
    patches = torch.randn(5, 16, HIDDEN)
    mask = torch.zeros(5, 16, dtype=torch.bool)
    mask[:, 3:7] = True
    pooled = patches[mask].reshape(5, 4, HIDDEN).mean(1).mean(0, keepdim=True)
    tensors = raidium_tensors(raidium_config(attention_cfg=None, num_slices=None))
    torch.testing.assert_close(
        head.predict(pooled), reference_slice_outputs(pooled, tensors, False)
    )
    result = analyse_series(ct, backbone, [head, demo_head(HIDDEN)], series_instance_uid="1")
    assert [f.head_name for f in result.findings] == ["body-region"]
    assert result.heads_not_run == {"mi": "not analysed: no mask"}


def reference_crop(mask: np.ndarray) -> tuple[int, int, int, int]:
    """A square of max(128, the mask's extent) around the mask's box, kept in the slice."""
    rows, cols = np.nonzero(mask)
    side = max(128, rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min())
    box = []
    for first, last, length in (
        (rows.min(), rows.max(), mask.shape[0]),
        (cols.min(), cols.max(), mask.shape[1]),
    ):
        width = min(side, length)
        start = int(np.clip((first + last + 1) // 2 - width // 2, 0, length - width))
        box.append((start, start + width))
    return box[0][0], box[1][0], box[0][1], box[1][1]


@pytest.mark.slow
def test_mask_head_pools_inside_the_mask_of_a_node_mask_head(
    tmp_path: Path, backbone: Backbone, backbone_folder: Path, ct: list[Path]
) -> None:
    folder = mask_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="mi",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        pooling="mask",
        mask_source="demo-region-mask",
    )
    mask_head = demo_mask_head(HIDDEN)
    result, (series_mask,) = analyse_series_and_masks(
        ct, backbone, [head], series_instance_uid="1", mask_heads=[mask_head]
    )
    assert result.heads_not_run == {}
    (finding,) = result.findings
    plan = preprocess.plan_series(ct)
    assert plan.reorientation.is_identity  # the sample CT is stored in PL already
    masked = [i for i in range(len(plan)) if series_mask.mask[i].any()]
    assert masked, "the demo mask head marks nothing on the sample CT"
    model = Dinov2Model.from_pretrained(backbone_folder).eval()
    pixels = load_series(ct).pixels
    features = []
    for i in masked:
        r0, c0, r1, c1 = reference_crop(series_mask.mask[i])
        crop = preprocess_slices(pixels[i : i + 1, r0:r1, c0:c1])
        with torch.no_grad():
            patches = model(pixel_values=crop).last_hidden_state[0, 1:]
        region = torch.from_numpy(series_mask.mask[i, r0:r1, c0:c1].astype(np.float32))
        region = torch.nn.functional.interpolate(region[None, None], size=(512, 512))
        touched = torch.nn.functional.max_pool2d(region, 16).flatten() > 0
        features.append(patches[touched].mean(0))
    tensors = raidium_tensors(raidium_config(attention_cfg=None, num_slices=None))
    pooled = torch.stack(features).mean(0, keepdim=True)
    expected = reference_slice_outputs(pooled, tensors, False)[0]
    torch.testing.assert_close(torch.tensor(finding.probabilities), expected, atol=1e-5, rtol=0)
    assert finding.key_slice in masked


def test_mask_head_with_an_empty_mask_is_not_analysed(
    tmp_path: Path, backbone: Backbone, ct: list[Path]
) -> None:
    folder = mask_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="mi",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        pooling="mask",
        mask_source="demo-region-mask",
    )
    silent = demo_mask_head(HIDDEN)
    with torch.no_grad():
        silent.linear.bias.fill_(-1e4)
    result, _ = analyse_series_and_masks(
        ct, backbone, [head], series_instance_uid="1", mask_heads=[silent]
    )
    assert result.findings == []
    assert result.heads_not_run == {"mi": "not analysed: the mask is empty on this stack"}


@pytest.mark.slow
def test_mask_head_pools_in_the_mask_of_its_own_stack(
    tmp_path: Path, backbone: Backbone, ct: list[Path]
) -> None:
    """Two stacks in one series, the mask head reading only the long one: the mask-pooled
    head runs on the long stack, and on the short one says it had no mask there rather
    than pooling in the other stack's mask."""
    head = import_raidium_head(
        mask_folder(tmp_path, backbone),
        tmp_path / "out",
        name="mi",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        pooling="mask",
        mask_source="demo-region-mask",
    )
    demo = demo_mask_head(HIDDEN)
    mask_head = dataclasses.replace(demo, card=demo.card.model_copy(update={"min_slices": 15}))
    short = []
    for n, path in enumerate(preprocess.plan_series(ct).paths[:8]):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["short", str(n)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 100 + n  # a second reconstruction at the same positions
        short.append(tmp_path / f"short-{n}.dcm")
        ds.save_as(short[-1])
    units, skipped = plan_units([*ct, *short], [head], [mask_head])
    assert [len(u.plan) for u in units] == [20, 8] and skipped == []
    assert [len(u.mask_heads) for u in units] == [1, 0]

    findings, (stack_mask,) = analyse_units(units, skipped, backbone, series_instance_uid="1")
    long_label, short_label = (u.plan.label for u in units)
    (finding,) = findings.findings
    assert finding.stack == long_label and stack_mask.unit is units[0]
    assert finding.key_slice is not None and stack_mask.mask.mask[finding.key_slice].any()
    assert finding.key_slice in findings.slices_of(long_label)
    assert findings.heads_not_run == {"mi": f"{short_label}: not analysed: no mask"}


@pytest.mark.slow
def test_regression_head_reports_the_raw_value(
    tmp_path: Path, backbone: Backbone, ct: list[Path], last_block_tokens: torch.Tensor
) -> None:
    fields = {"regression": True, "num_classes": 1}
    folder = raidium_folder(tmp_path, backbone, **fields)
    import_raidium_head(
        folder,
        tmp_path / "heads" / "age",
        name="age",
        classes=[("age", CodeRef("397659008", "SCT", "Age"))],
        version="1",
        backbone_name="x",
        unit=CodeRef("a", "UCUM", "year"),
    )
    head = load_head(tmp_path / "heads" / "age")
    assert head.card.task == "regression" and head.card.unit is not None
    (finding,) = analyse_series(ct, backbone, [head], series_instance_uid="1").findings
    config = raidium_config(**fields)
    window = centre_window(len(ct), 5)
    value = reference_logits(last_block_tokens, window, config, raidium_tensors(config))[0, 0]
    assert finding.task == "regression" and finding.predicted_index == 0
    assert len(finding.probabilities) == 1
    assert abs(finding.probabilities[0] - float(value)) < 1e-4


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "dinov2"}, "model_type is 'dinov2'"),
        ({"use_n_blocks": 4}, "use_n_blocks is 4"),
        ({"use_class_token": True, "use_avgpool_per_slice": True}, "use_class_token"),
        ({"attention_cfg": None, "use_avgpool_per_slice": True}, "use_avgpool_per_slice"),
        ({"use_avgpool_on_the_volume": True}, "use_avgpool_on_the_volume"),
        ({"num_classes": 3}, "num_classes is 3 but 2 class names"),
        ({"regression": True}, "regression is true but num_classes is 2"),
        ({"num_slices": 0}, "num_slices is 0"),
        ({"attention_cfg": {"num_heads": 3}}, "num_heads 3 does not divide hidden_size 64"),
        ({"attention_cfg": {"block": ["self"], "mlp": True}}, "attention_cfg has keys ['mlp']"),
    ],
)
def test_unsupported_configs_are_refused(
    tmp_path: Path, backbone: Backbone, fields: dict, message: str
) -> None:
    kept = {k: v for k, v in fields.items() if k not in ("model_type", "attention_cfg")}
    tensors = raidium_tensors(raidium_config(**kept))
    folder = raidium_folder(tmp_path, backbone, tensors=tensors, **fields)
    with pytest.raises(HeadImportError) as err:
        import_raidium_head(
            folder, tmp_path / "out", name="x", classes=CLASSES, version="1", backbone_name="x"
        )
    assert message in str(err.value)
    assert str(folder) in str(err.value)
    assert not (tmp_path / "out").exists()


def _edit(edit: Callable[[dict[str, torch.Tensor]], object]) -> dict[str, torch.Tensor]:
    tensors = raidium_tensors(raidium_config())
    edit(tensors)
    return tensors


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (_edit(lambda t: t.pop("classifier.bias")), "missing tensor classifier.bias"),
        (
            _edit(lambda t: t.update({"attention_module.mlp.weight": torch.zeros(2)})),
            "attention_module.mlp.weight",
        ),
        (
            _edit(lambda t: t.pop("attention_module.cross_attention.learned_queries")),
            "missing tensors ['attention.cross_attention.learned_queries']",
        ),
        (
            _edit(
                lambda t: t.update(
                    {"attention_module.cross_attention.learned_queries": torch.zeros(4, HIDDEN)}
                )
            ),
            "learned_queries is [4, 64], expected [3, 64]",
        ),
        (_edit(lambda t: t.update({"pooler.weight": torch.zeros(2)})), "pooler.weight"),
    ],
    ids=["no-bias", "unknown-attention", "no-queries", "queries-shape", "stray"],
)
def test_weights_must_fit_the_config(
    tmp_path: Path, backbone: Backbone, tensors: dict, message: str
) -> None:
    folder = raidium_folder(tmp_path, backbone, tensors=tensors)
    with pytest.raises(HeadImportError) as err:
        import_raidium_head(
            folder, tmp_path / "out", name="x", classes=CLASSES, version="1", backbone_name="x"
        )
    assert message in str(err.value)


def test_missing_weights_are_refused(tmp_path: Path, backbone: Backbone) -> None:
    folder = raidium_folder(tmp_path, backbone)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HeadImportError, match=r"missing model\.safetensors"):
        import_raidium_head(
            folder, tmp_path / "out", name="x", classes=CLASSES, version="1", backbone_name="x"
        )


# --- attentive heads in the node ------------------------------------------------------------


def test_window_indices() -> None:
    head = demo_attentive_head(HIDDEN, num_slices=5)
    assert head.window_indices(20) == [8, 9, 10, 11, 12]
    assert head.window_indices(6) == [1, 2, 3, 4, 5]
    assert head.window_indices(5) == [0, 1, 2, 3, 4]
    assert head.window_indices(3) == [0, 1, 2]  # shorter series: all of it
    window = WindowCard(num_slices=5, selection="even")
    even = Head(
        card=head.card.model_copy(update={"window": window}), linear=head.linear, probe=head.probe
    )
    # the processor's sampling: truncated linspace, a short series padded with its last slice
    assert even.window_indices(20) == [0, 4, 9, 14, 19]
    assert even.window_indices(3) == [0, 1, 2, 2, 2]
    assert demo_attentive_head(HIDDEN, num_slices=None).window_indices(7) == list(range(7))


def test_only_window_slices_are_decoded(
    monkeypatch: pytest.MonkeyPatch, backbone: Backbone, ct: list[Path]
) -> None:
    decoded: list[Path] = []
    read_slice = preprocess.read_slice

    def counting(path: Path) -> Any:
        decoded.append(Path(path))
        return read_slice(path)

    monkeypatch.setattr(preprocess, "read_slice", counting)
    head = demo_attentive_head(HIDDEN, num_slices=3)
    result = analyse_series(ct, backbone, [head], series_instance_uid="1", batch_size=2)
    plan = preprocess.plan_series(ct)
    assert sorted(decoded) == sorted(plan.paths[9:12])
    assert result.slice_count == 20 and result.findings[0].key_slice in (9, 10, 11)


@pytest.mark.slow
def test_attentive_and_mean_heads_share_one_pass(backbone: Backbone, ct: list[Path]) -> None:
    from pipelines.model.heads import demo_head

    mean_head, window_head = demo_head(HIDDEN), demo_attentive_head(HIDDEN, num_slices=4)
    both = analyse_series(ct, backbone, [window_head, mean_head], series_instance_uid="1")
    alone = analyse_series(ct, backbone, [mean_head], series_instance_uid="1")
    alone_window = analyse_series(ct, backbone, [window_head], series_instance_uid="1")
    assert [f.head_name for f in both.findings] == ["body-region-3d", "body-region"]
    assert both.findings[1].probabilities == pytest.approx(alone.findings[0].probabilities)
    assert both.findings[0].probabilities == pytest.approx(
        alone_window.findings[0].probabilities, abs=1e-6
    )


def test_attentive_head_round_trip(tmp_path: Path) -> None:
    head = demo_attentive_head(HIDDEN, seed=3, attention=AttentionCard(num_heads=4, num_queries=2))
    save_head(head, tmp_path / "h")
    loaded = load_head(tmp_path / "h")
    assert loaded.card == head.card
    tokens = torch.randn(5, 7, HIDDEN)
    a, b = head.predict_window(tokens), loaded.predict_window(tokens)
    assert torch.equal(a.outputs, b.outputs) and a.key_position == b.key_position
    with pytest.raises(HeadError, match="predict_window"):
        loaded.predict(torch.randn(1, HIDDEN))


def test_padding_rows_are_masked() -> None:
    """Zero rows never change the real tokens' result (self block) or the queries' (cross)."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    padded = torch.cat([x, torch.zeros(1, 3, 16)], dim=1)
    self_block = AttentionBlock(16, num_heads=2).eval()
    cross_block = AttentionBlock(16, num_heads=2, num_queries=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(self_block(padded)[0][:, :6], self_block(x)[0])
        torch.testing.assert_close(cross_block(padded)[0], cross_block(x)[0])
        _, weights = cross_block(padded, need_weights=True)
    assert weights is not None and float(weights[0, :, 6:].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"pooling": "attentive"}, "attention"),
        ({"pooling": "mean_patch"}, "window"),
        ({"task": "regression"}, "classes"),
        ({"unit": {"value": "a", "scheme": "UCUM", "meaning": "year"}}, "unit"),
        ({"window": {"num_slices": 3}}, "window"),
    ],
)
def test_card_combinations_are_checked(tmp_path: Path, edit: dict, field: str) -> None:
    from pipelines.model.heads import demo_head

    save_head(demo_head(HIDDEN), tmp_path / "h")
    card = json.loads((tmp_path / "h" / "head.json").read_text()) | edit
    (tmp_path / "h" / "head.json").write_text(json.dumps(card))
    with pytest.raises(HeadError, match=f"field '{field}'"):
        load_head(tmp_path / "h")


def test_cli_import(tmp_path: Path, backbone: Backbone, backbone_folder: Path) -> None:
    folder = raidium_folder(tmp_path, backbone)
    codes = tmp_path / "codes.csv"
    codes.write_text("label,value,scheme,meaning\nmalignant,86049000,SCT,Malignant neoplasm\n")
    result = CliRunner().invoke(
        heads_app,
        [
            "import",
            str(folder),
            "--name",
            "lesion",
            "--classes",
            "benign,malignant",
            "--codes",
            str(codes),
            "--out",
            str(tmp_path / "heads"),
            "--backbone",
            str(backbone_folder),
        ],
    )
    assert result.exit_code == 0, result.output
    head = load_head(tmp_path / "heads" / "lesion")
    assert head.card.classes[1].code is not None
    assert head.card.classes[1].code.value == "86049000"
    assert head.card.backbone == backbone.identity.name
    assert "matches" in result.output
    listed = CliRunner().invoke(heads_app, ["list", str(tmp_path / "heads")])
    assert listed.exit_code == 0, listed.output
    assert "lesion" in listed.output and "attentive" in listed.output

    refused = CliRunner().invoke(
        heads_app,
        ["import", str(folder), "--name", "x", "--classes", "a,b,c", "--out", str(tmp_path / "h2")],
    )
    assert refused.exit_code != 0
    assert "num_classes is 2 but 3 class names" in refused.output


@pytest.mark.slow
def test_lesion_centred_window_head_is_centred_on_the_mask(
    tmp_path: Path, backbone: Backbone, ct: list[Path], last_block_tokens: torch.Tensor
) -> None:
    folder = raidium_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="lesion",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        mask_source="demo-region-mask",
    )
    assert head.card.window is not None and head.card.window.selection == "mask"
    mask_head = demo_mask_head(HIDDEN)
    # a mask on the lower slices only, so the lesion's window is not the middle one
    with torch.no_grad():
        mask_head.linear.bias.fill_(-1e4)
    marked = np.zeros((len(ct), 512, 512), dtype=bool)
    marked[2:6, 200:260, 220:300] = True
    masks = [
        dataclasses.replace(found, mask=marked)
        for found in analyse_series_and_masks(
            ct, backbone, [], series_instance_uid="1", mask_heads=[mask_head]
        )[1]
    ]
    plan = preprocess.plan_series(ct)
    lesions, reasons = lesion_windows(plan, [head], masks, backbone)
    assert reasons == {}
    window = list(range(2, 7))  # 5 slices centred on slice 4, the median of 2..5
    assert lesions[0].indices == window

    result, _ = analyse_series_and_masks(
        ct, backbone, [head], series_instance_uid="1", mask_heads=[mask_head]
    )
    assert result.heads_not_run == {"lesion": "not analysed: the mask is empty on this stack"}
    no_mask = analyse_series(ct, backbone, [head], series_instance_uid="1")
    assert no_mask.heads_not_run == {"lesion": "not analysed: no mask"}

    config, tensors = raidium_config(), raidium_tensors(raidium_config())
    expected = torch.softmax(reference_logits(last_block_tokens, window, config, tensors), -1)[0]
    got = head.predict_window(lesions[0].tokens).outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_window_centred_on_a_slice_stays_in_the_series() -> None:
    head = demo_attentive_head(HIDDEN, num_slices=5)
    assert head.window_indices(20, centre=4) == [2, 3, 4, 5, 6]
    assert head.window_indices(20, centre=0) == [0, 1, 2, 3, 4]
    assert head.window_indices(20, centre=19) == [15, 16, 17, 18, 19]


@pytest.mark.slow
def test_lesion_centred_head_in_the_pipeline(
    tmp_path: Path, backbone: Backbone, ct: list[Path], last_block_tokens: torch.Tensor
) -> None:
    folder = raidium_folder(tmp_path, backbone)
    head = import_raidium_head(
        folder,
        tmp_path / "out",
        name="lesion",
        classes=CLASSES,
        version="1",
        backbone_name="x",
        mask_source="demo-region-mask",
    )
    result, (found,) = analyse_series_and_masks(
        ct, backbone, [head], series_instance_uid="1", mask_heads=[demo_mask_head(HIDDEN)]
    )
    masked = [k for k in range(len(ct)) if found.mask[k].any()]
    assert masked, "the demo mask head marks nothing on the sample CT"
    start = min(max(masked[len(masked) // 2] - 2, 0), len(ct) - 5)
    window = list(range(start, start + 5))
    (finding,) = result.findings
    config, tensors = raidium_config(), raidium_tensors(raidium_config())
    expected = torch.softmax(reference_logits(last_block_tokens, window, config, tensors), -1)[0]
    torch.testing.assert_close(torch.tensor(finding.probabilities), expected, atol=1e-5, rtol=0)
    assert finding.key_slice in window


def test_cli_import_asks_for_what_the_config_cannot_say(
    tmp_path: Path, backbone: Backbone, backbone_folder: Path
) -> None:
    folder = mask_folder(tmp_path, backbone)
    base = ["import", str(folder), "--name", "mi", "--classes", "absent,present"]
    base += ["--out", str(tmp_path / "heads"), "--backbone", str(backbone_folder)]
    refused = CliRunner().invoke(heads_app, base)
    assert refused.exit_code != 0 and "--pooling mask" in refused.output
    done = CliRunner().invoke(
        heads_app,
        [*base, "--pooling", "mask", "--mask-source", "myocardium", "--processor", "volume"],
    )
    assert done.exit_code == 0, done.output
    card = load_head(tmp_path / "heads" / "mi").card
    assert (card.pooling, card.mask_source, card.processor) == ("mask", "myocardium", "volume")
    assert card.clip_below_air is None  # follows the backbone folder

    slices = raidium_folder(tmp_path / "2d", backbone, attention_cfg=None, num_slices=None)
    args = ["import", str(slices), "--name", "ich", "--classes", "absent,present"]
    args += ["--out", str(tmp_path / "heads"), "--backbone", str(backbone_folder)]
    args += ["--aggregation", "top_k_mean", "--top-k", "3", "--negative-class", "absent"]
    done = CliRunner().invoke(heads_app, args)
    assert done.exit_code == 0, done.output
    assert "aggregated by top_k_mean" in done.output
    card = load_head(tmp_path / "heads" / "ich").card
    assert (card.pooling, card.aggregation, card.top_k, card.negative_class) == (
        "slice",
        "top_k_mean",
        3,
        "absent",
    )


def test_cli_import_says_which_stacks_and_which_mask_the_head_reads(
    tmp_path: Path, backbone: Backbone, backbone_folder: Path
) -> None:
    slices = raidium_folder(tmp_path / "2d", backbone, attention_cfg=None, num_slices=None)
    base = ["import", str(slices), "--classes", "absent,present"]
    base += ["--out", str(tmp_path / "heads"), "--backbone", str(backbone_folder)]
    done = CliRunner().invoke(
        heads_app,
        [
            *base,
            "--name",
            "knee",
            "--planes",
            "Sagittal, coronal",
            "--modalities",
            "mr",
            "--min-slices",
            "12",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "reads coronal, sagittal stacks of MR, at least 12 slice(s)" in done.output
    card = load_head(tmp_path / "heads" / "knee").card
    assert (card.planes, card.modalities, card.min_slices) == (["coronal", "sagittal"], ["MR"], 12)
    plain = CliRunner().invoke(heads_app, [*base, "--name", "plain"])
    assert plain.exit_code == 0, plain.output
    card = load_head(tmp_path / "heads" / "plain").card
    assert (card.planes, card.modalities, card.min_slices) == (["axial"], [], 1)

    bad = CliRunner().invoke(heads_app, [*base, "--name", "x", "--planes", "axial,oblique"])
    assert bad.exit_code != 0 and "--planes: oblique" in bad.output

    masked = mask_folder(tmp_path / "mask", backbone)
    args = ["import", str(masked), "--classes", "absent,present", "--pooling", "mask"]
    args += ["--out", str(tmp_path / "heads"), "--backbone", str(backbone_folder)]
    done = CliRunner().invoke(heads_app, [*args, "--name", "mi", "--mask-segment", "Myocardium"])
    assert done.exit_code == 0, done.output
    assert "mask: segment 'Myocardium' of the study's SEG or RTSTRUCT" in done.output
    card = load_head(tmp_path / "heads" / "mi").card
    assert card.segment_source == SegmentRef(segment="Myocardium")
    both = CliRunner().invoke(
        heads_app,
        [*args, "--name", "m2", "--mask-segment", "Myocardium", "--mask-source", "heart"],
    )
    assert both.exit_code != 0 and "not both" in both.output
