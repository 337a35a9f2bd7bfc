"""The Curia backbone: read a Hugging Face Dinov2 folder, run it as a timm ViT.

Curia is released as a Hugging Face ``Dinov2Model`` folder (``config.json`` +
``model.safetensors``). The node runs the same network as a timm ``VisionTransformer``
instead of through transformers: timm's ViT has fused attention and a packed SwiGLU MLP,
and its block layout maps one to one onto the HF tensors (see docs/curia-model.md). The
mapping is exact, so the CLS token after the final norm equals HF's
``last_hidden_state[:, 0]``.

Every structural fact (width, depth, heads, patch, image size, channels, MLP size) is read
from ``config.json`` rather than assumed, so Curia-2 / ViT-L / ViT-g folders work when their
config says so, and anything the node cannot run is refused with a :class:`WeightsError`
that names the folder and the exact problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipelines.findings import ModelIdentity

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
#: config.json entry where :func:`save_hf_folder` records the backbone's name and demo flag.
NODE_CONFIG_KEY = "curia_node"

#: Tensors present in HF folders that inference does not use (masked-image pretraining only).
IGNORED_HF_KEYS = frozenset({"embeddings.mask_token"})

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

_MAX_LISTED = 8  # how many offending keys an error message lists before summarising


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


def _packed_swiglu(packed_hidden: int) -> Callable[..., nn.Module]:
    """An ``mlp_layer`` for timm that pins the packed fc1 width.

    timm derives the width as ``int(dim * mlp_ratio)``; a float ratio like 16/3 can round the
    wrong way, so the exact width from the config is forced instead.
    """

    def make(**kwargs: Any) -> nn.Module:
        kwargs["hidden_features"] = packed_hidden
        return SwiGLUPacked(**kwargs)

    return make


def build_backbone(spec: BackboneSpec, *, device: torch.device | str | None = None) -> nn.Module:
    """A timm ViT with Curia's layout (randomly initialised unless ``device`` is ``meta``).

    ``device="meta"`` builds the skeleton without allocating or initialising weights, for
    loading a checkpoint with ``load_state_dict(assign=True)``.
    """
    if not spec.use_swiglu:
        raise WeightsError("build_backbone: Curia backbones use a SwiGLU MLP (use_swiglu=True)")
    packed = 2 * spec.intermediate_size
    on_meta = device is not None and torch.device(device).type == "meta"
    model = VisionTransformer(
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        in_chans=spec.num_channels,
        embed_dim=spec.hidden_size,
        depth=spec.num_layers,
        num_heads=spec.num_heads,
        mlp_ratio=packed / spec.hidden_size,
        qkv_bias=spec.qkv_bias,
        init_values=spec.layerscale_value or 1.0,
        mlp_layer=_packed_swiglu(packed),
        act_layer=nn.SiLU,
        norm_layer=partial(nn.LayerNorm, eps=spec.layer_norm_eps),
        num_classes=0,
        weight_init="skip" if on_meta else "",
        device=device,
    )
    return model.eval()


# --- HF <-> timm key mapping -------------------------------------------------------------


def _hf_layer_shapes(spec: BackboneSpec, i: int) -> dict[str, tuple[int, ...]]:
    d, h = spec.hidden_size, spec.intermediate_size
    p = f"encoder.layer.{i}."
    shapes: dict[str, tuple[int, ...]] = {
        p + "norm1.weight": (d,),
        p + "norm1.bias": (d,),
        p + "attention.output.dense.weight": (d, d),
        p + "attention.output.dense.bias": (d,),
        p + "layer_scale1.lambda1": (d,),
        p + "norm2.weight": (d,),
        p + "norm2.bias": (d,),
        p + "mlp.weights_in.weight": (2 * h, d),
        p + "mlp.weights_in.bias": (2 * h,),
        p + "mlp.weights_out.weight": (d, h),
        p + "mlp.weights_out.bias": (d,),
        p + "layer_scale2.lambda1": (d,),
    }
    for part in ("query", "key", "value"):
        shapes[f"{p}attention.attention.{part}.weight"] = (d, d)
        if spec.qkv_bias:
            shapes[f"{p}attention.attention.{part}.bias"] = (d,)
    return shapes


def hf_tensor_shapes(spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Dinov2 checkpoint of this spec holds, with its shape.

    ``embeddings.mask_token`` is included (save writes it) but optional when loading.
    """
    d, c, p = spec.hidden_size, spec.num_channels, spec.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, 1 + spec.num_patches, d),
        "embeddings.patch_embeddings.projection.weight": (d, c, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
    }
    for i in range(spec.num_layers):
        shapes.update(_hf_layer_shapes(spec, i))
    shapes["layernorm.weight"] = (d,)
    shapes["layernorm.bias"] = (d,)
    return shapes


_EMBEDDING_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}

_LAYER_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.weights_in.weight": "mlp.fc1.weight",
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}

_QKV = ("query", "key", "value")


