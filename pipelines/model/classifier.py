"""The runnable head: a card's linear layer, and its attention probe when attentive.

The poolings that turn a series into one prediction:

- ``slice``: the linear layer on every slice's final-norm CLS token (Raidium's 2D heads, which
  are per-slice classifiers), the per-slice scores aggregated by the card's rule (max, mean,
  top-k mean; see :mod:`~pipelines.model.pooling`); the key slice is the best-scoring slice.
- ``mean_cls`` (``series_mean_cls``): the mean of the per-slice CLS tokens over the whole
  series, then the linear layer: for heads trained on series-mean features (the node's
  ``heads train`` probes), not for Raidium's per-slice heads.
- ``mask``: the mean of the final-norm patch tokens inside a region mask; without a mask the
  head does not run ("not analysed: no mask").
- ``attentive``: Raidium's attention probe for 3D heads. A window of slices around the
  centre slice; per slice its patch tokens (or their mean, optionally with the CLS token),
  plus a sinusoidal slice-position embedding; self- and/or cross-attention blocks
  (``torch.nn.MultiheadAttention``, residual add, post-LayerNorm, no MLP; the cross block
  attends from learned queries); the output is averaged over the sequence, then the linear
  layer.
- ``mean_patch``: the mean of the patch tokens over the window, then the linear layer
  (Raidium's ``use_avgpool_on_the_volume`` without attention).

Window heads read the tokens of the last block *before* the backbone's final LayerNorm, as
the released modelling code does (``hidden_states[-1]``); ``window.final_norm`` switches to
the normed tokens for heads trained on those.

``task`` is ``classification`` (softmax over the classes) or ``regression`` (one class
naming the quantity, a raw value out, no softmax). For a regression head the finding's
``probabilities`` holds that raw value, not a probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.model.attention_probe import AttentionProbe, slice_position_embedding
from pipelines.model.head_card import (
    WINDOW_POOLINGS,
    HeadCard,
    HeadError,
    WindowCard,
)

# --- heads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPrediction:
    """A window head's output for one series, and the window slice it leaned on most."""

    outputs: torch.Tensor  # (C,): probabilities, or the raw value for regression
    key_position: int | None  # index into the window, None when nothing singles one out
    # per spatial token of the key slice (row-major grid, CLS dropped): how much each drove
    # the prediction; None when the head keeps no spatial tokens
    key_scores: torch.Tensor | None = None


