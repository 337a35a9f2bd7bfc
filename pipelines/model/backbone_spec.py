"""The shape of a Curia backbone, read from (and written to) an HF Dinov2 ``config.json``.

Every structural fact (width, depth, heads, patch, image size, channels, MLP size) comes from
the config rather than being assumed, so Curia-2 / ViT-L / ViT-g folders work when their
config says so; a config the node cannot run is refused with a :class:`WeightsError` naming
the source and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Defaults of transformers' ``Dinov2Config``: a field missing from config.json means what
#: transformers would make of it, so the node reads a folder the way transformers does.
HF_DINOV2_DEFAULTS: Mapping[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
    "layer_norm_eps": 1e-6,
}


class WeightsError(ValueError):
    """A weights folder the node cannot run; the message names the folder and the problem."""


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width exactly as transformers' ``Dinov2SwiGLUFFN`` computes it.

    Two thirds of ``hidden_size * mlp_ratio``, rounded up to a multiple of 8 (2048 for
    ViT-B with mlp_ratio 4). The packed input projection holds twice this many rows.
    """
    hidden_features = int(hidden_size * mlp_ratio)
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class BackboneSpec:
    """The shape of a Curia backbone, as read from (or written to) an HF Dinov2 config."""

    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    intermediate_size: int
    use_swiglu: bool
    layer_norm_eps: float
    layerscale_value: float
    qkv_bias: bool = True
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (1024 for 512 / 16)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str) -> BackboneSpec:
        """Read an HF Dinov2 ``config.json`` and refuse what the node cannot run.

        ``source`` (the folder or file name) goes into every error message so a site can
        tell which download is wrong.
        """
        model_type = cfg.get("model_type")
        if model_type != "dinov2":
            raise WeightsError(
                f"{source}: config field model_type is {model_type!r} but Curia needs 'dinov2' "
                "(a Dinov2Model backbone folder)"
            )
        registers = cfg.get("num_register_tokens", 0)
        if registers:
            raise WeightsError(
                f"{source}: config field num_register_tokens is {registers} but Curia has no "
                "register tokens (needs 0)"
            )

        def get(name: str) -> Any:
            return cfg.get(name, HF_DINOV2_DEFAULTS[name])

        hidden = _positive_int(get("hidden_size"), "hidden_size", source)
        layers = _positive_int(get("num_hidden_layers"), "num_hidden_layers", source)
        heads = _positive_int(get("num_attention_heads"), "num_attention_heads", source)
        image = _square_size(get("image_size"), "image_size", source)
        patch = _square_size(get("patch_size"), "patch_size", source)
        channels = get("num_channels")
        if channels != 1:
            raise WeightsError(
                f"{source}: config field num_channels is {channels!r} but Curia needs 1 "
                "(one grey-level channel)"
            )
        if not get("use_swiglu_ffn"):
            raise WeightsError(
                f"{source}: config field use_swiglu_ffn is {get('use_swiglu_ffn')!r} but Curia "
                "needs true (SwiGLU MLP)"
            )
        if hidden % heads:
            raise WeightsError(
                f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        if image % patch:
            raise WeightsError(
                f"{source}: image_size {image} is not a multiple of patch_size {patch}"
            )
        mlp_ratio = float(get("mlp_ratio"))
        if not mlp_ratio > 0:
            raise WeightsError(f"{source}: config field mlp_ratio is {mlp_ratio} but must be > 0")
        return cls(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            patch_size=patch,
            image_size=image,
            num_channels=1,
            intermediate_size=swiglu_hidden_size(hidden, mlp_ratio),
            use_swiglu=True,
            layer_norm_eps=float(get("layer_norm_eps")),
            layerscale_value=float(get("layerscale_value")),
            qkv_bias=bool(get("qkv_bias")),
            mlp_ratio=mlp_ratio,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` transformers needs to rebuild this backbone as a Dinov2Model."""
        if swiglu_hidden_size(self.hidden_size, self.mlp_ratio) != self.intermediate_size:
            raise ValueError(
                f"mlp_ratio {self.mlp_ratio} gives a SwiGLU width of "
                f"{swiglu_hidden_size(self.hidden_size, self.mlp_ratio)} in transformers, "
                f"not intermediate_size {self.intermediate_size}"
            )
        return {
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            # transformers types mlp_ratio as int: keep integral ratios integral
            "mlp_ratio": int(self.mlp_ratio) if self.mlp_ratio.is_integer() else self.mlp_ratio,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "use_swiglu_ffn": self.use_swiglu,
            "layer_norm_eps": self.layer_norm_eps,
            "layerscale_value": self.layerscale_value,
            "qkv_bias": self.qkv_bias,
            "hidden_act": "gelu",
            "use_mask_token": True,
            "drop_path_rate": 0.0,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
        }


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise WeightsError(f"{source}: config field {name} is {value!r} but must be a positive int")
    return value


def _square_size(value: Any, name: str, source: str) -> int:
    """HF allows an int or an (h, w) pair; Curia is square, so a pair must have h == w."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise WeightsError(f"{source}: config field {name} is {value!r} but must be square")
        value = value[0]
    return _positive_int(value, name, source)


#: Real Curia-B (the released backbone): ViT-B/16, 1 channel, 512 px, SwiGLU, LayerScale.
CURIA_B = BackboneSpec(
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    patch_size=16,
    image_size=512,
    num_channels=1,
    intermediate_size=2048,
    use_swiglu=True,
    layer_norm_eps=1e-6,
    layerscale_value=1e-5,
)

#: A scaled-down copy with the same layout, small enough for CPU tests.
CURIA_TINY = BackboneSpec(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    patch_size=16,
    image_size=512,
    num_channels=1,
    intermediate_size=swiglu_hidden_size(64, 4.0),
    use_swiglu=True,
    layer_norm_eps=1e-6,
    layerscale_value=1e-5,
)
