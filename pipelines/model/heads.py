"""Head packages: small classifiers on top of Curia's features, each with a card.

A head package is a folder with ``head.json`` (the card: what the head predicts, its classes
and the codes a report uses for them, how it pools and preprocesses) and ``head.safetensors``
(the weights). Cards are validated when loaded so a malformed package fails at start-up,
with the file and field named, not halfway through a study.

A package is read and written here; the card lives in :mod:`~pipelines.model.head_card`, the
runnable head (and how each pooling turns a series into one prediction) in
:mod:`~pipelines.model.classifier`, the attentive heads' probe in
:mod:`~pipelines.model.attention_probe`. This is where callers import the head API from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationError
from pydicom.sr.codedict import codes
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.model.attention_probe import AttentionBlock, AttentionProbe
from pipelines.model.classifier import Head, WindowPrediction, build_head_modules, init_probe_linear
from pipelines.model.head_card import (
    ATTENTION_PREFIX,
    BIAS_KEY,
    CARD_FILE,
    WEIGHT_KEY,
    WEIGHTS_FILE,
    AttentionCard,
    ClassCard,
    CodeCard,
    HeadCard,
    HeadError,
    ImportRecord,
    TrainingRecord,
    WindowCard,
)

__all__ = [
    "ATTENTION_PREFIX",
    "BIAS_KEY",
    "CARD_FILE",
    "DEMO_REGIONS",
    "WEIGHTS_FILE",
    "WEIGHT_KEY",
    "AttentionBlock",
    "AttentionCard",
    "ClassCard",
    "CodeCard",
    "Head",
    "HeadCard",
    "HeadError",
    "ImportRecord",
    "TrainingRecord",
    "WindowCard",
    "WindowPrediction",
    "build_head_modules",
    "demo_attentive_head",
    "demo_head",
    "expected_tensors",
    "head_tensors",
    "heads_for",
    "init_probe_linear",
    "load_card",
    "load_head",
    "load_heads",
    "save_head",
]

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
