"""Head packages: small classifiers on top of Curia's features, each with a card.

A head package is a folder with ``head.json`` (the card: what the head predicts, its classes
and the codes a report uses for them, how it pools and preprocesses) and ``head.safetensors``
(the weights). Cards are validated when loaded so a malformed package fails at start-up,
with the file and field named, not halfway through a study.

Three poolings turn a series into one prediction:

- ``mean_cls`` (default): the mean of the per-slice CLS tokens over the whole series, then
  the linear layer. What slice-level probes (Raidium's 2D heads) are applied with.
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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydicom.sr.codedict import codes
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.findings import CodeRef, HeadClass

CARD_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
WEIGHT_KEY = "classifier.weight"
BIAS_KEY = "classifier.bias"
#: Prefix of the attention probe's tensors in ``head.safetensors``.
ATTENTION_PREFIX = "attention."

#: Base of the sinusoidal slice-position embedding (as in Raidium's code and transformers).
POSITION_BASE = 10000.0

Task = Literal["classification", "regression"]
Pooling = Literal["mean_cls", "attentive", "mean_patch"]
WINDOW_POOLINGS = ("attentive", "mean_patch")


class HeadError(ValueError):
    """A head package the node cannot use; the message names the file and the problem."""


class CodeCard(BaseModel):
    """A coded concept in a card (value, coding scheme designator, code meaning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)

    def to_ref(self) -> CodeRef:
        return CodeRef(value=self.value, scheme=self.scheme, meaning=self.meaning)

    @classmethod
    def from_ref(cls, ref: CodeRef) -> CodeCard:
        return cls(value=ref.value, scheme=ref.scheme, meaning=ref.meaning)


class ClassCard(BaseModel):
    """One output class; the code is what the report states (None: text only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    code: CodeCard | None = None

    def to_head_class(self) -> HeadClass:
        return HeadClass(name=self.name, code=self.code.to_ref() if self.code else None)


class AttentionCard(BaseModel):
    """Raidium's ``attention_cfg``: heads per attention block, learned queries, block order.

    A kind listed twice reuses the same block (same weights), as in the released code.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_heads: int = Field(1, ge=1)
    num_queries: int = Field(1, ge=1)
    blocks: list[Literal["self", "cross"]] = Field(
        default_factory=lambda: ["self", "cross"], min_length=1
    )


