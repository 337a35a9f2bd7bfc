"""From per-slice scores to one series value, for heads that score one slice at a time.

Raidium's 2D heads are per-slice classifiers: linear on one slice's final-norm CLS. Applying
such a head to the series-mean CLS equals averaging its per-slice logits, which dilutes a
finding seen on 5 of 300 slices away. A ``slice`` head is therefore run on every slice and its
scores aggregated by the rule on its card, and the key slice is the slice that scored:

- ``max``: each class's highest per-slice score;
- ``mean``: each class's mean over the slices;
- ``top_k_mean``: each class's mean over its ``k`` highest-scoring slices.

Scores are the softmax probabilities of each slice (raw values for regression). Aggregated
per class they are scores, not a distribution. With a ``negative_class`` (the "nothing found"
class of a detection head) the other classes are aggregated and the negative class scores
``1 - `` the highest of them, so a finding on a few slices is not outvoted by the many
slices where nothing is seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.model.head_card import Aggregation


@dataclass(frozen=True)
class SliceAggregate:
    """The series value of a ``slice`` head and the slice it came from."""

    outputs: torch.Tensor  # (C,): aggregated scores, or the aggregated value for regression
    predicted: int
    key_slice: int | None  # None for a mean, where no one slice is the reason


def _aggregate(scores: torch.Tensor, aggregation: Aggregation, top_k: int | None) -> torch.Tensor:
    if aggregation == "max":
        return scores.max(dim=0).values
    if aggregation == "mean":
        return scores.mean(dim=0)
    k = min(top_k or 1, scores.shape[0])
    return scores.topk(k, dim=0).values.mean(dim=0)


def aggregate_slices(
    scores: torch.Tensor,
    aggregation: Aggregation,
    *,
    top_k: int | None = None,
    negative_class: int | None = None,
    regression: bool = False,
) -> SliceAggregate:
    """Aggregate per-slice scores (S, C) into the series value and its key slice.

    The key slice is the slice with the highest score for the predicted class (for
    regression, the highest value), except after a ``mean`` of a regression head, which no
    one slice explains.
    """
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"per-slice scores must be (S, C) with S >= 1, got {tuple(scores.shape)}")
    scores = scores.float()
    outputs = _aggregate(scores, aggregation, top_k)
    if negative_class is not None and not regression:
        others = torch.ones(outputs.shape[0], dtype=torch.bool)
        others[negative_class] = False
        outputs[negative_class] = (1.0 - outputs[others].max()).clamp_min(0.0)
    predicted = 0 if regression else int(torch.argmax(outputs))
    if regression and aggregation == "mean":
        return SliceAggregate(outputs=outputs, predicted=0, key_slice=None)
    key = int(torch.argmax(scores[:, predicted]))
    return SliceAggregate(outputs=outputs, predicted=predicted, key_slice=key)


def describe(aggregation: Aggregation, top_k: int | None, slices: int) -> str:
    """How the series value was made, as a report's algorithm parameters state it."""
    rule = f"mean of the top {top_k}" if aggregation == "top_k_mean" else aggregation
    return f"per-slice scores, {rule} over {slices} slices"
