"""Train and evaluate linear heads on frozen Curia features, with a site's own labelled series.

The recipe is Raidium's linear probe: the backbone frozen, one feature vector per series
(the mean CLS token, exactly what a ``mean_cls`` head sees in production), a linear layer
initialised N(0, 0.01), SGD with momentum 0.9, a learning rate scaled by batch size / 256,
a cosine schedule to zero, cross-entropy (MSE for regression). Features are not
standardised: a head must take the features the node computes, as they are.

Features are cached per series under ``<cache>/<backbone digest>-<preprocessing>/``, keyed
by the series files' names, sizes and modification times, so a second run (another fold
count, another label set) never runs the backbone again.

Metrics follow Raidium's evaluation: accuracy and one-vs-rest AUC (binary: the AUC of the
second class's probability), RMSE / MAE / R2 for regression; stratified k-fold, computed
here with numpy so training needs no extra dependency.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.model.backbone import Backbone
from pipelines.model.heads import (
    CARD_FILE,
    ClassCard,
    CodeCard,
    Head,
    HeadCard,
    TrainingRecord,
    init_probe_linear,
    save_head,
)
from pipelines.model.inference import analyse_series, embed_chunks, slice_features
from pipelines.model.preprocess import MAX_OBLIQUITY_DEG, SeriesError

FEATURE_DIR = ".curia-features"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
CLS_KEY = "cls"

TaskName = Literal["classification", "regression"]


class TrainingError(ValueError):
    """Training data or settings the node cannot use; the message says which and why."""


# --- the data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSource:
    """One labelled unit: a folder of DICOM files, or one NIfTI volume."""

    name: str
    kind: Literal["dicom", "nifti"]
    paths: tuple[Path, ...]

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, replaced or rewritten."""
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def nibabel_available() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


