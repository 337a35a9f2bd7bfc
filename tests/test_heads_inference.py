"""Head packages and series analysis with the tiny demo backbone."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from torch import nn

from pipelines.findings import CodeRef
from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.heads import Head, HeadError, demo_head, load_head, load_heads, save_head
from pipelines.model.inference import analyse_series, select_device
from pipelines.model.key_region import grid_region
from pipelines.model.preprocess import load_series, plan_series, preprocess_slices


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return demo_backbone("tiny", seed=0)


def ct_series(folder: Path, z_positions: list[float], *, padding: bool = False) -> list[Path]:
    """CT_small copies at the given z positions, one series, files in shuffled order.

    ``padding`` stores a band of -3024 HU (scanner padding) so ``clip_below_air`` matters.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for k, z in enumerate(z_positions):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, z]
        pixels = ds.pixel_array.copy()
        pixels[:, : 10 + 5 * k] = -2000 if padding else pixels[:, : 10 + 5 * k] // 2
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k}.dcm"
        ds.save_as(path)
        paths.append(path)
    random.Random(1).shuffle(paths)
    return paths


def reference_probabilities(
    paths: list[Path], backbone: Backbone, head: Head, clip_below_air: bool
) -> torch.Tensor:
    """Everything in memory at once: the streaming pipeline must give the same answer."""
    pixels = load_series(paths).pixels
    batch = preprocess_slices(pixels, size=512, clip_below_air=clip_below_air)
    features = backbone.features(batch)
    return head.predict(features.mean(dim=0, keepdim=True))[0]


def renamed(head: Head, name: str, **changes: object) -> Head:
    card = head.card.model_copy(update={"name": name, **changes})
    return Head(card=card, linear=head.linear)


def big_demo_head(hidden_size: int, seed: int) -> Head:
    """The demo head with larger weights, so probabilities move visibly between inputs."""
    head = demo_head(hidden_size, seed=seed)
    with torch.no_grad():
        head.linear.weight.mul_(20)
    return head


# --- heads --------------------------------------------------------------------------------


def test_demo_head_card() -> None:
    head = demo_head(64, seed=0)
    card = head.card
    assert (card.name, card.version, card.task, card.demo) == (
        "body-region",
        "0.1.0-demo",
        "classification",
        True,
    )
    assert [c.name for c in card.classes] == ["head", "neck", "chest", "abdomen", "pelvis"]
    for head_class, attribute in zip(
        card.head_classes, ["Head", "Neck", "Chest", "Abdomen", "Pelvis"], strict=True
    ):
        code = getattr(codes.SCT, attribute)
        assert head_class.code == CodeRef(code.value, "SCT", code.meaning)
    assert head.linear.weight.shape == (5, 64)
    assert 0.005 < float(head.linear.weight.std()) < 0.015
    assert torch.equal(head.linear.weight, demo_head(64, seed=0).linear.weight)
    assert not torch.equal(head.linear.weight, demo_head(64, seed=1).linear.weight)


def test_predict_gives_probabilities() -> None:
    probabilities = big_demo_head(64, 0).predict(torch.randn(3, 64))
    assert probabilities.shape == (3, 5)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_save_load_round_trip(tmp_path: Path) -> None:
    head = big_demo_head(64, seed=2)
    save_head(head, tmp_path / "region")
    loaded = load_head(tmp_path / "region")
    assert loaded.card == head.card
    x = torch.randn(4, 64)
    assert torch.equal(loaded.predict(x), head.predict(x))


def _card(folder: Path) -> dict:
    return json.loads((folder / "head.json").read_text())


def _write_card(folder: Path, card: dict) -> None:
    (folder / "head.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (lambda c: c.update(task="segmentation"), "task"),
        (lambda c: c.update(classes=c["classes"][:1]), "classes"),
        (lambda c: c.update(pooling="max"), "pooling"),
        (lambda c: c.update(hiden_size=64), "hiden_size"),
        (lambda c: c["classes"][1].update(name="head"), "classes"),
        (lambda c: c["classes"][0]["code"].pop("scheme"), "classes.0.code.scheme"),
    ],
)
def test_bad_card_is_refused(tmp_path: Path, edit: Callable[[dict], object], field: str) -> None:
    folder = tmp_path / "region"
    save_head(demo_head(64), folder)
    card = _card(folder)
    edit(card)
    _write_card(folder, card)
    with pytest.raises(HeadError) as err:
        load_head(folder)
    message = str(err.value)
    assert str(folder / "head.json") in message
    assert f"field '{field}" in message