class WindowCard(BaseModel):
    """Which slices a window head sees and which of their tokens.

    ``num_slices`` None means every slice of the series. ``selection`` ``centre`` takes
    ``num_slices`` consecutive slices centred on slice ``n // 2`` (the released model's
    forward); ``even`` spreads them evenly over the series, rounding to the nearest slice
    (like the newer image processor's ``num_slices`` sampling, whose exact rounding is not
    published). A series with no more slices than the window
    is used whole. ``tokens`` ``patch`` keeps every patch token of a slice (average-pooled
    over ``kernel_size`` x ``kernel_size`` patches when set, with the slice's CLS token in
    front when ``class_token``); ``slice_mean`` keeps one mean patch token per slice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_slices: int | None = Field(None, ge=1)
    selection: Literal["centre", "even"] = "centre"
    tokens: Literal["patch", "slice_mean"] = "patch"
    kernel_size: int | None = Field(None, ge=1)
    class_token: bool = False
    final_norm: bool = False

    @field_validator("kernel_size", "class_token")
    @classmethod
    def _patch_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("tokens") == "slice_mean":
            raise ValueError(f"{info.field_name} applies to tokens 'patch' only")
        return value


class TrainingRecord(BaseModel):
    """How a head was trained here and how well it did (cross-validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series: int = Field(ge=1)
    folds: int = Field(ge=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, description="base rate, scaled by batch size / 256")
    seed: int = 0
    class_counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    metrics_std: dict[str, float | None] = Field(default_factory=dict)
    data: str = ""
    trained_at: str = ""


class ImportRecord(BaseModel):
    """Where an imported head came from, and what the node made of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["raidium-dinov2-classifier"]
    source: str
    model_name: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    backbone_copy: bool = False
    backbone_copy_digest: str = ""
    backbone_match: bool | None = None
    backbone_checked_against: str = ""
    notes: list[str] = Field(default_factory=list)


class HeadCard(BaseModel):
    """What a head is: the contract between its weights and the reports it produces.

    ``clip_below_air`` is per head because Curia's image processor exists in versions that
    differ on it and a head must be fed the way it was trained.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: Task
    description: str = ""
    classes: list[ClassCard] = Field(min_length=1)
    pooling: Pooling = "mean_cls"
    hidden_size: int = Field(gt=0)
    backbone: str = Field(min_length=1)
    clip_below_air: bool = False
    demo: bool = False
    modalities: list[str] = Field(
        default_factory=list, description="series modalities it applies to; empty = any"
    )
    attention: AttentionCard | None = Field(None, validate_default=True)
    window: WindowCard | None = Field(None, validate_default=True)
    unit: CodeCard | None = Field(None, description="regression only: UCUM unit of the value")
    backbone_digest: str = Field("", description="weights digest of the backbone trained on")
    training: TrainingRecord | None = None
    imported: ImportRecord | None = None

    @field_validator("classes")
    @classmethod
    def _classes_fit_the_task(
        cls, classes: list[ClassCard], info: ValidationInfo
    ) -> list[ClassCard]:
        names = [c.name for c in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        task = info.data.get("task")
        if task == "classification" and len(classes) < 2:
            raise ValueError("a classification head needs at least 2 classes")
        if task == "regression" and len(classes) != 1:
            raise ValueError("a regression head has exactly 1 class: the quantity it estimates")
        return classes

    @field_validator("attention")
    @classmethod
    def _attention_fits_pooling(
        cls, attention: AttentionCard | None, info: ValidationInfo
    ) -> AttentionCard | None:
        pooling = info.data.get("pooling")
        if pooling == "attentive" and attention is None:
            raise ValueError("pooling 'attentive' needs an attention section")
        if pooling != "attentive" and attention is not None:
            raise ValueError(f"pooling {pooling!r} has no attention probe: remove the section")
        hidden = info.data.get("hidden_size")
        if attention is not None and hidden and hidden % attention.num_heads:
            raise ValueError(
                f"num_heads {attention.num_heads} does not divide hidden_size {hidden}"
            )
        return attention

    @field_validator("window")
    @classmethod
    def _window_fits_pooling(
        cls, window: WindowCard | None, info: ValidationInfo
    ) -> WindowCard | None:
        pooling = info.data.get("pooling")
        if pooling in WINDOW_POOLINGS and window is None:
            raise ValueError(f"pooling {pooling!r} needs a window section")
        if pooling == "mean_cls" and window is not None:
            raise ValueError("pooling 'mean_cls' uses every slice: remove the window section")
        plain = window is None or (
            window.tokens == "patch" and not window.kernel_size and not window.class_token
        )
        if pooling == "mean_patch" and not plain:
            raise ValueError(
                "pooling 'mean_patch' averages plain patch tokens: tokens must be 'patch', "
                "without kernel_size or class_token"
            )
        return window

    @field_validator("unit")
    @classmethod
    def _unit_for_regression(cls, unit: CodeCard | None, info: ValidationInfo) -> CodeCard | None:
        if unit is not None and info.data.get("task") != "regression":
            raise ValueError("only a regression head has a unit")
        return unit

    @property
    def head_classes(self) -> tuple[HeadClass, ...]:
        return tuple(c.to_head_class() for c in self.classes)

    @property
    def num_outputs(self) -> int:
        """Width of the linear layer: one logit per class, one value for regression."""
        return len(self.classes)


# --- Raidium's attention probe -----------------------------------------------------------


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

    def window_indices(self, slice_count: int) -> list[int]:
        """Positions (in the sorted series) of the slices this window head reads, in order."""
        window = self._window()
        size = window.num_slices
        if size is None or slice_count <= size:
            return list(range(slice_count))
        if window.selection == "even":
            spaced = torch.linspace(0, slice_count - 1, size).round().long()
            return [int(i) for i in spaced]
        start = slice_count // 2 - size // 2
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


# --- reading and writing packages --------------------------------------------------------


def _format_validation(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(card)"
        parts.append(f"field {where!r}: {item['msg']}")
    return "; ".join(parts)


def load_card(path: Path) -> HeadCard:
    """Parse and validate a ``head.json``; errors name the file and every bad field."""
    if not path.is_file():
        raise HeadError(f"{path}: missing head card")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadError(f"{path}: cannot read head card: {exc}") from exc
    try:
        return HeadCard.model_validate(raw)
    except ValidationError as exc:
        raise HeadError(f"{path}: invalid head card: {_format_validation(exc)}") from exc


def build_head_modules(card: HeadCard) -> tuple[nn.Linear, AttentionProbe | None]:
    """Freshly initialised modules of the shapes a card describes (weights to be loaded)."""
    linear = nn.Linear(card.hidden_size, card.num_outputs)
    probe = None
    if card.attention is not None:
        probe = AttentionProbe(card.hidden_size, card.attention)
    return linear, probe


def expected_tensors(card: HeadCard) -> dict[str, tuple[int, ...]]:
    """Every tensor a package of this card holds, with its shape."""
    linear, probe = build_head_modules(card)
    shapes = {
        WEIGHT_KEY: tuple(linear.weight.shape),
        BIAS_KEY: tuple(linear.bias.shape),
    }
    if probe is not None:
        for key, value in probe.state_dict().items():
            shapes[ATTENTION_PREFIX + key] = tuple(value.shape)
    return shapes


def _load_weights(path: Path, card: HeadCard) -> tuple[nn.Linear, AttentionProbe | None]:
    if not path.is_file():
        raise HeadError(f"{path}: missing head weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise HeadError(f"{path}: cannot read head weights: {exc}") from exc
    expected = expected_tensors(card)
    if set(tensors) != set(expected):
        kind = "an attentive head" if card.pooling == "attentive" else "a linear head"
        raise HeadError(
            f"{path}: tensors are {sorted(tensors)} but {kind} needs {sorted(expected)}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise HeadError(
                f"{path}: {key} has shape {list(tensors[key].shape)} but the card "
                f"({len(card.classes)} classes, hidden_size {card.hidden_size}) needs {list(shape)}"
            )
    linear, probe = build_head_modules(card)
    with torch.no_grad():
        linear.weight.copy_(tensors[WEIGHT_KEY].float())
        linear.bias.copy_(tensors[BIAS_KEY].float())
    if probe is not None:
        state = {
            key[len(ATTENTION_PREFIX) :]: value.float()
            for key, value in tensors.items()
            if key.startswith(ATTENTION_PREFIX)
        }
        probe.load_state_dict(state, strict=True)
    return linear, probe


def load_head(folder: Path) -> Head:
    """Load one head package (``head.json`` + ``head.safetensors``)."""
    folder = Path(folder)
    card = load_card(folder / CARD_FILE)
    linear, probe = _load_weights(folder / WEIGHTS_FILE, card)
    return Head(card=card, linear=linear, probe=probe)


def head_tensors(head: Head) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_head` writes, by their names in ``head.safetensors``."""
    tensors = {
        WEIGHT_KEY: head.linear.weight.detach().float().cpu().contiguous(),
        BIAS_KEY: head.linear.bias.detach().float().cpu().contiguous(),
    }
    if head.probe is not None:
        for key, value in head.probe.state_dict().items():
            tensors[ATTENTION_PREFIX + key] = value.detach().float().cpu().contiguous()
    return tensors


def save_head(head: Head, folder: Path) -> None:
    """Write a head package that :func:`load_head` reads back identically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(head_tensors(head), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    card = head.card.model_dump_json(indent=2)
    (folder / CARD_FILE).write_text(card + "\n", encoding="utf-8")


def load_heads(root: Path) -> dict[str, Head]:
    """Every head package under ``root`` (one per subfolder holding a ``head.json``), by name."""
    root = Path(root)
    if not root.is_dir():
        raise HeadError(f"{root}: heads folder does not exist")
    heads: dict[str, Head] = {}
    for folder in sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file()):
        head = load_head(folder)
        if head.name in heads:
            raise HeadError(f"{folder}: a second head is named {head.name!r}")
        heads[head.name] = head
    return heads


# --- demo heads --------------------------------------------------------------------------

#: The demo head's classes: body regions from DICOM CID 4031 (Common Anatomic Regions).
DEMO_REGIONS = ("Head", "Neck", "Chest", "Abdomen", "Pelvis")


def _sct_class(attribute: str) -> ClassCard:
    code = getattr(codes.SCT, attribute)
    return ClassCard(
        name=attribute.lower(),
        code=CodeCard(value=code.value, scheme=code.scheme_designator, meaning=code.meaning),
    )


def init_probe_linear(linear: nn.Linear, generator: torch.Generator | None = None) -> None:
    """Raidium's probe initialisation: weights N(0, 0.01), bias zero."""
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()


def demo_head(hidden_size: int, seed: int = 0, backbone: str = "Curia-B") -> Head:
    """A built-in, untrained body-region head for trying the node end to end.

    Its weights are random (N(0, 0.01), Raidium's probe init), so its answers mean nothing;
    the card says demo and every finding it produces is flagged.
    """
    card = HeadCard(
        name="body-region",
        version="0.1.0-demo",
        task="classification",
        description="Demo body-region classifier with random weights: not a real prediction.",
        classes=[_sct_class(region) for region in DEMO_REGIONS],
        hidden_size=hidden_size,
        backbone=backbone,
        demo=True,
    )
    linear = nn.Linear(hidden_size, len(DEMO_REGIONS))
    init_probe_linear(linear, torch.Generator().manual_seed(seed))
    return Head(card=card, linear=linear)


def demo_attentive_head(
    hidden_size: int,
    seed: int = 0,
    backbone: str = "Curia-B",
    *,
    num_slices: int | None = 5,
    tokens: Literal["patch", "slice_mean"] = "patch",
    attention: AttentionCard | None = None,
) -> Head:
    """A random attentive body-region head (Raidium's 3D layout), flagged demo.

    For exercising the window path (tests, benchmarks); its answers mean nothing.
    """
    card = HeadCard(
        name="body-region-3d",
        version="0.1.0-demo",
        task="classification",
        description="Demo attentive body-region classifier with random weights.",
        classes=[_sct_class(region) for region in DEMO_REGIONS],
        pooling="attentive",
        hidden_size=hidden_size,
        backbone=backbone,
        demo=True,
        attention=attention or AttentionCard(),
        window=WindowCard(num_slices=num_slices, tokens=tokens),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear, probe = build_head_modules(card)
        init_probe_linear(linear)
    return Head(card=card, linear=linear, probe=probe)


def heads_for(heads: Sequence[Head], modality: str | None) -> list[Head]:
    """The heads whose card says they apply to a series of ``modality`` (empty = any)."""
    return [
        head
        for head in heads
        if not head.card.modalities or (modality or "").upper() in head.card.modalities
    ]
