"""Import Raidium's released head folders into the node's head packages.

Raidium publishes each benchmark head as a ``save_pretrained`` folder: ``config.json``
(``model_type: dinov2_custom_classifier``) and ``model.safetensors`` holding the classifier,
the optional attention probe and a full copy of the backbone under ``dino.``. The node keeps
the backbone once, in its weights folder, so an import keeps only the head, checks the copy
against a given backbone folder when asked, and records what it found on the card.

What the node cannot run the way the released code does is refused with the config field
named: a head must not silently compute something other than what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pipelines.findings import CodeRef
from pipelines.model.backbone import (
    CONFIG_FILE,
    IGNORED_HF_KEYS,
    WeightsError,
)
from pipelines.model.backbone import weight_files as backbone_weight_files
from pipelines.model.heads import (
    ATTENTION_PREFIX,
    BIAS_KEY,
    WEIGHT_KEY,
    AttentionCard,
    ClassCard,
    CodeCard,
    Head,
    HeadCard,
    HeadError,
    ImportRecord,
    WindowCard,
    build_head_modules,
    expected_tensors,
    load_head,
    save_head,
)

RAIDIUM_MODEL_TYPE = "dinov2_custom_classifier"
IMPORT_FORMAT = "raidium-dinov2-classifier"
BACKBONE_PREFIX = "dino."
RAIDIUM_CLASSIFIER_PREFIX = "classifier."
RAIDIUM_ATTENTION_PREFIX = "attention_module."

#: Raidium's attention tensor names -> the node's (``attention.`` + probe state key).
_ATTENTION_RENAMES = {
    "self_attention.attention.multihead_attn.": "self_attention.attn.",
    "self_attention.attention.norm.": "self_attention.norm.",
    "cross_attention.attention.multihead_attn.": "cross_attention.attn.",
    "cross_attention.attention.norm.": "cross_attention.norm.",
    "cross_attention.learned_queries": "cross_attention.learned_queries",
}

#: The config fields the import reads (kept verbatim on the card for audit).
CONFIG_FIELDS = (
    "model_name",
    "num_classes",
    "num_slices",
    "kernel_size",
    "use_n_blocks",
    "use_class_token",
    "use_avgpool_per_slice",
    "use_avgpool_on_the_volume",
    "attention_cfg",
    "regression",
)

ClassSpec = tuple[str, CodeRef | CodeCard | None]


class HeadImportError(HeadError):
    """A released head folder the node cannot run; the message names the field or tensor."""


@dataclass(frozen=True)
class RaidiumConfig:
    """The fields of a ``dinov2_custom_classifier`` config, with Raidium's defaults."""

    model_name: str
    num_classes: int
    num_slices: int | None
    kernel_size: int | None
    use_n_blocks: int
    use_class_token: bool
    use_avgpool_per_slice: bool
    use_avgpool_on_the_volume: bool
    attention_cfg: dict[str, Any] | None
    regression: bool

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> RaidiumConfig:
        model_type = raw.get("model_type")
        if model_type != RAIDIUM_MODEL_TYPE:
            raise HeadImportError(
                f"{source}: config field model_type is {model_type!r}, expected "
                f"{RAIDIUM_MODEL_TYPE!r} (a Raidium head folder)"
            )

        def optional_int(name: str) -> int | None:
            value = raw.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HeadImportError(
                    f"{source}: config field {name} is {value!r}, expected a positive int or null"
                )
            return value

        def flag(name: str) -> bool:
            value = raw.get(name, False)
            if not isinstance(value, bool):
                raise HeadImportError(f"{source}: config field {name} is {value!r}, expected bool")
            return value

        attention = raw.get("attention_cfg")
        if attention is not None and not isinstance(attention, dict):
            raise HeadImportError(
                f"{source}: config field attention_cfg is {attention!r}, expected an object"
            )
        num_classes = optional_int("num_classes")
        return cls(
            model_name=str(raw.get("model_name") or ""),
            num_classes=2 if num_classes is None else num_classes,
            num_slices=optional_int("num_slices"),
            kernel_size=optional_int("kernel_size"),
            use_n_blocks=optional_int("use_n_blocks") or 1,
            use_class_token=flag("use_class_token"),
            use_avgpool_per_slice=flag("use_avgpool_per_slice"),
            use_avgpool_on_the_volume=flag("use_avgpool_on_the_volume"),
            attention_cfg=attention,
            regression=flag("regression"),
        )


@dataclass(frozen=True)
class _Pooling:
    """What the node makes of a config: pooling, attention, window, and why."""

    pooling: str
    attention: AttentionCard | None
    window: WindowCard | None
    notes: tuple[str, ...]