def test_unreadable_card_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "region"
    save_head(demo_head(64), folder)
    (folder / "head.json").write_text("{not json")
    with pytest.raises(HeadError, match="cannot read head card"):
        load_head(folder)


def test_weights_must_match_the_card(tmp_path: Path) -> None:
    folder = tmp_path / "region"
    save_head(demo_head(64), folder)
    _write_card(folder, _card(folder) | {"hidden_size": 32})
    with pytest.raises(HeadError, match=r"classifier\.weight has shape \[5, 64\]") as err:
        load_head(folder)
    assert "needs [5, 32]" in str(err.value)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "region"
    save_head(demo_head(64), folder)
    (folder / "head.safetensors").unlink()
    with pytest.raises(HeadError, match="missing head weights"):
        load_head(folder)


def test_load_heads_reads_every_package(tmp_path: Path) -> None:
    save_head(demo_head(64), tmp_path / "a")
    save_head(renamed(demo_head(64), "other"), tmp_path / "b")
    (tmp_path / "notes").mkdir()  # no head.json: not a head package
    heads = load_heads(tmp_path)
    assert sorted(heads) == ["body-region", "other"]


def test_load_heads_refuses_duplicate_names(tmp_path: Path) -> None:
    save_head(demo_head(64), tmp_path / "a")
    save_head(demo_head(64), tmp_path / "b")
    with pytest.raises(HeadError, match="second head"):
        load_heads(tmp_path)


def test_load_heads_refuses_missing_root(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="does not exist"):
        load_heads(tmp_path / "nope")


# --- analysis -----------------------------------------------------------------------------


def test_analyse_series(tmp_path: Path, backbone: Backbone) -> None:
    z = [12.0, 0.0, 9.0, 3.0, 6.0]
    paths = ct_series(tmp_path, z)
    head = big_demo_head(64, seed=0)
    result = analyse_series(paths, backbone, [head], series_instance_uid="1.2.3.4", batch_size=2)
    assert result.series_instance_uid == "1.2.3.4"
    assert result.model == backbone.identity
    assert result.slice_count == 5
    by_z = {float(pydicom.dcmread(p).ImagePositionPatient[2]): pydicom.dcmread(p) for p in paths}
    assert result.sop_instance_uids_sorted == [by_z[k].SOPInstanceUID for k in sorted(z)]
    (finding,) = result.findings
    assert finding.head_name == "body-region" and finding.head_version == "0.1.0-demo"
    assert finding.task == "classification"
    assert finding.classes == head.card.head_classes
    assert all(isinstance(p, float) for p in finding.probabilities)
    assert abs(sum(finding.probabilities) - 1) < 1e-5
    assert finding.predicted_index == int(np.argmax(finding.probabilities))
    assert finding.key_slice is not None and 0 <= finding.key_slice < 5
    assert finding.demo
    expected = reference_probabilities(paths, backbone, head, clip_below_air=False)
    np.testing.assert_allclose(finding.probabilities, expected.numpy(), atol=1e-5)


def test_key_slice_is_the_best_scoring_slice(tmp_path: Path, backbone: Backbone) -> None:
    paths = ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0])
    head = big_demo_head(64, seed=5)
    (finding,) = analyse_series(
        paths, backbone, [head], series_instance_uid="1", batch_size=3
    ).findings
    pixels = load_series(paths).pixels
    per_slice = head.predict(backbone.features(preprocess_slices(pixels)))
    assert finding.key_slice == int(torch.argmax(per_slice[:, finding.predicted_index]))


def test_key_region_is_where_the_head_scores_its_class_on_the_key_slice(
    tmp_path: Path, backbone: Backbone
) -> None:
    """The head's linear layer on each patch token of the key slice picks the region."""
    paths = ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0])
    head = big_demo_head(64, seed=5)
    (finding,) = analyse_series(
        paths, backbone, [head], series_instance_uid="1", batch_size=3
    ).findings
    plan = plan_series(paths)
    pixels = load_series(paths).pixels[finding.key_slice : finding.key_slice + 1]
    patches = backbone.tokens(preprocess_slices(pixels))[0, 1:]
    scores = head.linear(patches)[:, finding.predicted_index]
    expected = grid_region(scores, plan.reorientation, (plan.rows, plan.columns))
    assert finding.key_region == expected
    r0, c0, r1, c1 = finding.key_region
    assert 0 <= r0 < r1 <= plan.rows and 0 <= c0 < c1 <= plan.columns
    assert (r1 - r0) * (c1 - c0) < plan.rows * plan.columns  # a region, not the whole slice


