"""Where a finding is drawn: the strongest patches of the key slice, in stored pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.model.key_region import grid_region, mask_box
from pipelines.model.preprocess import Reorientation


def test_mask_box_is_the_bounding_box_with_exclusive_ends() -> None:
    mask = np.zeros((10, 8), dtype=bool)
    mask[2:5, 3] = True
    mask[4, 6] = True
    assert mask_box(mask) == (2, 3, 5, 7)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def one_cell(row: int, column: int) -> np.ndarray:
    """A 4 x 4 grid whose region is one cell: the runner-up (top 2 of 16) is far away."""
    scores = np.zeros((4, 4))
    scores[row, column] = 1.0
    scores[3 - row, 3 - column] = 0.5
    return scores


def test_best_patch_maps_to_its_pixels() -> None:
    scores = torch.as_tensor(one_cell(1, 2)).flatten()  # row 1, column 2 of a 4 x 4 grid
    assert grid_region(scores, Reorientation(), (64, 64)) == (16, 32, 32, 48)


def test_only_the_strong_patches_touching_the_best_one_count() -> None:
    scores = np.zeros((4, 4))
    scores[0, 0], scores[3, 3] = 10.0, 9.0  # both in the top 10 %, not adjacent
    assert grid_region(scores, Reorientation(), (64, 64)) == (0, 0, 16, 16)
    scores[0, 1] = 9.5  # adjacent and strong: joins the region (top 3 of 16 cells)
    scores[3, 3] = 0.0
    assert grid_region(scores, Reorientation(), (64, 64)) == (0, 0, 16, 32)


def test_region_goes_back_to_the_stored_orientation() -> None:
    """The grid lies on the PL slice; the box is in the stored rows and columns."""
    stored = (64, 32)  # rows x columns as received
    scores = one_cell(0, 0)
    # flipped rows: PL's top rows are the stored bottom rows
    assert grid_region(scores, Reorientation(flip_rows=True), stored) == (48, 0, 64, 8)
    # transposed: PL is 32 x 64, its first cell (8 x 16 pixels) is stored rows 0..16, cols 0..8
    assert grid_region(scores, Reorientation(transpose=True), stored) == (0, 0, 16, 8)
    # and the box covers exactly the pixels of that cell, whatever the orientation
    for reorientation in (Reorientation(flip_cols=True), Reorientation(True, True, True)):
        r0, c0, r1, c1 = grid_region(scores, reorientation, stored)
        pl = np.zeros(reorientation.output_shape(*stored), dtype=bool)
        pl[: pl.shape[0] // 4, : pl.shape[1] // 4] = True
        assert mask_box(reorientation.undo(pl)) == (r0, c0, r1, c1)


def test_a_grid_covering_part_of_the_slice_is_scaled_by_its_extent() -> None:
    scores = np.zeros((2, 2))
    scores[1, 1] = 1.0
    # 2 pooled cells of 3 patches each out of a 7-patch side: 6/7 of the slice
    assert grid_region(scores, Reorientation(), (70, 70), extent=6 / 7) == (30, 30, 60, 60)


def test_scores_that_are_not_a_square_grid_are_refused() -> None:
    with pytest.raises(ValueError, match="square grid"):
        grid_region(np.zeros(15), Reorientation(), (64, 64))