@dataclass
class Head:
    """A card, its linear layer (features -> class logits) and, when attentive, its probe."""

    card: HeadCard
    linear: nn.Linear
    probe: AttentionProbe | None = None

    def __post_init__(self) -> None:
        self.linear.eval().requires_grad_(False)
        if self.probe is not None:
            self.probe.eval().requires_grad_(False)
        if (self.probe is not None) != (self.card.pooling == "attentive"):
            raise HeadError(
                f"head {self.card.name!r}: pooling {self.card.pooling!r} "
                + ("needs an attention probe" if self.probe is None else "takes no probe")
            )

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def centred_on_mask(self) -> bool:
        """True for a window head whose window is centred on a mask (a lesion-centred head)."""
        return self.card.window is not None and self.card.window.selection == "mask"

    @property
    def uses_window(self) -> bool:
        """True when the head reads slice tokens in a window rather than the mean CLS."""
        return self.card.pooling in WINDOW_POOLINGS

    def to(self, device: torch.device | str) -> Head:
        """Move the weights (e.g. an attentive probe next to the backbone on the GPU)."""
        self.linear.to(device)
        if self.probe is not None:
            self.probe.to(device)
        return self

    def check_hidden_size(self, hidden_size: int) -> None:
        """Refuse a backbone of a different width: the features would be meaningless here."""
        if hidden_size != self.card.hidden_size:
            raise HeadError(
                f"head {self.card.name!r} expects features of size {self.card.hidden_size} "
                f"(trained on {self.card.backbone}) but the backbone produces {hidden_size}"
            )

    def _outputs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.card.task == "regression":
            return logits
        return torch.softmax(logits, dim=-1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Outputs (N, C) for pooled features (N, hidden): softmax probabilities, or raw values.

        Attentive heads pool slice tokens themselves: use :meth:`predict_window`.
        """
        if self.card.pooling == "attentive":
            raise HeadError(
                f"head {self.card.name!r} pools slice tokens with attention: "
                "use predict_window on its window's tokens"
            )
        if features.ndim != 2:
            raise ValueError(f"features must be (N, hidden), got {tuple(features.shape)}")
        self.check_hidden_size(features.shape[1])
        weight = self.linear.weight
        with torch.inference_mode():
            return self._outputs(self.linear(features.to(weight.device, weight.dtype)))

    # -- window heads: per-slice token reduction (streamed), then the pooled prediction --

    def window_indices(self, slice_count: int, centre: int | None = None) -> list[int]:
        """Positions (in the sorted series) of the slices this window head reads, in order.

        ``centre`` is the slice a ``centre`` or ``mask`` window is centred on (default: the
        middle slice; for ``mask``, the median masked slice).
        """
        window = self._window()
        size = window.num_slices
        if size is None:
            return list(range(slice_count))
        if window.selection == "even":
            if slice_count < size:  # the processor pads by repeating the last slice
                return list(range(slice_count)) + [slice_count - 1] * (size - slice_count)
            # truncated, not rounded, as the processor's integer cast of its linspace
            return [int(i) for i in np.linspace(0, slice_count - 1, size).astype(np.int64)]
        if slice_count <= size:
            return list(range(slice_count))
        middle = slice_count // 2 if centre is None else centre
        start = min(max(middle - size // 2, 0), slice_count - size)
        return list(range(start, start + size))

    def slice_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reduce one batch of slices' tokens (N, 1 + patches, hidden) to what the head keeps.

        Returns (N, t, hidden): the patch tokens (kernel-pooled, CLS in front if asked), or
        one mean patch token per slice. Done chunk by chunk while the series streams, so
        only the reduced tokens of window slices stay in memory.
        """
        window = self._window()
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be (N, 1 + patches, hidden), got {tuple(tokens.shape)}")
        self.check_hidden_size(tokens.shape[-1])
        cls, patches = tokens[:, :1], tokens[:, 1:]
        if self.card.pooling == "mean_patch" or window.tokens == "slice_mean":
            return patches.mean(dim=1, keepdim=True)
        if window.kernel_size is not None:
            patches = _pool_patch_grid(patches, window.kernel_size)
        if window.class_token:
            patches = torch.cat([cls, patches], dim=1)
        return patches

    def tokens_per_slice(self, num_patches: int) -> int:
        """How many tokens :meth:`slice_tokens` keeps per slice (to size memory up front)."""
        window = self._window()
        if self.card.pooling == "mean_patch" or window.tokens == "slice_mean":
            return 1
        count = num_patches
        if window.kernel_size is not None:
            count = (math.isqrt(num_patches) // window.kernel_size) ** 2
        return count + int(window.class_token)

    def predict_window(self, per_slice: torch.Tensor) -> WindowPrediction:
        """The prediction from the window's reduced tokens (W, t, hidden), in window order."""
        self._window()
        if per_slice.ndim != 3 or per_slice.shape[0] < 1:
            raise ValueError(f"window tokens must be (W, t, hidden), got {tuple(per_slice.shape)}")
        self.check_hidden_size(per_slice.shape[-1])
        weight = self.linear.weight
        x = per_slice.to(weight.device, torch.float32)
        count, per, hidden = x.shape
        with torch.inference_mode():
            if self.probe is None:  # mean_patch: no position embedding, plain mean
                outputs = self._outputs(self.linear(x.mean(dim=(0, 1))))
                if self.card.task != "classification":
                    return WindowPrediction(outputs=outputs.cpu(), key_position=None)
                predicted = int(torch.argmax(outputs))
                scores = self._outputs(self.linear(x.mean(dim=1)))
                key = int(torch.argmax(scores[:, predicted]))
                # the series logit is the mean of the patch logits: each patch's share
                patch_logits = self.linear(x[key])[:, predicted]
                return WindowPrediction(
                    outputs=outputs.cpu(), key_position=key, key_scores=patch_logits.cpu()
                )
            x = x + slice_position_embedding(count, hidden).to(x.device).unsqueeze(1)
            pooled, weights = self.probe(x.reshape(1, count * per, hidden))
            outputs = self._outputs(self.linear(pooled))[0]
        if weights is None:
            return WindowPrediction(outputs=outputs.cpu(), key_position=count // 2)
        attention = weights[0].sum(dim=0).reshape(count, per)
        key = int(torch.argmax(attention.sum(dim=1)))
        spatial = attention[key, int(self._window().class_token) :]
        return WindowPrediction(
            outputs=outputs.cpu(),
            key_position=key,
            key_scores=spatial.cpu() if self._window().tokens == "patch" else None,
        )

    def _window(self) -> WindowCard:
        if self.card.window is None:
            raise HeadError(f"head {self.card.name!r} pools mean CLS features, not a window")
        return self.card.window


def _pool_patch_grid(patches: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool the square patch grid (N, P, D) with a kernel x kernel window, stride kernel."""
    n, count, dim = patches.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    grid = patches.transpose(1, 2).reshape(n, dim, side, side)
    pooled = nn.functional.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
    return pooled.flatten(2).transpose(1, 2)


def build_head_modules(card: HeadCard) -> tuple[nn.Linear, AttentionProbe | None]:
    """Freshly initialised modules of the shapes a card describes (weights to be loaded)."""
    linear = nn.Linear(card.hidden_size, card.num_outputs)
    probe = None
    if card.attention is not None:
        probe = AttentionProbe(card.hidden_size, card.attention)
    return linear, probe


def init_probe_linear(linear: nn.Linear, generator: torch.Generator | None = None) -> None:
    """Raidium's probe initialisation: weights N(0, 0.01), bias zero."""
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
