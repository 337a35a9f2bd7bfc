"""Where on its key slice a head looked: the region a viewer draws for a finding.

A radiologist's viewer (OHIF, for one) draws an SR finding only where it has planar
coordinates on an image. A series-level head concludes about the whole series, so the
report points at its key slice and, on that slice, at the patches that pushed the score of
the predicted class up the most:

- ``mean_cls`` and ``mean_patch`` heads: the head's linear layer applied to each patch
  token of the key slice (for ``mean_patch`` this is exact: the mean of the patch logits is
  the series logit; for ``mean_cls`` it is the usual class-activation reading of patch
  tokens);
- attentive heads: the attention their learned queries paid to each token of the key slice;
- mask heads: the mask itself on its largest slice.

The strongest patches (the top :data:`TOP_FRACTION`, at least one) that touch the best one
form the region; its bounding box, in the stored image's pixel rows and columns, is what
the report draws. Heads that keep no spatial tokens (``slice_mean`` windows) give no region:
the report then outlines the whole key slice.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from pipelines.findings import Box
from pipelines.model.orientation import Reorientation

#: Share of a slice's patches that may belong to the drawn region.
TOP_FRACTION = 0.1


def _strongest_component(scores: np.ndarray) -> np.ndarray:
    """The 4-connected set of top-scoring cells that contains the best cell, as a mask."""
    flat = scores.ravel()
    keep = max(1, math.ceil(TOP_FRACTION * flat.size))
    top = np.zeros(flat.size, dtype=bool)
    top[np.argsort(-flat, kind="stable")[:keep]] = True  # exactly `keep` cells, ties too
    strong = top.reshape(scores.shape)
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    region = np.zeros_like(strong)
    region[best] = True
    todo = deque([best])
    rows, cols = scores.shape
    while todo:
        r, c = todo.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and strong[nr, nc] and not region[nr, nc]:
                region[nr, nc] = True
                todo.append((nr, nc))
    return region


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box (row0, col0, row1, col1; ends exclusive) of a 2D mask, None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def grid_region(
    scores: torch.Tensor | np.ndarray,
    reorientation: Reorientation,
    stored_shape: tuple[int, int],
    *,
    extent: float = 1.0,
) -> Box:
    """The stored-pixel box of the strongest patches of a square patch grid.

    ``scores`` are per patch, row-major over the grid of the PL (reoriented, resized) input
    slice, flat or square. ``extent`` is the share of the slice's side the grid covers from
    the top-left corner (less than 1 when pooled patches drop a remainder). The box is cut
    out in PL layout, where the grid lies, then taken back to the stored layout.
    """
    values = torch.as_tensor(scores).detach().float().cpu().numpy()
    side = math.isqrt(values.size)
    if side * side != values.size or side == 0:
        raise ValueError(f"{values.size} patch scores do not form a square grid")
    region = _strongest_component(values.reshape(side, side))
    cells = mask_box(region)
    assert cells is not None  # never empty: the best cell is in it
    r0, c0, r1, c1 = cells
    height, width = reorientation.output_shape(*stored_shape)
    cell_h, cell_w = extent * height / side, extent * width / side
    pl = np.zeros((height, width), dtype=bool)
    pl[
        math.floor(r0 * cell_h) : max(math.ceil(r1 * cell_h), math.floor(r0 * cell_h) + 1),
        math.floor(c0 * cell_w) : max(math.ceil(c1 * cell_w), math.floor(c0 * cell_w) + 1),
    ] = True
    box = mask_box(reorientation.undo(pl))
    assert box is not None
    return box