def test_heads_get_their_own_preprocessing(tmp_path: Path, backbone: Backbone) -> None:
    paths = ct_series(tmp_path, [0.0, 1.0, 2.0], padding=True)
    plain = big_demo_head(64, seed=3)
    clipped = renamed(plain, "clipped", clip_below_air=True)
    result = analyse_series(paths, backbone, [plain, clipped], series_instance_uid="1")
    assert [f.head_name for f in result.findings] == ["body-region", "clipped"]
    expected_plain = reference_probabilities(paths, backbone, plain, clip_below_air=False)
    expected_clipped = reference_probabilities(paths, backbone, plain, clip_below_air=True)
    assert torch.max(torch.abs(expected_plain - expected_clipped)) > 1e-4  # the setting matters
    np.testing.assert_allclose(result.findings[0].probabilities, expected_plain, atol=1e-5)
    np.testing.assert_allclose(result.findings[1].probabilities, expected_clipped, atol=1e-5)


def test_no_heads_still_describes_the_series(tmp_path: Path, backbone: Backbone) -> None:
    result = analyse_series(ct_series(tmp_path, [0.0, 1.0]), backbone, [], series_instance_uid="1")
    assert result.findings == [] and result.slice_count == 2


def test_hidden_size_mismatch_is_refused(tmp_path: Path, backbone: Backbone) -> None:
    paths = ct_series(tmp_path, [0.0])
    with pytest.raises(HeadError, match="size 768") as err:
        analyse_series(paths, backbone, [demo_head(768)], series_instance_uid="1")
    assert "produces 64" in str(err.value)


def test_demo_flag_follows_the_backbone(tmp_path: Path, backbone: Backbone) -> None:
    head = renamed(demo_head(64), "real", demo=False)
    (finding,) = analyse_series(
        ct_series(tmp_path, [0.0]), backbone, [head], series_instance_uid="1"
    ).findings
    assert finding.demo  # real head, demo backbone: still demo


def test_head_runs_on_features_from_any_device() -> None:
    head = Head(
        card=demo_head(8).card.model_copy(update={"hidden_size": 8}), linear=nn.Linear(8, 5)
    )
    assert head.predict(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float32


# --- devices ------------------------------------------------------------------------------


def test_select_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device().type == expected
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="tpu"):
        select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_request_without_gpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda:1")


def test_heads_apply_only_to_the_modalities_on_their_card(tmp_path: Path) -> None:
    from pipelines.model.heads import heads_for

    any_series = demo_head(64, seed=1)
    save_head(any_series, tmp_path / "ct-only")
    card = json.loads((tmp_path / "ct-only" / "head.json").read_text())
    card.update(name="ct-only", modalities=["CT"])
    (tmp_path / "ct-only" / "head.json").write_text(json.dumps(card))
    ct_only = load_head(tmp_path / "ct-only")
    assert heads_for([any_series, ct_only], "CT") == [any_series, ct_only]
    assert heads_for([any_series, ct_only], "MR") == [any_series]
    assert heads_for([ct_only], None) == []


def test_mask_heads_share_the_backbone_pass_of_the_other_heads(
    tmp_path: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over the series feeds the classifier and the mask: same mask as alone."""
    from pipelines.model import head_groups, inference
    from pipelines.model.inference import analyse_series_and_masks
    from pipelines.model.masks import demo_mask_head, segment_series

    paths = ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0, 4.0])
    head = big_demo_head(64, seed=5)
    mask_head = demo_mask_head(backbone.spec.hidden_size, seed=1)
    alone = segment_series(paths, backbone, mask_head, batch_size=2)
    embedded: list[int] = []
    real = inference.backbone_tokens

    def counting(model: Backbone, batch: torch.Tensor) -> object:
        embedded.append(batch.shape[0])
        return real(model, batch)

    # the pass (head_groups) and the key slice's second look (inference)
    monkeypatch.setattr(head_groups, "backbone_tokens", counting)
    monkeypatch.setattr(inference, "backbone_tokens", counting)
    findings, [shared] = analyse_series_and_masks(
        paths, backbone, [head], series_instance_uid="1", batch_size=2, mask_heads=[mask_head]
    )
    # every slice embedded once, plus the key slice again to locate the classifier's region
    assert sum(embedded) == 5 + 1
    assert shared.mask.shape == alone.mask.shape
    assert np.mean(shared.mask != alone.mask) < 1e-3
    assert shared.finding.probabilities == pytest.approx(alone.finding.probabilities, abs=1e-4)
    assert findings.findings[0].probabilities == pytest.approx(
        analyse_series(paths, backbone, [head], series_instance_uid="1").findings[0].probabilities,
        abs=1e-6,
    )
