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

The config and its checks live in :mod:`~pipelines.model.backbone_spec`, the HF <-> timm
tensor mapping in :mod:`~pipelines.model.hf_weights` and the folder's files in
:mod:`~pipelines.model.hf_folder`; this module builds, loads and runs the network, and is
where callers import the backbone API from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipelines.findings import ModelIdentity
from pipelines.model.backbone_spec import (
    CURIA_B,
    CURIA_TINY,
    BackboneSpec,
    WeightsError,
    swiglu_hidden_size,
)
from pipelines.model.hf_folder import (
    CONFIG_FILE,
    NODE_CONFIG_KEY,
    WEIGHTS_FILE,
    file_digest,
    folder_identity,
    load_tensors,
    read_config,
    read_shapes,
    weight_files,
)
from pipelines.model.hf_weights import (
    IGNORED_HF_KEYS,
    check_tensor_shapes,
    hf_tensor_shapes,
    hf_to_timm,
    timm_to_hf,
)
from pipelines.model.processor import (
    PROCESSOR_FILE,
    ProcessorConfigError,
    ProcessorSettings,
    read_processor_config,
)

__all__ = [
    "CONFIG_FILE",
    "CURIA_B",
    "CURIA_TINY",
    "IGNORED_HF_KEYS",
    "PRECISIONS",
    "WEIGHTS_FILE",
    "Backbone",
    "BackboneSpec",
    "BackboneTokens",
    "Precision",
    "WeightsError",
    "backbone_tokens",
    "build_backbone",
    "check_tensor_shapes",
    "demo_backbone",
    "hf_tensor_shapes",
    "hf_to_timm",
    "load_backbone",
    "parameter_count",
    "save_hf_folder",
    "swiglu_hidden_size",
    "timm_to_hf",
    "weight_files",
]


#: Backbone arithmetic: exact fp32 (what Raidium runs), or autocast to bf16 / fp16.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        # timm annotates mlp_layer as a class but only calls it, so a factory fits
        mlp_layer=_packed_swiglu(packed),  # type: ignore[arg-type]
        act_layer=nn.SiLU,
        norm_layer=partial(nn.LayerNorm, eps=spec.layer_norm_eps),
        num_classes=0,
        weight_init="skip" if on_meta else "",
        device=device,
    )
    return model.eval()


# --- the runnable backbone ---------------------------------------------------------------


class _TokenModel(Protocol):
    """What the backbone needs of its network: timm's ``forward_features`` (maybe compiled)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_intermediates(self, x: torch.Tensor, **options: Any) -> Any: ...


@dataclass
class Backbone:
    """A loaded backbone in eval mode, with the identity that goes into reports.

    ``processor`` is what the folder's ``preprocessor_config.json`` says (None: the
    processor's defaults at the backbone's input size); ``precision`` is the arithmetic of
    its forward pass (``model.precision``), fp32 unless a site chose otherwise.
    """

    model: nn.Module
    spec: BackboneSpec
    identity: ModelIdentity
    source: Path | None = field(default=None, compare=False)
    processor: ProcessorSettings | None = field(default=None, compare=False)
    precision: Precision = "fp32"

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved here."""
        return next(self.model.parameters()).device

    @property
    def preprocessing(self) -> ProcessorSettings:
        """The image processor's settings this backbone's inputs are made with."""
        return self.processor or ProcessorSettings(size=self.spec.image_size)

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward pass's precision: exact fp32, or autocast to bf16 / fp16.

        Raidium runs fp32; a lower precision is a speed choice whose effect on features and
        probabilities ``benchmarks/precision.py`` measures.
        """
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _check_batch(self, batch: torch.Tensor) -> None:
        expected = (self.spec.num_channels, self.spec.image_size, self.spec.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"backbone input must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(batch.shape)}"
            )

    @property
    def network(self) -> _TokenModel:
        """The network as the backbone calls it (timm's ViT, possibly torch.compile'd)."""
        return cast(_TokenModel, self.model)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        self._check_batch(batch)
        with torch.inference_mode(), self.autocast():
            return self.network.forward_features(batch.to(self.device, torch.float32))

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
            # a plain bool flag on timm's attention; nn.Module types attributes as tensors
            module.fused_attn = True  # type: ignore[assignment]


def _finish(model: nn.Module, device: torch.device | None) -> nn.Module:
    model = model.to(device or torch.device("cpu")).eval()
    model.requires_grad_(False)
    _enable_fused_attention(model)
    return model


def load_backbone(
    folder: Path, device: torch.device | None = None, precision: Precision = "fp32"
) -> Backbone:
    """Load an HF Dinov2 folder (Curia weights) into a timm ViT, checked strictly.

    Nothing is downloaded: the folder is what a site fetched once. The config is validated
    first, then every tensor name and shape, so a wrong download fails with one message that
    lists all its problems instead of a stack trace from deep inside torch.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder does not exist")
    cfg = read_config(folder)
    spec = BackboneSpec.from_hf_config(cfg, str(folder))
    try:
        processor = read_processor_config(
            folder, image_size=spec.image_size, num_channels=spec.num_channels
        )
    except ProcessorConfigError as exc:
        raise WeightsError(str(exc)) from exc
    files = weight_files(folder)
    check_tensor_shapes(read_shapes(files, folder), spec, str(folder))

    model = build_backbone(spec, device="meta")
    state = hf_to_timm(load_tensors(files), spec)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # defensive: the shape check above should catch everything
        raise WeightsError(f"{folder}: weights do not fit the network: {exc}") from exc
    identity = folder_identity(folder, cfg, file_digest(files))
    return Backbone(
        model=_finish(model, device),
        spec=spec,
        identity=identity,
        source=folder,
        processor=processor,
        precision=precision,
    )


@dataclass(frozen=True)
class BackboneTokens:
    """One forward pass: tokens after the final norm, and the last block's before it.

    Both (N, 1 + patches, hidden), float32, on the backbone's device. ``final[:, 0]`` is
    exactly :meth:`Backbone.features`.
    """

    final: torch.Tensor
    last_block: torch.Tensor


def backbone_tokens(backbone: Backbone, batch: torch.Tensor) -> BackboneTokens:
    """Run the backbone once and keep every token, normed and not.

    Raidium's 3D heads read ``hidden_states[-1]`` (the last block, before the final
    LayerNorm); the CLS features every other head uses come from the same pass.
    """
    expected = (backbone.spec.num_channels, backbone.spec.image_size, backbone.spec.image_size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise ValueError(
            f"backbone input must be (N, {', '.join(map(str, expected))}), got {tuple(batch.shape)}"
        )
    device = backbone.device
    with torch.inference_mode(), backbone.autocast():
        out = backbone.network.forward_intermediates(
            batch.to(device, torch.float32),
            indices=1,
            return_prefix_tokens=True,
            output_fmt="NLC",
            output_dict=True,
        )
    last = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    return BackboneTokens(final=out["image_features"].float(), last_block=last.float())


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
    size: Literal["base", "tiny"] = "base",
    seed: int = 0,
    device: torch.device | None = None,
    precision: Precision = "fp32",
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
    return Backbone(model=_finish(model, device), spec=spec, identity=identity, precision=precision)


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
    processor = backbone.preprocessing.to_config(spec.num_channels)
    (folder / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")


def parameter_count(backbone: Backbone) -> int:
    """Total parameters (86 M for Curia-B), handy for start-up logs."""
    return sum(param.numel() for param in backbone.model.parameters())