def _attention_card(cfg: dict[str, Any], source: str) -> AttentionCard:
    unknown = sorted(set(cfg) - {"num_heads", "num_queries", "block"})
    if unknown:
        raise HeadImportError(
            f"{source}: config field attention_cfg has keys {unknown} the released code ignores; "
            "refusing rather than guessing what they meant"
        )
    try:
        return AttentionCard(
            num_heads=cfg.get("num_heads", 1),
            num_queries=cfg.get("num_queries", 1),
            blocks=list(cfg.get("block", ["self", "cross"])),
        )
    except ValueError as exc:
        raise HeadImportError(f"{source}: config field attention_cfg is invalid: {exc}") from exc


def plan_pooling(config: RaidiumConfig, source: str) -> _Pooling:
    """Map a released config onto the node's poolings, refusing what has no faithful match.

    The released forward on a volume (no mask): tokens of the last block for a window of
    ``num_slices`` slices around the centre; per slice all patch tokens (``kernel_size``
    pools them, ``use_class_token`` adds the CLS token), or their mean
    (``use_avgpool_per_slice``), or one mean over the window (``use_avgpool_on_the_volume``);
    then the attention probe when ``attention_cfg`` is set, then the classifier.
    """
    if config.use_n_blocks != 1:
        raise HeadImportError(
            f"{source}: config field use_n_blocks is {config.use_n_blocks}: the tokens of the "
            f"last {config.use_n_blocks} blocks concatenated are {config.use_n_blocks} x hidden "
            "wide, but the released classifier takes hidden inputs; the node runs "
            "use_n_blocks 1 only"
        )
    per_slice, volume = config.use_avgpool_per_slice, config.use_avgpool_on_the_volume
    notes: list[str] = []
    if config.use_class_token and (per_slice or volume):
        field = "use_avgpool_per_slice" if per_slice else "use_avgpool_on_the_volume"
        raise HeadImportError(
            f"{source}: config field use_class_token is true with {field}: the released code "
            "then concatenates the CLS token on the feature axis (2 x hidden), which its "
            "classifier cannot take"
        )
    if per_slice and volume:
        notes.append("use_avgpool_on_the_volume ignored: use_avgpool_per_slice takes precedence")
        volume = False
    kernel = config.kernel_size
    if kernel is not None and (per_slice or volume):
        notes.append("kernel_size ignored: the released code pools per slice or per volume")
        kernel = None

    if config.attention_cfg is not None:
        if volume:
            raise HeadImportError(
                f"{source}: config field use_avgpool_on_the_volume is true with attention_cfg: "
                "one mean token per volume gives the attention module nothing to attend over "
                "(the released code fails on it)"
            )
        window = WindowCard(
            num_slices=config.num_slices,
            tokens="slice_mean" if per_slice else "patch",
            kernel_size=kernel,
            class_token=config.use_class_token,
        )
        attention = _attention_card(config.attention_cfg, source)
        return _Pooling("attentive", attention, window, tuple(notes))
    if volume:
        window = WindowCard(num_slices=config.num_slices)
        return _Pooling("mean_patch", None, window, tuple(notes))
    if per_slice:
        raise HeadImportError(
            f"{source}: config field use_avgpool_per_slice is true without attention_cfg: the "
            "released classifier then scores every slice separately, with no series prediction"
        )
    ignored = [
        name
        for name, value in (
            ("num_slices", config.num_slices),
            ("kernel_size", config.kernel_size),
            ("use_class_token", config.use_class_token),
        )
        if value
    ]
    notes.append(
        "slice-level head (classifier on the CLS token): the node applies it to the mean CLS "
        "feature of the series"
        + (f"; {', '.join(ignored)} only affect the 3D path and are ignored" if ignored else "")
    )
    return _Pooling("mean_cls", None, None, tuple(notes))


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


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards its index lists (the backbone loader's rule)."""
    try:
        return backbone_weight_files(folder)
    except WeightsError as exc:
        raise HeadImportError(str(exc)) from exc


def _open_all(files: list[Path]) -> dict[str, Path]:
    """Every tensor name in the files, with the file holding it."""
    where: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    where[key] = path
        except (OSError, SafetensorError) as exc:
            raise HeadImportError(f"{path}: cannot read weights: {exc}") from exc
    return where


def _get(where: Mapping[str, Path], key: str) -> torch.Tensor:
    with safe_open(str(where[key]), framework="pt") as fh:
        return fh.get_tensor(key)


def _tensor_digest(digest: Any, key: str, tensor: torch.Tensor) -> None:
    digest.update(key.encode())
    digest.update(str(tensor.dtype).encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


@dataclass(frozen=True)
class BackboneCopy:
    """The ``dino.`` tensors of a released head: how many, their digest, match or not."""

    tensors: int
    digest: str
    match: bool | None
    checked_against: str
    mismatch: str


def _check_backbone_copy(
    where: Mapping[str, Path], backbone_folder: Path | None
) -> BackboneCopy | None:
    """Digest the copy tensor by tensor; compare it with ``backbone_folder`` when given.

    One tensor at a time, so a ViT-L copy is never held twice in memory. Values are compared
    in float32 (a copy saved in another precision still matches when its values do).
    """
    keys = sorted(k for k in where if k.startswith(BACKBONE_PREFIX))
    if not keys:
        return None
    reference: dict[str, Path] | None = None
    if backbone_folder is not None:
        reference = _open_all(weight_files(Path(backbone_folder)))
    digest = hashlib.sha256()
    problems: list[str] = []
    for key in keys:
        tensor = _get(where, key)
        _tensor_digest(digest, key, tensor)
        name = key[len(BACKBONE_PREFIX) :]
        if reference is None or name in IGNORED_HF_KEYS:
            continue
        if name not in reference:
            problems.append(f"{name} not in the backbone folder")
            continue
        other = _get(reference, name)
        if other.shape != tensor.shape or not torch.equal(other.float(), tensor.float()):
            problems.append(f"{name} differs")
    if reference is not None:
        names = {k[len(BACKBONE_PREFIX) :] for k in keys}
        problems += [
            f"{k} missing from the copy"
            for k in sorted(set(reference) - names)
            if k not in IGNORED_HF_KEYS
        ]
    return BackboneCopy(
        tensors=len(keys),
        digest=digest.hexdigest(),
        match=None if reference is None else not problems,
        checked_against=str(backbone_folder) if backbone_folder is not None else "",
        mismatch="; ".join(problems[:5])
        + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""),
    )


def _folder_digest(folder: Path) -> str:
    """sha256 of a backbone folder's weight files: the node's weights_digest for it."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _head_tensors(where: Mapping[str, Path], source: str) -> dict[str, torch.Tensor]:
    """The classifier and probe tensors under the node's names; anything else is refused."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in where:
        if key.startswith(BACKBONE_PREFIX):
            continue
        if key.startswith(RAIDIUM_CLASSIFIER_PREFIX):
            out[key] = _get(where, key)
        elif key.startswith(RAIDIUM_ATTENTION_PREFIX):
            rest = key[len(RAIDIUM_ATTENTION_PREFIX) :]
            renamed = next(
                (
                    new + rest[len(old) :]
                    for old, new in _ATTENTION_RENAMES.items()
                    if rest.startswith(old)
                ),
                None,
            )
            if renamed is None:
                unknown.append(key)
            else:
                out[ATTENTION_PREFIX + renamed] = _get(where, key)
        else:
            unknown.append(key)
    if unknown:
        raise HeadImportError(
            f"{source}: tensors the released head does not have: {sorted(unknown)}"
        )
    for key in (WEIGHT_KEY, BIAS_KEY):
        if key not in out:
            raise HeadImportError(f"{source}: missing tensor {key}")
    return out


def _class_cards(classes: Sequence[ClassSpec]) -> list[ClassCard]:
    cards = []
    for name, code in classes:
        if isinstance(code, CodeRef):
            code = CodeCard.from_ref(code)
        cards.append(ClassCard(name=name, code=code))
    return cards


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
    clip_below_air: bool = False,
    unit: CodeRef | CodeCard | None = None,
) -> Head:
    """Convert one released head folder into a node head package under ``out_folder``.

    ``classes`` are (name, code or None) in the head's output order: the released folders
    store no label names. A regression head (``regression: true``) takes one class, naming
    the quantity. ``backbone_folder``, when given, is compared tensor by tensor with the
    copy under ``dino.``; a mismatch is recorded (``imported.backbone_match`` false), not
    refused, since a site may deliberately run a head on a newer backbone.
    Returns the package as :func:`load_head` reads it back.
    """
    folder = Path(folder)
    source = str(folder)
    raw_config = _read_json(folder / CONFIG_FILE)
    config = RaidiumConfig.from_dict(raw_config, source)
    plan = plan_pooling(config, source)
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
    where = _open_all(weight_files(folder))
    tensors = _head_tensors(where, source)
    hidden = int(tensors[WEIGHT_KEY].shape[1])
    copy = _check_backbone_copy(where, backbone_folder)
    if copy is not None and f"{BACKBONE_PREFIX}embeddings.cls_token" in where:
        width = int(_get(where, f"{BACKBONE_PREFIX}embeddings.cls_token").shape[-1])
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
            pooling=plan.pooling,  # type: ignore[arg-type]
            hidden_size=hidden,
            backbone=backbone_name,
            clip_below_air=clip_below_air,
            attention=plan.attention,
            window=plan.window,
            unit=CodeCard.from_ref(unit) if isinstance(unit, CodeRef) else unit,
            backbone_digest=_folder_digest(Path(backbone_folder))
            if copy is not None and copy.match
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
    _check_shapes(tensors, card, source)
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


def _check_shapes(tensors: Mapping[str, torch.Tensor], card: HeadCard, source: str) -> None:
    expected = expected_tensors(card)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k} is {list(tensors[k].shape)}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"tensors this configuration does not use {extra}")
    if wrong:
        problems.append("; ".join(wrong))
    if problems:
        raise HeadImportError(
            f"{source}: weights do not match config.json "
            f"(pooling {card.pooling}, {card.num_outputs} outputs): " + "; ".join(problems)
        )
