"""Training heads on labelled series: real CT, feature cache, k-fold metrics, CLI.

The labelled set is built from the real sample CT (20 axial slices of the upper abdomen,
2 mm apart): ten 3-slice "series", five from the lower half of the scan and five from
the upper half, labelled by body level. The tiny demo backbone's features differ little
between images (post-norm CLS of norm ~8, class means ~0.02 apart), hence the large base
learning rate the CLI tests pass; the signal is real (held-out AUC 1 per fold).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from node.cli.heads import heads_app
from pipelines.model import feature_cache, labelled_data, training
from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.heads import load_head
from pipelines.model.inference import analyse_series
from pipelines.model.preprocess import plan_series
from pipelines.model.training import (
    FeatureCache,
    Recipe,
    TrainingError,
    classification_metrics,
    discover_series,
    evaluate_head,
    nifti_to_pl,
    read_labels,
    regression_metrics,
    roc_auc,
    stratified_folds,
    train_head,
)
from tests.support.testdata import repaired_ct_series

#: (first slice, label) of each 3-slice series, slices sorted feet to head.
SERIES = [(s, "lower") for s in (0, 2, 4, 6, 7)] + [(s, "upper") for s in (10, 12, 13, 15, 17)]
TINY_ENV = {"CURIA_MODEL__DEMO_SIZE": "tiny", "CURIA_MODEL__DEVICE": "cpu"}
FAST_RECIPE = ["--lr", "10", "--epochs", "300", "--batch-size", "16"]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return demo_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA_DIR with one subfolder per series, labels.csv, codes.csv and an unlabelled folder."""
    root = tmp_path_factory.mktemp("labelled")
    ordered = plan_series(repaired_ct_series(root / "source", "training")).paths
    data = root / "data"
    rows = ["series,label"]
    for k, (first, label) in enumerate(SERIES):
        folder = data / f"series-{k:02d}"
        folder.mkdir(parents=True)
        for path in ordered[first : first + 3]:
            shutil.copy(path, folder / path.name)
        rows.append(f"series-{k:02d},{label}")
    (data / "unlabelled").mkdir()
    shutil.copy(ordered[0], data / "unlabelled" / "x.dcm")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "codes.csv").write_text(
        "label,value,scheme,meaning\n"
        "lower,C0230166,UMLS,Lower abdomen\n"
        "upper,C0230165,UMLS,Upper abdomen\n"
    )
    return data


