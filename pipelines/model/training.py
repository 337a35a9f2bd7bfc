"""Train and evaluate linear heads on frozen Curia features, with a site's own labelled series.

The recipe is Raidium's linear probe on the mean CLS token of each series, exactly what a
``mean_cls`` head sees in production. The steps live in small modules:
:mod:`~pipelines.model.labelled_data` (series, labels, codes), :mod:`~pipelines.model.nifti`,
:mod:`~pipelines.model.feature_cache` (features computed once per series),
:mod:`~pipelines.model.probe_fit` (the fit and cross-validation) and
:mod:`~pipelines.model.probe_metrics` (folds and metrics); this module puts them together
into a trained head package or an evaluation, and is where callers import training from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pipelines.model.backbone import Backbone
from pipelines.model.feature_cache import (
    FEATURE_DIR,
    FeatureCache,
    ProgressHook,
    series_features,
)
from pipelines.model.head_card import CARD_FILE, ClassCard, CodeCard, HeadCard, TrainingRecord
from pipelines.model.head_groups import head_preprocessing
from pipelines.model.heads import Head, save_head
from pipelines.model.inference import analyse_series
from pipelines.model.labelled_data import (
    SeriesSource,
    TrainingError,
    class_order,
    discover_series,
    read_codes,
    read_labels,
)
from pipelines.model.nifti import nifti_to_pl
from pipelines.model.orientation import SeriesError
from pipelines.model.probe_fit import CrossValidation, Recipe, cross_validate, train_probe
from pipelines.model.probe_metrics import (
    TaskName,
    classification_metrics,
    metrics_for,
    regression_metrics,
    roc_auc,
    stratified_folds,
)

__all__ = [
    "FEATURE_DIR",
    "CrossValidation",
    "Evaluation",
    "FeatureCache",
    "LabelledSet",
    "Recipe",
    "TrainResult",
    "TrainingError",
    "classification_metrics",
    "discover_series",
    "evaluate_head",
    "load_labelled_set",
    "nifti_to_pl",
    "read_codes",
    "read_labels",
    "regression_metrics",
    "roc_auc",
    "stratified_folds",
    "train_head",
    "train_probe",
]

# --- a labelled set, a head, an evaluation -----------------------------------------------


@dataclass
class LabelledSet:
    """The labelled series found, their features and targets."""

    sources: list[SeriesSource]
    features: torch.Tensor  # (N, hidden) mean CLS
    targets: np.ndarray  # class indices, or values for regression
    classes: list[str]  # class names (one quantity name for regression)
    cached: int
    notes: list[str] = field(default_factory=list)


def _match_labels(
    sources: list[SeriesSource], labels: Mapping[str, str], labels_source: str
) -> tuple[list[SeriesSource], list[str]]:
    by_name = {s.name: s for s in sources}
    missing = sorted(set(labels) - set(by_name))
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise TrainingError(
            f"{labels_source}: labelled series not found in the data folder: {shown}"
        )
    notes = []
    unlabelled = sorted(set(by_name) - set(labels))
    if unlabelled:
        notes.append(f"{len(unlabelled)} series without a label ignored")
    return [by_name[name] for name in sorted(labels)], notes


def _targets(task: TaskName, values: list[str], classes: list[str], source: str) -> np.ndarray:
    if task == "regression":
        try:
            return np.asarray([float(v) for v in values], dtype=np.float32)
        except ValueError as exc:
            raise TrainingError(f"{source}: regression labels must be numbers: {exc}") from exc
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise TrainingError(f"{source}: labels {unknown} are not classes of the head {classes}")
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index[v] for v in values], dtype=np.int64)


def load_labelled_set(
    data_dir: Path,
    labels: Path,
    backbone: Backbone,
    *,
    task: TaskName,
    classes: list[str] | None = None,
    clip_below_air: bool = False,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: ProgressHook | None = None,
) -> LabelledSet:
    """Find the labelled series, compute (or read cached) features, map labels to targets.

    ``classes`` fixes the class order (an existing head's); by default it is taken from the
    labels. The cache lives in ``cache_dir`` (default ``DATA_DIR/.curia-features``).
    """
    label_map = read_labels(labels)
    found, notes = discover_series(data_dir)
    sources, more = _match_labels(found, label_map, str(labels))
    notes += more
    values = [label_map[s.name] for s in sources]
    if task == "classification":
        classes = classes or class_order(values)
        if len(classes) < 2:
            raise TrainingError(f"{labels}: a classifier needs at least 2 labels, found {classes}")
    targets = _targets(task, values, classes or [], str(labels))
    cache = FeatureCache(
        cache_dir or Path(data_dir) / FEATURE_DIR, backbone, clip_below_air=clip_below_air
    )
    features, cached = series_features(
        sources,
        backbone,
        cache=cache,
        clip_below_air=clip_below_air,
        batch_size=batch_size,
        progress=progress,
    )
    return LabelledSet(sources, features, targets, classes or [], cached, notes)


@dataclass
class TrainResult:
    """The written head, where, and how it did in cross-validation."""

    head: Head
    folder: Path
    data: LabelledSet
    validation: CrossValidation | None


def train_head(
    data_dir: Path,
    labels: Path,
    *,
    name: str,
    heads_dir: Path,
    backbone: Backbone,
    task: TaskName = "classification",
    pooling: str = "mean_cls",
    folds: int = 5,
    recipe: Recipe | None = None,
    codes: Mapping[str, CodeCard] | None = None,
    quantity: str | None = None,
    version: str = "1.0.0",
    description: str = "",
    clip_below_air: bool = False,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: ProgressHook | None = None,
    on_validated: Callable[[CrossValidation], None] | None = None,
) -> TrainResult:
    """Cross-validate a linear head on labelled series, then fit it on all of them and save.

    ``folds`` 0 skips cross-validation. The package goes to ``heads_dir/name``; its card
    records the classes (codes from ``codes`` by label), the backbone and its digest, the
    recipe and the cross-validated metrics (mean over folds). A head trained on demo
    weights is flagged demo.
    """
    if pooling != "mean_cls":
        raise TrainingError(
            f"pooling {pooling!r} is not trained here: heads are trained as mean_cls linear "
            "probes (import Raidium's attentive heads with `heads import`)"
        )
    recipe = recipe or Recipe()
    folder = Path(heads_dir) / name
    if (folder / CARD_FILE).exists() and not overwrite:
        raise TrainingError(f"{folder}: a head package is already there (overwrite to replace)")
    data = load_labelled_set(
        data_dir,
        labels,
        backbone,
        task=task,
        clip_below_air=clip_below_air,
        cache_dir=cache_dir,
        batch_size=batch_size,
        progress=progress,
    )
    classes = data.classes if task == "classification" else [quantity or name]
    data.classes = classes
    validation = None
    if folds:
        if task == "classification":
            smallest = int(np.bincount(data.targets, minlength=len(classes)).min())
            if smallest < folds:
                data.notes.append(
                    f"the smallest class has {smallest} series, fewer than {folds} folds: "
                    "some folds miss it"
                )
        validation = cross_validate(
            data.features, data.targets, task=task, outputs=len(classes), folds=folds, recipe=recipe
        )
        if on_validated:
            on_validated(validation)
    linear = train_probe(
        data.features, torch.as_tensor(data.targets), task=task, outputs=len(classes), recipe=recipe
    )
    codes = codes or {}
    counts = (
        {
            c: int(n)
            for c, n in zip(classes, np.bincount(data.targets, minlength=len(classes)), strict=True)
        }
        if task == "classification"
        else {}
    )
    try:
        card = HeadCard(
            name=name,
            version=version,
            task=task,
            description=description
            or f"Linear probe on mean CLS features, trained on {len(data.sources)} series.",
            classes=[ClassCard(name=c, code=codes.get(c)) for c in classes],
            pooling="mean_cls",
            hidden_size=backbone.spec.hidden_size,
            backbone=backbone.identity.name,
            clip_below_air=clip_below_air,
            demo=backbone.identity.demo,
            backbone_digest=backbone.identity.weights_digest,
            training=TrainingRecord(
                series=len(data.sources),
                folds=folds,
                epochs=recipe.epochs,
                batch_size=recipe.batch_size,
                learning_rate=recipe.learning_rate,
                seed=recipe.seed,
                class_counts=counts,
                metrics=dict(validation.mean) if validation else {},
                metrics_std=dict(validation.std) if validation else {},
                data=str(Path(data_dir).resolve()),
                trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
            ),
        )
    except ValueError as exc:
        raise TrainingError(f"cannot describe head {name!r}: {exc}") from exc
    head = Head(card=card, linear=linear)
    save_head(head, folder)
    return TrainResult(head=head, folder=folder, data=data, validation=validation)


@dataclass
class Evaluation:
    """An existing head's metrics on labelled series, and its output per series."""

    metrics: dict[str, float]
    series: list[str]
    outputs: np.ndarray
    targets: np.ndarray
    cached: int
    notes: list[str]


def evaluate_head(
    head: Head,
    data_dir: Path,
    labels: Path,
    backbone: Backbone,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: ProgressHook | None = None,
) -> Evaluation:
    """Score ``head`` on labelled series, fed exactly as the node feeds it.

    ``mean_cls`` heads on per-slice normalised input use the cached mean CLS features;
    every other head (per-slice scores, volume-normalised input, windows) runs the node's
    full series analysis (DICOM series only).
    """
    head.check_hidden_size(backbone.spec.hidden_size)
    task: TaskName = head.card.task
    classes = [c.name for c in head.card.classes]
    if head.card.pooling == "mask":
        raise TrainingError(f"head {head.name!r} pools inside a mask: evaluation needs masks")
    clip, variant = head_preprocessing(head, backbone)
    if head.card.pooling == "mean_cls" and variant == "slice":
        data = load_labelled_set(
            data_dir,
            labels,
            backbone,
            task=task,
            classes=classes if task == "classification" else None,
            clip_below_air=clip,
            cache_dir=cache_dir,
            batch_size=batch_size,
            progress=progress,
        )
        outputs = head.predict(data.features).cpu().numpy()
        return Evaluation(
            metrics_for(task, data.targets, outputs),
            [s.name for s in data.sources],
            outputs,
            data.targets,
            data.cached,
            data.notes,
        )
    label_map = read_labels(labels)
    found, notes = discover_series(data_dir)
    sources, more = _match_labels(found, label_map, str(labels))
    nifti = [s.name for s in sources if s.kind != "dicom"]
    if nifti:
        raise TrainingError(f"head {head.name!r} is evaluated on DICOM series only, not {nifti}")
    targets = _targets(task, [label_map[s.name] for s in sources], classes, str(labels))
    if progress:
        progress.start(len(sources))
    rows = []
    for source in sources:
        try:
            result = analyse_series(
                list(source.paths),
                backbone,
                [head],
                series_instance_uid=source.name,
                batch_size=batch_size,
            )
        except SeriesError as exc:
            raise TrainingError(f"series {source.name!r}: {exc}") from exc
        rows.append(result.findings[0].probabilities)
        if progress:
            progress.advance(source.name, False)
    outputs = np.asarray(rows, dtype=np.float64)
    return Evaluation(
        metrics_for(task, targets, outputs),
        [s.name for s in sources],
        outputs,
        targets,
        0,
        notes + more,
    )
