"""Fitting a linear probe on frozen features, and cross-validating it.

The recipe is Raidium's linear probe: the backbone frozen, one feature vector per series
(the mean CLS token, exactly what a ``mean_cls`` head sees in production), a linear layer
initialised N(0, 0.01), SGD with momentum 0.9, a learning rate scaled by batch size / 256,
a cosine schedule to zero, cross-entropy (MSE for regression). Features are not
standardised: a head must take the features the node computes, as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.model.classifier import init_probe_linear
from pipelines.model.labelled_data import TrainingError
from pipelines.model.probe_metrics import TaskName, metrics_for, plain_folds, stratified_folds

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