def _nifti_name(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def discover_series(data_dir: Path) -> tuple[list[SeriesSource], list[str]]:
    """Every series under ``data_dir``: one subfolder of DICOM files each, or ``NAME.nii[.gz]``.

    Hidden files and folders (the feature cache among them) are skipped. NIfTI volumes need
    nibabel; without it they are left out and the returned notes say so.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingError(f"{data_dir}: data folder does not exist")
    sources: list[SeriesSource] = []
    notes: list[str] = []
    skipped_nifti: list[str] = []
    can_read_nifti = nibabel_available()
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(
                p
                for p in entry.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(entry).parts)
            )
            if files:
                sources.append(SeriesSource(entry.name, "dicom", tuple(files)))
            continue
        name = _nifti_name(entry)
        if name is None:
            continue
        if can_read_nifti:
            sources.append(SeriesSource(name, "nifti", (entry,)))
        else:
            skipped_nifti.append(entry.name)
    if skipped_nifti:
        notes.append(
            f"{len(skipped_nifti)} NIfTI file(s) skipped: reading NIfTI needs nibabel "
            f"(pip install nibabel): {', '.join(skipped_nifti[:5])}"
        )
    names = [s.name for s in sources]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TrainingError(f"{data_dir}: series names used twice (folder and NIfTI): {clashes}")
    return sources, notes


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in columns if c not in header]
            if missing:
                raise TrainingError(
                    f"{path}: needs a header row with columns {list(columns)}; missing {missing}"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                clean = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                empty = [c for c in columns if not clean.get(c)]
                if empty:
                    raise TrainingError(f"{path}: line {line}: empty {', '.join(empty)}")
                rows.append(clean | {"_line": str(line)})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingError(f"{path}: cannot read: {exc}") from exc


def read_labels(path: Path) -> dict[str, str]:
    """``series,label`` rows (series = the subfolder or NIfTI name), one per series."""
    labels: dict[str, str] = {}
    for row in _read_csv(path, ("series", "label")):
        if row["series"] in labels:
            raise TrainingError(f"{path}: line {row['_line']}: series {row['series']!r} repeated")
        labels[row["series"]] = row["label"]
    if not labels:
        raise TrainingError(f"{path}: no labelled series")
    return labels


def read_codes(path: Path) -> dict[str, CodeCard]:
    """``label,value,scheme,meaning`` rows: the code a report states for each label."""
    out: dict[str, CodeCard] = {}
    for row in _read_csv(path, ("label", "value", "scheme", "meaning")):
        if row["label"] in out:
            raise TrainingError(f"{path}: line {row['_line']}: label {row['label']!r} repeated")
        out[row["label"]] = CodeCard(
            value=row["value"], scheme=row["scheme"], meaning=row["meaning"]
        )
    return out


def class_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels in a stable order: numerically when they are all integers."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


# --- NIfTI -------------------------------------------------------------------------------


def nifti_to_pl(data: np.ndarray, affine: np.ndarray, source: str = "volume") -> np.ndarray:
    """A NIfTI volume as axial PL slices (S, H, W), feet to head, like a sorted DICOM series.

    NIfTI's world is RAS (+x Right, +y Anterior, +z Superior). Each array axis is matched to
    its nearest world axis from the affine; the volume is transposed to (z, y, x) and flipped
    so slices run inferior to superior, rows towards Posterior and columns towards Left.
    """
    if data.ndim != 3:
        raise SeriesError(f"{source}: expected a 3D volume, got shape {data.shape}")
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    world_of_axis, sign_of_axis = [], []
    for axis in range(3):
        column = directions[:, axis]
        norm = float(np.linalg.norm(column))
        if not norm > 0:
            raise SeriesError(f"{source}: affine has a zero column for array axis {axis}")
        world = int(np.argmax(np.abs(column)))
        angle = math.degrees(math.acos(min(1.0, abs(float(column[world])) / norm)))
        if angle > MAX_OBLIQUITY_DEG:
            raise SeriesError(f"{source}: array axis {axis} is {angle:.0f} degrees oblique")
        world_of_axis.append(world)
        sign_of_axis.append(float(np.sign(column[world])))
    if sorted(world_of_axis) != [0, 1, 2]:
        raise SeriesError(f"{source}: two array axes map onto the same patient axis")
    axis_of_world = {w: a for a, w in enumerate(world_of_axis)}
    volume = np.transpose(data, (axis_of_world[2], axis_of_world[1], axis_of_world[0]))
    if sign_of_axis[axis_of_world[2]] < 0:  # slices must run towards Superior
        volume = volume[::-1]
    if sign_of_axis[axis_of_world[1]] > 0:  # rows must run towards Posterior (-y in RAS)
        volume = volume[:, ::-1]
    if sign_of_axis[axis_of_world[0]] > 0:  # columns must run towards Left (-x in RAS)
        volume = volume[:, :, ::-1]
    return np.ascontiguousarray(volume, dtype=np.float32)


def load_nifti(path: Path) -> np.ndarray:
    """Read a NIfTI volume (scaled values: HU for CT) as PL slices (S, H, W)."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (OSError, ValueError, EOFError) as exc:
        raise SeriesError(f"{path}: cannot read NIfTI: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return nifti_to_pl(data, image.affine, str(path))


# --- features and their cache ------------------------------------------------------------


class FeatureCache:
    """Per-slice CLS features of each series, for one backbone and one preprocessing."""

    def __init__(self, root: Path, backbone: Backbone, *, clip_below_air: bool) -> None:
        identity = backbone.identity
        key = (
            identity.weights_digest
            or hashlib.sha256(f"{identity.name}\0{identity.version}".encode()).hexdigest()
        )
        self.folder = Path(root) / f"{key[:16]}-{'clip' if clip_below_air else 'plain'}"

    def path(self, source: SeriesSource) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)
        tag = hashlib.sha256(source.name.encode()).hexdigest()[:8]
        return self.folder / f"{safe}-{tag}.safetensors"

    def load(self, source: SeriesSource) -> torch.Tensor | None:
        """The cached (S, hidden) features, or None if absent or the files changed since."""
        path = self.path(source)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") != source.fingerprint():
                    return None
                return fh.get_tensor(CLS_KEY)
        except (OSError, SafetensorError):
            return None

    def store(self, source: SeriesSource, features: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(source)
        partial = path.with_suffix(".partial")
        metadata = {"series": source.name, "fingerprint": source.fingerprint()}
        save_file({CLS_KEY: features.contiguous()}, str(partial), metadata=metadata)
        partial.replace(path)


def compute_slice_features(
    source: SeriesSource, backbone: Backbone, *, clip_below_air: bool, batch_size: int = 16
) -> torch.Tensor:
    """(S, hidden) CLS features of every slice, through the node's own inference path."""
    if source.kind == "dicom":
        return slice_features(
            list(source.paths), backbone, clip_below_air=clip_below_air, batch_size=batch_size
        )
    volume = load_nifti(source.paths[0])
    chunks = (volume[i : i + batch_size] for i in range(0, len(volume), batch_size))
    return embed_chunks(chunks, backbone, clip_below_air=clip_below_air)


class ProgressHook(Protocol):
    """What a caller (the CLI's progress bar) is told while features are computed."""

    def start(self, total: int) -> None: ...

    def advance(self, name: str, cached: bool) -> None: ...


def series_features(
    sources: Sequence[SeriesSource],
    backbone: Backbone,
    *,
    cache: FeatureCache | None,
    clip_below_air: bool,
    batch_size: int = 16,
    progress: ProgressHook | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean CLS feature per series (N, hidden) and how many came from the cache.

    The mean is taken in float64 like :func:`pipelines.model.inference.analyse_series`, so a
    trained head sees in production exactly the features it was trained on.
    """
    if progress:
        progress.start(len(sources))
    rows, cached = [], 0
    for source in sources:
        features = cache.load(source) if cache else None
        hit = features is not None
        if features is None:
            try:
                features = compute_slice_features(
                    source, backbone, clip_below_air=clip_below_air, batch_size=batch_size
                )
            except SeriesError as exc:
                raise TrainingError(f"series {source.name!r}: {exc}") from exc
            if cache:
                cache.store(source, features)
        cached += hit
        rows.append((features.double().sum(dim=0) / len(features)).float())
        if progress:
            progress.advance(source.name, hit)
    return torch.stack(rows), cached


# --- folds and metrics -------------------------------------------------------------------


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold; every class spread as evenly as possible over the folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        fold_of[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(fold_of == f) for f in range(folds)]


def plain_folds(count: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold, shuffled (regression: nothing to stratify)."""
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, folds)]


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN with one class."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC: binary on the second class, else the mean one-vs-rest AUC.

    One-vs-rest averages over the classes that have both positives and negatives among
    ``labels``; with fewer than two such classes the AUC is NaN (undefined).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == labels))
    if probabilities.shape[1] == 2:
        auc = roc_auc(labels == 1, probabilities[:, 1])
    else:
        aucs = [roc_auc(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
        defined = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(defined)) if len(defined) >= 2 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    targets = np.asarray(targets, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(targets.shape)
    error = predictions - targets
    total = float(np.sum((targets - targets.mean()) ** 2))
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "r2": 1.0 - float(np.sum(error**2)) / total if total > 0 else float("nan"),
    }


def metrics_for(task: TaskName, targets: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    if task == "regression":
        return regression_metrics(targets, outputs[:, 0])
    return classification_metrics(targets, outputs)


# --- the probe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Linear-probe hyper-parameters. ``learning_rate`` is the base rate for batch 256."""

    epochs: int = 100
    batch_size: int = 64
    learning_rate: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise TrainingError(
                f"epochs ({self.epochs}), batch_size ({self.batch_size}) and learning_rate "
                f"({self.learning_rate}) must be positive"
            )


def train_probe(
    features: torch.Tensor, targets: torch.Tensor, *, task: TaskName, outputs: int, recipe: Recipe
) -> nn.Linear:
    """Fit a linear layer on frozen features with Raidium's recipe; deterministic per seed."""
    count, hidden = features.shape
    batch = min(recipe.batch_size, count)
    steps = recipe.epochs * math.ceil(count / batch)
    generator = torch.Generator().manual_seed(recipe.seed)
    linear = nn.Linear(hidden, outputs)
    init_probe_linear(linear, generator)
    optimizer = torch.optim.SGD(
        linear.parameters(), lr=recipe.learning_rate * batch / 256, momentum=0.9
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    loss_fn: nn.Module = nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()
    x = features.float()
    y = targets.float() if task == "regression" else targets.long()
    with torch.enable_grad():
        for _ in range(recipe.epochs):
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, batch):
                rows = order[start : start + batch]
                logits = linear(x[rows])
                if task == "regression":
                    logits = logits.squeeze(-1)
                loss = loss_fn(logits, y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if not bool(torch.isfinite(linear.weight).all()):
                raise TrainingError(
                    f"training diverged (non-finite weights) at learning rate "
                    f"{recipe.learning_rate}: lower it (--lr)"
                )
    return linear.eval().requires_grad_(False)


def _outputs(linear: nn.Linear, features: torch.Tensor, task: TaskName) -> np.ndarray:
    with torch.inference_mode():
        logits = linear(features.float())
        out = logits if task == "regression" else torch.softmax(logits, dim=-1)
    return out.numpy()


@dataclass
class CrossValidation:
    """Per-fold metrics, their mean and standard deviation, and the pooled out-of-fold ones."""

    folds: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    pooled: dict[str, float]


def cross_validate(
    features: torch.Tensor,
    targets: np.ndarray,
    *,
    task: TaskName,
    outputs: int,
    folds: int,
    recipe: Recipe,
) -> CrossValidation:
    """k-fold (stratified for classification): train on k-1 folds, score the held-out one.

    The mean and standard deviation are over the folds where a metric is defined (a fold
    holding one class has no AUC); ``pooled`` scores all out-of-fold predictions at once.
    """
    count = len(features)
    if not 2 <= folds <= count:
        raise TrainingError(f"--folds {folds}: needs 2 <= folds <= the {count} labelled series")
    splits = (
        plain_folds(count, folds, recipe.seed)
        if task == "regression"
        else stratified_folds(targets, folds, recipe.seed)
    )
    pooled = np.zeros((count, outputs))
    rows = []
    for test in splits:
        train = np.setdiff1d(np.arange(count), test)
        linear = train_probe(
            features[train],
            torch.as_tensor(targets[train]),
            task=task,
            outputs=outputs,
            recipe=recipe,
        )
        pooled[test] = _outputs(linear, features[test], task)
        rows.append(metrics_for(task, targets[test], pooled[test]) | {"series": float(len(test))})
    names = [k for k in rows[0] if k != "series"]
    defined = {k: np.asarray([r[k] for r in rows if not math.isnan(r[k])]) for k in names}
    nan = float("nan")
    return CrossValidation(
        folds=rows,
        mean={k: float(v.mean()) if len(v) else nan for k, v in defined.items()},
        std={k: float(v.std()) if len(v) else nan for k, v in defined.items()},
        pooled=metrics_for(task, targets, pooled),
    )


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

    ``mean_cls`` heads use the cached mean CLS features; window heads run the node's full
    series analysis (DICOM series only).
    """
    head.check_hidden_size(backbone.spec.hidden_size)
    task: TaskName = head.card.task
    classes = [c.name for c in head.card.classes]
    if not head.uses_window:
        data = load_labelled_set(
            data_dir,
            labels,
            backbone,
            task=task,
            classes=classes if task == "classification" else None,
            clip_below_air=head.card.clip_below_air,
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
        raise TrainingError(f"window heads are evaluated on DICOM series only, not {nifti}")
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
