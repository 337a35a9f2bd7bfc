"""Folds and metrics for evaluating heads, in numpy so training needs no extra dependency.

Metrics follow Raidium's evaluation: accuracy and one-vs-rest AUC (binary: the AUC of the
second class's probability), RMSE / MAE / R2 for regression; stratified k-fold.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

TaskName = Literal["classification", "regression"]


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
