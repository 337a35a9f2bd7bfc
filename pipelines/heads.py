"""Head packages: small classifiers on top of Curia's features, each with a card.

A head package is a folder with ``head.json`` (the card: what the head predicts, its classes
and the codes a report uses for them, how it pools and preprocesses) and ``head.safetensors``
(the weights). Cards are validated when loaded so a malformed package fails at start-up,
with the file and field named, not halfway through a study.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom.sr.codedict import codes
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.findings import CodeRef, HeadClass

CARD_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
WEIGHT_KEY = "classifier.weight"
BIAS_KEY = "classifier.bias"


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


class ClassCard(BaseModel):
    """One output class; the code is what the report states (None: text only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    code: CodeCard | None = None

    def to_head_class(self) -> HeadClass:
        return HeadClass(name=self.name, code=self.code.to_ref() if self.code else None)


class HeadCard(BaseModel):
    """What a head is: the contract between its weights and the reports it produces.

    ``clip_below_air`` is per head because Curia's image processor exists in versions that
    differ on it and a head must be fed the way it was trained.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: Literal["classification"]
    description: str = ""
    classes: list[ClassCard] = Field(min_length=2)
    pooling: Literal["mean_cls"] = "mean_cls"
    hidden_size: int = Field(gt=0)
    backbone: str = Field(min_length=1)
    clip_below_air: bool = False
    demo: bool = False

    @field_validator("classes")
    @classmethod
    def _unique_class_names(cls, classes: list[ClassCard]) -> list[ClassCard]:
        names = [c.name for c in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        return classes

    @property
    def head_classes(self) -> tuple[HeadClass, ...]:
        return tuple(c.to_head_class() for c in self.classes)


@dataclass
class Head:
    """A card and its linear layer (features -> class logits)."""

    card: HeadCard
    linear: nn.Linear

    def __post_init__(self) -> None:
        self.linear.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return self.card.name

    def check_hidden_size(self, hidden_size: int) -> None:
        """Refuse a backbone of a different width: the features would be meaningless here."""
        if hidden_size != self.card.hidden_size:
            raise HeadError(
                f"head {self.card.name!r} expects features of size {self.card.hidden_size} "
                f"(trained on {self.card.backbone}) but the backbone produces {hidden_size}"
            )

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, C) for features (N, hidden)."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, hidden), got {tuple(features.shape)}")
        self.check_hidden_size(features.shape[1])
        weight = self.linear.weight
        with torch.inference_mode():
            logits = self.linear(features.to(weight.device, weight.dtype))
            return torch.softmax(logits, dim=-1)


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


def _load_weights(path: Path, card: HeadCard) -> nn.Linear:
    if not path.is_file():
        raise HeadError(f"{path}: missing head weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise HeadError(f"{path}: cannot read head weights: {exc}") from exc
    expected = {
        WEIGHT_KEY: (len(card.classes), card.hidden_size),
        BIAS_KEY: (len(card.classes),),
    }
    if set(tensors) != set(expected):
        raise HeadError(
            f"{path}: tensors are {sorted(tensors)} but a linear head needs {sorted(expected)}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise HeadError(
                f"{path}: {key} has shape {list(tensors[key].shape)} but the card "
                f"({len(card.classes)} classes, hidden_size {card.hidden_size}) needs {list(shape)}"
            )
    linear = nn.Linear(card.hidden_size, len(card.classes))
    with torch.no_grad():
        linear.weight.copy_(tensors[WEIGHT_KEY].float())
        linear.bias.copy_(tensors[BIAS_KEY].float())
    return linear


def load_head(folder: Path) -> Head:
    """Load one head package (``head.json`` + ``head.safetensors``)."""
    folder = Path(folder)
    card = load_card(folder / CARD_FILE)
    return Head(card=card, linear=_load_weights(folder / WEIGHTS_FILE, card))


def save_head(head: Head, folder: Path) -> None:
    """Write a head package that :func:`load_head` reads back identically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        WEIGHT_KEY: head.linear.weight.detach().float().cpu().contiguous(),
        BIAS_KEY: head.linear.bias.detach().float().cpu().contiguous(),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
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


#: The demo head's classes: body regions from DICOM CID 4031 (Common Anatomic Regions).
DEMO_REGIONS = ("Head", "Neck", "Chest", "Abdomen", "Pelvis")


def _sct_class(attribute: str) -> ClassCard:
    code = getattr(codes.SCT, attribute)
    return ClassCard(
        name=attribute.lower(),
        code=CodeCard(value=code.value, scheme=code.scheme_designator, meaning=code.meaning),
    )


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
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(hidden_size, len(DEMO_REGIONS))
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    return Head(card=card, linear=linear)
