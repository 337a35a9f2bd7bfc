"""A synthetic series whose finding sits on a few slices, and a linear head that fires on them.

Shared by the per-slice pooling and the per-slice SR tests, so both check the same finding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid

from pipelines.model.backbone import Backbone
from pipelines.model.head_card import ClassCard, HeadCard
from pipelines.model.heads import Head
from pipelines.model.inference import embed_chunks
from pipelines.model.orientation import Reorientation
from pipelines.model.series_plan import PreparedSeries, SeriesPlan

SLICES = 100
FIRING = (41, 42, 43)
CLASSES = [ClassCard(name="absent"), ClassCard(name="present")]


def synthetic_series(
    slices: int = SLICES,
    firing: tuple[int, ...] = FIRING,
    *,
    seed: int = 0,
    label: str = "",
    frames: tuple[int, ...] = (),
) -> PreparedSeries:
    """``slices`` noisy slices; those in ``firing`` hold a bright disc (the "finding").

    ``frames``: the slices' frame numbers when they are frames of one multi-frame object.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.normal(40.0, 20.0, (slices, 64, 64)).astype(np.float32)
    rows, cols = np.indices((64, 64))
    disc = (rows - 30) ** 2 + (cols - 36) ** 2 < 9**2
    for index in firing:
        pixels[index][disc] += 900.0
    plan = SeriesPlan(
        paths=tuple(Path(f"/nonexistent/{label}{i}.dcm") for i in range(slices)),
        sop_instance_uids=tuple(generate_uid() for _ in range(slices)),
        modality="CT",
        rows=64,
        columns=64,
        reorientation=Reorientation(),
        series_instance_uid="",
        sorted_by="position",
        label=label,
        frames=frames,
    )
    return PreparedSeries(plan=plan, pixels=pixels)


def firing_head(backbone: Backbone, series: PreparedSeries, **card: object) -> Head:
    """A linear head that says "present" on the disc slices only (weights from the features)."""
    features = embed_chunks([series.pixels], backbone).double()
    firing = torch.zeros(SLICES, dtype=torch.bool)
    firing[list(FIRING)] = True
    direction = features[firing].mean(0) - features[~firing].mean(0)
    scores = features @ direction
    threshold = (scores[firing].min() + scores[~firing].max()) / 2
    scale = 8.0 / float(scores[firing].min() - scores[~firing].max())
    linear = torch.nn.Linear(backbone.spec.hidden_size, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = (direction * scale).float()
        linear.bias[1] = float(-threshold * scale)
    head_card = HeadCard(
        name=str(card.pop("name", "finder")),
        version="1",
        task="classification",
        classes=CLASSES,
        hidden_size=backbone.spec.hidden_size,
        backbone="x",
        **card,  # type: ignore[arg-type]
    )
    return Head(card=head_card, linear=linear)
