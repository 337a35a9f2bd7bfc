"""Import Raidium's released head folders into the node's head packages.

Raidium publishes each benchmark head as a ``save_pretrained`` folder: ``config.json``
(``model_type: dinov2_custom_classifier``) and ``model.safetensors`` holding the classifier,
the optional attention probe and a full copy of the backbone under ``dino.``. The node keeps
the backbone once, in its weights folder, so an import keeps only the head, checks the copy
against a given backbone folder when asked, and records what it found on the card.

What the node cannot run the way the released code does is refused with the config field
named: a head must not silently compute something other than what it was trained on.

The config and its mapping onto the node's poolings live in
:mod:`~pipelines.model.raidium_config`, the folder's tensors in
:mod:`~pipelines.model.raidium_weights`; this module puts them together into a head package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch

from pipelines.findings import CodeRef
from pipelines.model.head_card import (
    ATTENTION_PREFIX,
    BIAS_KEY,
    WEIGHT_KEY,
    Aggregation,
    ClassCard,
    CodeCard,
    HeadCard,
    ImportRecord,
    SegmentRef,
)
from pipelines.model.heads import Head, build_head_modules, load_head, save_head
from pipelines.model.hf_folder import CONFIG_FILE
from pipelines.model.orientation import Plane
from pipelines.model.processor import ProcessorVariant
from pipelines.model.raidium_config import (
    CONFIG_FIELDS,
    HeadImportError,
    RaidiumConfig,
    SlicePooling,
    choose_2d_pooling,
    plan_pooling,
)
from pipelines.model.raidium_weights import (
    BACKBONE_PREFIX,
    check_backbone_copy,
    check_head_shapes,
    folder_digest,
    open_all,
    read_tensor,
    released_head_tensors,
    weight_files,
)

__all__ = ["IMPORT_FORMAT", "ClassSpec", "HeadImportError", "import_raidium_head"]

IMPORT_FORMAT: Final = "raidium-dinov2-classifier"

ClassSpec = tuple[str, CodeRef | CodeCard | None]


# --- reading the folder ------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HeadImportError(f"{path.parent}: missing {path.name}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadImportError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(value, dict):
        raise HeadImportError(f"{path}: expected a JSON object")
    return value


def _class_cards(classes: Sequence[ClassSpec]) -> list[ClassCard]:
    cards = []
    for name, code in classes:
        if isinstance(code, CodeRef):
            code = CodeCard.from_ref(code)
        cards.append(ClassCard(name=name, code=code))
    return cards


def _stacks_it_reads(
    planes: Sequence[Plane] | None, modalities: Sequence[str] | None, min_slices: int | None
) -> dict[str, Any]:
    """The card fields saying which stacks a head reads, for those that were given."""
    fields: dict[str, Any] = {}
    if planes is not None:
        fields["planes"] = list(dict.fromkeys(planes))
    if modalities is not None:
        fields["modalities"] = list(dict.fromkeys(m.strip().upper() for m in modalities))
    if min_slices is not None:
        fields["min_slices"] = min_slices
    return fields


def import_raidium_head(
    folder: Path,
    out_folder: Path,
    *,
    name: str,
    classes: Sequence[ClassSpec],
    version: str,
    backbone_name: str,
    backbone_folder: Path | None = None,
    description: str = "",
    clip_below_air: bool | None = None,
    unit: CodeRef | CodeCard | None = None,
    pooling: SlicePooling | None = None,
    aggregation: Aggregation | None = None,
    top_k: int | None = None,
    negative_class: str | None = None,
    mask_source: str | SegmentRef | None = None,
    processor: ProcessorVariant | None = None,
    final_norm: bool | None = None,
    planes: Sequence[Plane] | None = None,
    modalities: Sequence[str] | None = None,
    min_slices: int | None = None,
) -> Head:
    """Convert one released head folder into a node head package under ``out_folder``.

    ``classes`` are (name, code or None) in the head's output order: the released folders
    store no label names. A regression head (``regression: true``) takes one class, naming
    the quantity. ``backbone_folder``, when given, is compared tensor by tensor with the
    copy under ``dino.``; a mismatch is recorded (``imported.backbone_match`` false), not
    refused, since a site may deliberately run a head on a newer backbone.

    What the config cannot say is asked for: ``pooling`` of a 2D head (``slice``, the released
    per-slice forward, unless told ``mask`` or ``mean_cls``), its ``aggregation`` (max for a
    classifier, mean for a regression head unless given), the processor ``variant`` and
    ``clip_below_air`` (None: the backbone folder's ``preprocessor_config.json``), and the
    token source of a 3D head (``final_norm``; default the released forward's pre-norm).
    ``mask_source`` names the node mask head whose mask a ``mask`` head pools in, or that a
    3D head's window is centred on (lesion-centred), or a segment of the study's SEG or
    RTSTRUCT objects (:class:`~pipelines.model.head_card.SegmentRef`). ``planes``,
    ``modalities`` and ``min_slices`` say which stacks the head reads (None: the card's
    defaults, axial stacks of any modality).
    Returns the package as :func:`load_head` reads it back.
    """
    folder = Path(folder)
    source = str(folder)
    raw_config = _read_json(folder / CONFIG_FILE)
    config = RaidiumConfig.from_dict(raw_config, source)
    plan = choose_2d_pooling(plan_pooling(config, source), pooling, folder.name, source)
    if plan.pooling == "slice" and aggregation is None:
        aggregation = "mean" if config.regression else "max"
    if plan.pooling != "slice" and (aggregation or top_k or negative_class):
        raise HeadImportError(
            f"{source}: aggregation, top_k and negative_class are for per-slice heads; this "
            f"head is imported with pooling {plan.pooling!r}"
        )
    window = plan.window
    if window is None and final_norm is not None:
        raise HeadImportError(f"{source}: the token source is set for 3D (window) heads only")
    if window is not None and final_norm is not None:
        window = window.model_copy(update={"final_norm": final_norm})
    if window is not None and mask_source is not None:  # lesion-centred: on the mask
        window = window.model_copy(update={"selection": "mask"})
    if config.regression and config.num_classes != 1:
        raise HeadImportError(
            f"{source}: config field regression is true but num_classes is "
            f"{config.num_classes}; a regression head has one output"
        )
    if len(classes) != config.num_classes:
        raise HeadImportError(
            f"{source}: config field num_classes is {config.num_classes} but "
            f"{len(classes)} class names were given"
        )
    where = open_all(weight_files(folder))
    tensors = released_head_tensors(where, source)
    hidden = int(tensors[WEIGHT_KEY].shape[1])
    copy = check_backbone_copy(where, backbone_folder)
    if copy is not None and f"{BACKBONE_PREFIX}embeddings.cls_token" in where:
        width = int(read_tensor(where, f"{BACKBONE_PREFIX}embeddings.cls_token").shape[-1])
        if width != hidden:
            raise HeadImportError(
                f"{source}: classifier.weight takes {hidden} features but the backbone copy is "
                f"{width} wide"
            )
    notes = list(plan.notes)
    if copy is None:
        notes.append("no backbone copy under 'dino.' in the folder")
    elif copy.match is False:
        notes.append(f"backbone copy differs from {copy.checked_against}: {copy.mismatch}")
    try:
        card = HeadCard(
            name=name,
            version=version,
            task="regression" if config.regression else "classification",
            description=description
            or f"Imported from Raidium's released head {folder.name} ({config.model_name}).",
            classes=_class_cards(classes),
            pooling=plan.pooling,
            aggregation=aggregation,
            top_k=top_k,
            negative_class=negative_class,
            mask_source=mask_source,
            hidden_size=hidden,
            **_stacks_it_reads(planes, modalities, min_slices),
            backbone=backbone_name,
            clip_below_air=clip_below_air,
            processor=processor,
            attention=plan.attention,
            window=window,
            unit=CodeCard.from_ref(unit) if isinstance(unit, CodeRef) else unit,
            backbone_digest=folder_digest(Path(backbone_folder))
            if copy is not None and copy.match and backbone_folder is not None
            else "",
            imported=ImportRecord(
                format=IMPORT_FORMAT,
                source=folder.name,
                model_name=config.model_name,
                config={k: raw_config[k] for k in CONFIG_FIELDS if k in raw_config},
                backbone_copy=copy is not None,
                backbone_copy_digest=copy.digest if copy else "",
                backbone_match=copy.match if copy else None,
                backbone_checked_against=copy.checked_against if copy else "",
                notes=notes,
            ),
        )
    except ValueError as exc:
        raise HeadImportError(f"{source}: cannot describe this head: {exc}") from exc
    check_head_shapes(tensors, card, source)
    linear, probe = build_head_modules(card)
    with torch.no_grad():
        linear.weight.copy_(tensors[WEIGHT_KEY].float())
        linear.bias.copy_(tensors[BIAS_KEY].float())
        if probe is not None:
            probe.load_state_dict(
                {
                    k[len(ATTENTION_PREFIX) :]: v.float()
                    for k, v in tensors.items()
                    if k.startswith(ATTENTION_PREFIX)
                },
                strict=True,
            )
    save_head(Head(card=card, linear=linear, probe=probe), Path(out_folder))
    return load_head(Path(out_folder))
