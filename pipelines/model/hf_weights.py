"""HF Dinov2 tensors <-> timm ViT tensors: names, shapes and the q/k/v packing.

timm's ViT block layout maps one to one onto the HF tensors (see docs/curia-model.md), except
that HF keeps query, key and value apart where timm stacks them into one ``qkv`` tensor. The
mapping is exact both ways, so a folder the node writes loads in transformers and back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipelines.model.backbone_spec import BackboneSpec, WeightsError

#: Tensors present in HF folders that inference does not use (masked-image pretraining only).
IGNORED_HF_KEYS = frozenset({"embeddings.mask_token"})

_MAX_LISTED = 8  # how many offending keys an error message lists before summarising


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
