"""A released Raidium head's ``config.json``, and the node pooling it maps onto.

Raidium's ``dinov2_custom_classifier`` config says how the released forward pools a volume
(window, per-slice or per-volume means, attention probe). Each setting is mapped onto one of
the node's poolings; what has no faithful match is refused with the config field named, so
a head never silently computes something other than what it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.model.head_card import AttentionCard, HeadError, Pooling, WindowCard

RAIDIUM_MODEL_TYPE = "dinov2_custom_classifier"

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

    pooling: Pooling
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
    if ignored:
        notes.append(f"{', '.join(ignored)} only affect the 3D path and are ignored")
    return _Pooling("slice", None, None, tuple(notes))


#: The 2D poolings an import may be told to use (the config cannot say which was trained).
SlicePooling = Literal["slice", "mask", "mean_cls"]


def choose_2d_pooling(
    planned: _Pooling, asked: SlicePooling | None, folder_name: str, source: str
) -> _Pooling:
    """The pooling of a 2D head: the released per-slice forward unless told otherwise.

    Whether a 2D head was trained on the CLS token or on patch tokens inside a mask is not in
    its config; a folder named for a mask (``emidec-classification-mask``) is refused until
    ``--pooling`` says which, rather than imported as a CLS head that would run on the wrong
    tokens.
    """
    if planned.pooling != "slice":
        if asked is not None:
            raise HeadImportError(
                f"{source}: --pooling {asked} is for 2D heads; this config describes a "
                f"{planned.pooling} (3D) head"
            )
        return planned
    if asked is None and "mask" in folder_name.lower():
        raise HeadImportError(
            f"{source}: the folder name says this head pools inside a mask, which its config "
            "cannot say: pass --pooling mask (patch tokens inside a mask) or --pooling slice "
            "(the CLS token of each slice)"
        )
    chosen = asked or "slice"
    notes = list(planned.notes)
    notes.append(
        {
            "slice": "per-slice head (classifier on one slice's final-norm CLS token): scored "
            "on every slice, the scores aggregated",
            "mask": "mask-pooled head (classifier on the mean of final-norm patch tokens inside "
            "a mask): runs only where a mask is available",
            "mean_cls": "applied to the series-mean CLS feature (as asked at import), which "
            "averages its per-slice logits",
        }[chosen]
    )
    return _Pooling(chosen, None, None, tuple(notes))
