"""Raidium's attention probe: the pooling of attentive (3D) heads over a window's tokens.

Self- and/or cross-attention blocks (``torch.nn.MultiheadAttention``, residual add,
post-LayerNorm, no MLP; the cross block attends from learned queries) over the window's slice
tokens plus a sinusoidal slice-position embedding; the output is averaged over the sequence.
Module and parameter names match what the node's head packages store.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.model.head_card import AttentionCard

#: Base of the sinusoidal slice-position embedding (as in Raidium's code and transformers).
POSITION_BASE = 10000.0


def slice_position_embedding(num_slices: int, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (num_slices, dim) of a slice's position in the window.

    sin on even dimensions, cos on odd ones, frequencies ``POSITION_BASE ** (-2i / dim)``:
    the transformer's original table, which Raidium adds to every token of slice ``i``.
    """
    position = torch.arange(num_slices, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(POSITION_BASE) / dim)
    )
    table = torch.zeros(num_slices, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class AttentionBlock(nn.Module):
    """Multi-head attention, residual add, post-LayerNorm; with learned queries when cross.

    Rows of zeros are padding: a real token never attends to padding, padding only to
    padding (so a padded row has no empty softmax), and the learned queries ignore it.
    The padding is found again from the input of every block, as the released code does.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_queries: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.learned_queries: nn.Parameter | None = None
        if num_queries is not None:
            self.learned_queries = nn.Parameter(torch.randn(num_queries, hidden_size))

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        real = (x != 0).any(dim=-1)  # (B, L)
        if self.learned_queries is None:
            query = x
            blocked = real.unsqueeze(1) ^ real.unsqueeze(2)  # exactly one of the pair is padding
        else:
            query = self.learned_queries.unsqueeze(0).expand(x.shape[0], -1, -1)
            blocked = (~real).unsqueeze(1).expand(-1, query.shape[1], -1)
        mask = blocked.repeat_interleave(self.num_heads, dim=0) if bool(blocked.any()) else None
        out, weights = self.attn(query, x, x, attn_mask=mask, need_weights=need_weights)
        return self.norm(query + out), weights


class AttentionProbe(nn.Module):
    """Raidium's attention module: the listed blocks in order, then the mean over the sequence.

    One self block and one cross block at most, each reused wherever its kind is listed.
    """

    def __init__(self, hidden_size: int, card: AttentionCard) -> None:
        super().__init__()
        self.self_attention: AttentionBlock | None = None
        self.cross_attention: AttentionBlock | None = None
        if "self" in card.blocks:
            self.self_attention = AttentionBlock(hidden_size, card.num_heads)
        if "cross" in card.blocks:
            self.cross_attention = AttentionBlock(
                hidden_size, card.num_heads, num_queries=card.num_queries
            )
        blocks = {"self": self.self_attention, "cross": self.cross_attention}
        # the same module object wherever its kind repeats (a plain list: not registered twice)
        self._order: list[tuple[str, AttentionBlock]] = [
            (kind, module) for kind in card.blocks if (module := blocks[kind]) is not None
        ]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, hidden) -> pooled (B, hidden), and the last cross block's attention (B, Q, L).

        Only the cross block's weights are materialised (Q x L, small); the self block runs
        without them so a long sequence takes the fused attention kernel.
        """
        cross_weights = None
        for kind, block in self._order:
            if kind == "self":
                x, _ = block(x)
            else:
                x, cross_weights = block(x, need_weights=True)
        return x.mean(dim=1), cross_weights