def labels_of(data: Path) -> Path:
    return data.parent / "labels.csv"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(heads_app, list(args), env=TINY_ENV)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def count_backbone_slices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes the backbone embeds from now on, whichever backbone the CLI loads."""
    calls: list[int] = []
    original = Backbone.features

    def counted(self: Backbone, batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(Backbone, "features", counted)
    return calls


# --- end to end through the CLI -----------------------------------------------------------


@pytest.mark.slow
def test_train_writes_a_head_and_caches_features(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads, cache = tmp_path / "heads", tmp_path / "cache"
    common = ["train", str(dataset), "--labels", str(labels_of(dataset)), "--name", "level"]
    common += ["--out", str(heads), "--weights", "demo", "--cache-dir", str(cache)]
    common += ["--codes", str(dataset.parent / "codes.csv"), "--folds", "5", *FAST_RECIPE]
    embedded = count_backbone_slices(monkeypatch)
    code, output = run(*common)
    assert code == 0, output
    assert sum(embedded) == 30, "the backbone embeds the 3 slices of each of the 10 series"
    assert "5-fold cross-validation" in output and "pooled" in output
    assert "10 series, 0 features from the cache, 10 computed" in output
    assert "1 series without a label ignored" in output
    assert "wrote head level (classification: lower, upper)" in output

    files = list(cache.glob("*-plain/*.safetensors"))
    assert len(files) == 10
    head = load_head(heads / "level")
    card = head.card
    assert [c.name for c in card.classes] == ["lower", "upper"]
    assert card.classes[1].code is not None and card.classes[1].code.value == "C0230165"
    assert card.backbone == "Curia-tiny (demo weights)" and card.demo
    assert card.backbone_digest == demo_backbone("tiny").identity.weights_digest
    assert card.pooling == "mean_cls" and card.hidden_size == 64
    record = card.training
    assert record is not None and record.series == 10 and record.folds == 5
    assert record.class_counts == {"lower": 5, "upper": 5}
    for name in ("accuracy", "auc"):
        value = record.metrics[name]
        assert value is not None and 0.0 <= value <= 1.0
    assert record.metrics["auc"] > 0.5  # the body level is learnable from these features

    stored = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files}
    embedded.clear()
    code, output = run(*common, "--overwrite")
    assert code == 0, output
    assert "10 series, 10 features from the cache, 0 computed" in output
    assert embedded == [], "a second run reads every series' features from the cache"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == stored
    assert load_head(heads / "level").card.training is not None

    code, output = run(*common)
    assert code == 2 and "already there" in output


@pytest.mark.slow
def test_evaluate_and_list(dataset: Path, tmp_path: Path) -> None:
    heads = tmp_path / "heads"
    code, output = run(
        "train",
        str(dataset),
        "--labels",
        str(labels_of(dataset)),
        "--name",
        "level",
        "--out",
        str(heads),
        "--weights",
        "demo",
        "--folds",
        "0",
        "--version",
        "2.0",
        *FAST_RECIPE,
    )
    assert code == 0, output
    assert "cross-validation" not in output
    code, output = run(
        "evaluate", str(heads / "level"), str(dataset), "--labels", str(labels_of(dataset))
    )
    assert code == 0, output
    assert "accuracy" in output and "auc" in output

    code, output = run("list", str(heads))
    assert code == 0, output
    for text in ("level", "2.0", "classification", "mean_cls", "lower", "upper", "yes"):
        assert text in output


@pytest.mark.slow
def test_regression_head(dataset: Path, tmp_path: Path) -> None:
    labels = tmp_path / "position.csv"
    labels.write_text(
        "series,label\n"
        + "".join(f"series-{k:02d},{2.0 * first}\n" for k, (first, _) in enumerate(SERIES))
    )
    code, output = run(
        "train",
        str(dataset),
        "--labels",
        str(labels),
        "--name",
        "position",
        "--out",
        str(tmp_path / "heads"),
        "--weights",
        "demo",
        "--task",
        "regression",
        "--quantity",
        "height",
        "--folds",
        "3",
    )
    assert code == 0, output
    assert "rmse" in output and "mae" in output
    head = load_head(tmp_path / "heads" / "position")
    assert head.card.task == "regression" and [c.name for c in head.card.classes] == ["height"]
    assert head.card.training is not None
    assert head.card.training.metrics["rmse"] is not None
    assert head.card.training.metrics["rmse"] >= 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pooling", "attentive"], "pooling 'attentive' is not trained here"),
        (["--folds", "11"], "needs 2 <= folds <= the 10 labelled series"),
    ],
)
def test_train_refuses_bad_settings(
    dataset: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    code, output = run(
        "train",
        str(dataset),
        "--labels",
        str(labels_of(dataset)),
        "--name",
        "x",
        "--out",
        str(tmp_path),
        "--weights",
        "demo",
        *extra,
    )
    assert code == 2
    assert message in " ".join(output.split())


def test_missing_labelled_series_is_an_error(dataset: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("series,label\nseries-00,lower\nnowhere,upper\n")
    code, output = run(
        "train",
        str(dataset),
        "--labels",
        str(labels),
        "--name",
        "x",
        "--out",
        str(tmp_path / "h"),
        "--weights",
        "demo",
    )
    assert code == 2
    assert "labelled series not found in the data folder: nowhere" in " ".join(output.split())


# --- the API ------------------------------------------------------------------------------


def test_trained_head_sees_what_the_node_computes(
    dataset: Path, tmp_path: Path, backbone: Backbone
) -> None:
    """The cached training feature is exactly the mean CLS analyse_series pools."""
    result = train_head(
        dataset,
        labels_of(dataset),
        name="level",
        heads_dir=tmp_path,
        backbone=backbone,
        folds=0,
        recipe=Recipe(epochs=300, learning_rate=10),
    )
    series = result.data.sources[3]
    (finding,) = analyse_series(
        list(series.paths), backbone, [result.head], series_instance_uid="1"
    ).findings
    expected = result.head.predict(result.data.features[3:4])[0]
    np.testing.assert_allclose(finding.probabilities, expected.numpy(), atol=1e-6)
    evaluation = evaluate_head(result.head, dataset, labels_of(dataset), backbone)
    assert evaluation.metrics["accuracy"] > 0.5
    assert evaluation.cached == 10


def test_cached_features_skip_the_backbone(
    dataset: Path, tmp_path: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_head(
        dataset, labels_of(dataset), name="a", heads_dir=tmp_path, backbone=backbone, folds=0
    )

    def no_backbone(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the backbone ran although every feature is cached")

    monkeypatch.setattr(feature_cache, "compute_slice_features", no_backbone)
    result = train_head(
        dataset, labels_of(dataset), name="b", heads_dir=tmp_path, backbone=backbone, folds=2
    )
    assert result.data.cached == 10


def test_changed_files_are_recomputed(dataset: Path, backbone: Backbone) -> None:
    sources, _ = discover_series(dataset)
    cache = FeatureCache(dataset / training.FEATURE_DIR, backbone, clip_below_air=False)
    source = next(s for s in sources if s.name == "series-01")
    if cache.load(source) is None:
        cache.store(source, torch.zeros(3, 64))
    assert cache.load(source) is not None
    stat = source.paths[0].stat()
    os.utime(source.paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.load(source) is None  # the file changed: its features are stale


def test_series_discovery_and_nifti_without_nibabel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.dcm").write_bytes(b"")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"")
    (tmp_path / ".curia-features").mkdir()
    (tmp_path / "vol.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.setattr(labelled_data, "nibabel_available", lambda: False)
    sources, notes = discover_series(tmp_path)
    assert [(s.name, s.kind, [p.name for p in s.paths]) for s in sources] == [
        ("a", "dicom", ["1.dcm"])
    ]
    assert any("NIfTI" in n and "nibabel" in n and "vol.nii.gz" in n for n in notes)


def test_nifti_is_reoriented_to_pl() -> None:
    """A RAS-stored volume comes out as axial PL slices, feet to head."""
    data = np.zeros((4, 5, 3), dtype=np.float32)  # x (towards Right), y (Anterior), z (Superior)
    data[0, 0, 0] = 1.0  # RAS index 0 on every axis: the most left, posterior, inferior voxel
    volume = nifti_to_pl(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert volume.shape == (3, 5, 4)
    # slices run feet to head, rows towards Posterior, columns towards Left
    assert volume[0, 4, 3] == 1.0 and float(volume.sum()) == 1.0
    flipped = nifti_to_pl(data[::-1, ::-1, ::-1].copy(), np.diag([-1.0, -1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(flipped, volume)
    transposed = nifti_to_pl(np.transpose(data, (2, 0, 1)).copy(), np.eye(4)[[2, 0, 1, 3]].T)
    np.testing.assert_array_equal(transposed, volume)


# --- folds and metrics ----------------------------------------------------------------------


def test_read_labels_refuses_repeats(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("series,label\na,x\na,y\n")
    with pytest.raises(TrainingError, match="line 3: series 'a' repeated"):
        read_labels(path)
    path.write_text("name,label\na,x\n")
    with pytest.raises(TrainingError, match="missing \\['series'\\]"):
        read_labels(path)


def test_stratified_folds_balance_classes() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(18))
    for fold in folds:
        counts = np.bincount(labels[fold], minlength=3)
        assert counts[0] in (3, 4) and counts[1] in (1, 2) and counts[2] == 1
    assert [len(f) for f in folds] == [6, 6, 6]


def test_auc() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # ties count half
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    metrics = classification_metrics(np.array([0, 1, 2, 1]), probabilities)
    assert metrics["accuracy"] == 0.75
    # one-vs-rest: class 0 -> 2/3, class 1 -> 1/2, class 2 -> 1
    assert metrics["auc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_regression_metrics() -> None:
    metrics = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert metrics["mae"] == pytest.approx(2 / 3)
    assert metrics["rmse"] == pytest.approx(np.sqrt(4 / 3))
    assert metrics["r2"] == pytest.approx(1 - 4 / 2)


def test_divergence_is_reported() -> None:
    features = torch.randn(20, 8) * 100 + 1000
    with pytest.raises(TrainingError, match="diverged"):
        training.train_probe(
            features,
            torch.randn(20) * 50,
            task="regression",
            outputs=1,
            recipe=Recipe(learning_rate=10),
        )


def test_list_shows_mask_heads_and_broken_packages(tmp_path: Path) -> None:
    from pipelines.model.heads import demo_head, save_head
    from pipelines.model.masks import demo_mask_head, save_mask_head

    save_head(demo_head(64), tmp_path / "region")
    save_mask_head(demo_mask_head(64), tmp_path / "mask")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "head.json").write_text('{"name": "broken"}')
    code, output = run("list", str(tmp_path))
    assert code == 1
    for text in ("body-region", "demo-region-", "segmentation", "cannot load"):
        assert text in output
    assert "field 'version'" in " ".join(output.split())