def _renamed_pairs(spec: BackboneSpec) -> list[tuple[str, str]]:
    """(HF key, timm key) for every tensor that is renamed one to one (all but q, k, v)."""
    pairs = list(_EMBEDDING_RENAMES.items())
    for i in range(spec.num_layers):
        hf_prefix, timm_prefix = f"encoder.layer.{i}.", f"blocks.{i}."
        pairs += [(hf_prefix + h, timm_prefix + t) for h, t in _LAYER_RENAMES.items()]
    return pairs


def _qkv_params(spec: BackboneSpec) -> list[str]:
    return ["weight", "bias"] if spec.qkv_bias else ["weight"]


def hf_to_timm(hf: Mapping[str, torch.Tensor], spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """Rename HF Dinov2 tensors to timm ViT names; q, k, v are stacked (in that order) into qkv.

    The caller has already checked the key set and shapes against ``spec``.
    """
    out = {timm_key: hf[hf_key] for hf_key, timm_key in _renamed_pairs(spec)}
    for i in range(spec.num_layers):
        attn = f"encoder.layer.{i}.attention.attention."
        for param in _qkv_params(spec):
            parts = [hf[f"{attn}{part}.{param}"] for part in _QKV]
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return out


def timm_to_hf(state: Mapping[str, torch.Tensor], spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_timm`, plus a zero ``mask_token`` so transformers loads cleanly."""
    out = {hf_key: state[timm_key] for hf_key, timm_key in _renamed_pairs(spec)}
    dtype = state["norm.weight"].dtype
    out["embeddings.mask_token"] = torch.zeros(1, spec.hidden_size, dtype=dtype)
    for i in range(spec.num_layers):
        attn = f"encoder.layer.{i}.attention.attention."
        for param in _qkv_params(spec):
            chunks = state[f"blocks.{i}.attn.qkv.{param}"].chunk(3, dim=0)
            for part, tensor in zip(_QKV, chunks, strict=True):
                out[f"{attn}{part}.{param}"] = tensor
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# --- the runnable backbone ---------------------------------------------------------------


@dataclass
class Backbone:
    """A loaded backbone in eval mode, with the identity that goes into reports."""

    model: nn.Module
    spec: BackboneSpec
    identity: ModelIdentity
    source: Path | None = field(default=None, compare=False)

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved here."""
        return next(self.model.parameters()).device

    def _autocast(self) -> AbstractContextManager[Any]:
        """bf16 on CUDA (tensor cores, half the memory traffic); exact fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _check_batch(self, batch: torch.Tensor) -> None:
        expected = (self.spec.num_channels, self.spec.image_size, self.spec.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"backbone input must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(batch.shape)}"
            )

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        self._check_batch(batch)
        with torch.inference_mode(), self._autocast():
            return self.model.forward_features(batch.to(self.device, torch.float32))

    def tokens(self, batch: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (N, 1 + patches, hidden), float32.

        Equals HF ``last_hidden_state``; index 0 is the CLS token, the rest the patch grid in
        row-major order. Kept for heads that pool patch tokens (region masks, 3D heads).
        """
        return self._forward(batch).float()

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """CLS token after the final norm, (N, hidden), float32, on the backbone's device.

        Equals HF ``last_hidden_state[:, 0]`` (and its pooler output).
        """
        return self._forward(batch)[:, 0].float()


def _enable_fused_attention(model: nn.Module) -> None:
    """Use PyTorch's scaled-dot-product attention kernels in every block.

    On CUDA that is flash / memory-efficient attention; on CPU the fused kernel is numerically
    equivalent to the explicit softmax(QK^T)V and avoids materialising the 1025 x 1025 map.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True


def _finish(model: nn.Module, device: torch.device | None) -> nn.Module:
    model = model.to(device or torch.device("cpu")).eval()
    model.requires_grad_(False)
    _enable_fused_attention(model)
    return model


# --- reading an HF folder ----------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder}: missing {CONFIG_FILE} (expected an HF Dinov2Model folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: config must be a JSON object")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{index}: unreadable shard index: {exc}") from exc
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(f"{folder}: shard index lists missing files {missing}")
        return shards
    hint = ""
    if (folder / "pytorch_model.bin").is_file():
        hint = " (found pytorch_model.bin: the node reads safetensors only, convert it)"
    raise WeightsError(f"{folder}: missing {WEIGHTS_FILE}{hint}")


def _file_digest(paths: list[Path]) -> str:
    """sha256 over the weight files, streamed so a multi-GB checkpoint is never in memory."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for block in iter(partial(fh.read, 1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_shapes(files: list[Path], folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except (OSError, SafetensorError) as exc:
            raise WeightsError(f"{folder}: cannot read {path.name}: {exc}") from exc
    return shapes


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_tensor_shapes(
    found: Mapping[str, tuple[int, ...]], spec: BackboneSpec, source: str
) -> None:
    """Refuse a checkpoint whose tensors do not match the config, listing what is wrong."""
    expected = hf_tensor_shapes(spec)
    missing = sorted(k for k in expected if k not in found and k not in IGNORED_HF_KEYS)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(
        f"{k} is {list(found[k])} but the config needs {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unexpected:
        hint = ""
        if any(k.startswith(("dino.", "dinov2.")) for k in unexpected):
            hint = (
                " (keys carry a 'dino.'/'dinov2.' prefix: this looks like a classifier "
                "checkpoint; point the node at the plain Dinov2Model backbone folder)"
            )
        problems.append(f"unexpected tensors: {_listed(unexpected)}{hint}")
    if wrong:
        problems.append(f"shape mismatch: {_listed(wrong)}")
    if problems:
        raise WeightsError(f"{source}: weights do not match config.json: " + "; ".join(problems))


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key not in IGNORED_HF_KEYS:
                    tensors[key] = fh.get_tensor(key).to(torch.float32)
    return tensors


def _hub_name(cfg: Mapping[str, Any]) -> str | None:
    """``_name_or_path`` when it is a hub id like ``raidium/curia`` (not a local path)."""
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    return None


def _folder_identity(folder: Path, cfg: Mapping[str, Any], digest: str) -> ModelIdentity:
    """Name and version for reports; demo weights written by :func:`save_hf_folder` stay demo."""
    node = cfg.get(NODE_CONFIG_KEY)
    node = node if isinstance(node, dict) else {}
    version = cfg.get("version")
    return ModelIdentity(
        name=str(node.get("name") or _hub_name(cfg) or folder.name),
        version=str(version) if version else f"sha256:{digest[:12]}",
        demo=bool(node.get("demo", False)),
        weights_digest=digest,
    )


def load_backbone(folder: Path, device: torch.device | None = None) -> Backbone:
    """Load an HF Dinov2 folder (Curia weights) into a timm ViT, checked strictly.

    Nothing is downloaded: the folder is what a site fetched once. The config is validated
    first, then every tensor name and shape, so a wrong download fails with one message that
    lists all its problems instead of a stack trace from deep inside torch.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder does not exist")
    cfg = _read_config(folder)
    spec = BackboneSpec.from_hf_config(cfg, str(folder))
    files = weight_files(folder)
    check_tensor_shapes(_read_shapes(files, folder), spec, str(folder))

    model = build_backbone(spec, device="meta")
    state = hf_to_timm(_load_tensors(files), spec)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # defensive: the shape check above should catch everything
        raise WeightsError(f"{folder}: weights do not fit the network: {exc}") from exc
    identity = _folder_identity(folder, cfg, _file_digest(files))
    return Backbone(model=_finish(model, device), spec=spec, identity=identity, source=folder)


# --- demo weights and writing folders ----------------------------------------------------


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _randomise_layer_scales(model: nn.Module, generator: torch.Generator) -> None:
    """Give LayerScale real weight so demo features depend on the image.

    Curia's init (1e-5) would make every block nearly a no-op and every CLS token the same.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                values = torch.rand(param.shape, generator=generator) * 0.45 + 0.05
                param.copy_(values)


def demo_backbone(
    size: Literal["base", "tiny"] = "base", seed: int = 0, device: torch.device | None = None
) -> Backbone:
    """A backbone with Curia's architecture and seeded random weights.

    For trying the node without the gated weights; everything it produces is flagged demo.
    ``"tiny"`` is a scaled-down copy (hidden 64, 2 layers) for fast tests.
    """
    specs = {
        "base": (CURIA_B, "Curia-B (demo weights)"),
        "tiny": (CURIA_TINY, "Curia-tiny (demo weights)"),
    }
    if size not in specs:
        raise ValueError(f"demo backbone size must be 'base' or 'tiny', not {size!r}")
    spec, name = specs[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(spec)
    _randomise_layer_scales(model, torch.Generator().manual_seed(seed))
    identity = ModelIdentity(
        name=name,
        version=f"demo-seed-{seed}",
        demo=True,
        weights_digest=_state_digest(model.state_dict()),
    )
    return Backbone(model=_finish(model, device), spec=spec, identity=identity)


def _preprocessor_config(spec: BackboneSpec) -> dict[str, Any]:
    """Curia's image-processor settings (the node applies them itself, see preprocess.py)."""
    return {
        "crop_size": spec.image_size,
        "clip_below_air": False,
        "do_resize": True,
        "resample": "bicubic (antialiased)",
        "normalization": "per-slice z-score",
        "num_channels": spec.num_channels,
    }


def save_hf_folder(backbone: Backbone, folder: Path) -> None:
    """Write ``backbone`` as an HF Dinov2Model folder that transformers and the node both load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = backbone.spec
    config = spec.to_hf_config()
    config["version"] = backbone.identity.version
    config[NODE_CONFIG_KEY] = {"name": backbone.identity.name, "demo": backbone.identity.demo}
    tensors = timm_to_hf(backbone.model.state_dict(), spec)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / PREPROCESSOR_FILE).write_text(
        json.dumps(_preprocessor_config(spec), indent=2) + "\n", encoding="utf-8"
    )


def parameter_count(backbone: Backbone) -> int:
    """Total parameters (86 M for Curia-B), handy for start-up logs."""
    return sum(param.numel() for param in backbone.model.parameters())
