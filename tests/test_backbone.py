"""The backbone: HF Dinov2 folders load into timm exactly, and bad folders are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model

from pipelines.model.backbone import (
    CURIA_B,
    CURIA_TINY,
    Backbone,
    BackboneSpec,
    WeightsError,
    build_backbone,
    demo_backbone,
    hf_tensor_shapes,
    load_backbone,
    save_hf_folder,
    swiglu_hidden_size,
)

TINY_HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VIT_B_HF = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}


def curia_config(**shape: int) -> Dinov2Config:
    """A Curia-style HF config (1 channel, 512 px, patch 16, SwiGLU, LayerScale 1e-5)."""
    return Dinov2Config(
        image_size=512,
        patch_size=16,
        num_channels=1,
        use_swiglu_ffn=True,
        layerscale_value=1e-5,
        layer_norm_eps=1e-6,
        mlp_ratio=4,
        **shape,
    )


def random_hf_model(config: Dinov2Config, seed: int = 0) -> Dinov2Model:
    """An HF Dinov2Model with every parameter random.

    HF's own init (LayerScale 1e-5, zero biases) would make every block nearly a no-op, so a
    wrong q/k/v or MLP mapping could still pass a comparison.
    """
    torch.manual_seed(seed)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def hf_folder(tmp_path: Path, config: Dinov2Config, seed: int = 0) -> tuple[Path, Dinov2Model]:
    model = random_hf_model(config, seed)
    folder = tmp_path / "curia"
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def hf_tokens(model: Dinov2Model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images).last_hidden_state


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 512, 512, generator=torch.Generator().manual_seed(seed))


# --- spec ---------------------------------------------------------------------------------


def test_swiglu_width_matches_transformers() -> None:
    assert swiglu_hidden_size(768, 4) == 2048  # Curia-B: weights_in (4096, 768)
    assert swiglu_hidden_size(1024, 4) == 2736  # ViT-L
    assert swiglu_hidden_size(1536, 4) == 4096  # ViT-g
    assert swiglu_hidden_size(64, 4) == 176


def test_spec_from_curia_b_config() -> None:
    spec = BackboneSpec.from_hf_config(curia_config(**VIT_B_HF).to_dict(), "curia")
    assert spec == CURIA_B
    assert spec.num_patches == 1024


def test_spec_reads_a_vit_l_config() -> None:
    cfg = curia_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
    spec = BackboneSpec.from_hf_config(cfg.to_dict(), "curia-2-l")
    assert (spec.hidden_size, spec.num_layers, spec.num_heads) == (1024, 24, 16)
    assert spec.intermediate_size == 2736


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "vit"}, "model_type is 'vit' but Curia needs 'dinov2'"),
        ({"num_channels": 3}, "num_channels is 3 but Curia needs 1"),
        ({"use_swiglu_ffn": False}, "use_swiglu_ffn is False but Curia needs true"),
        ({"num_register_tokens": 4}, "num_register_tokens is 4"),
        ({"num_attention_heads": 5}, "not divisible by num_attention_heads 5"),
        ({"image_size": 500}, "image_size 500 is not a multiple of patch_size 16"),
        ({"hidden_size": "big"}, "hidden_size is 'big'"),
    ],
)
def test_spec_refuses_what_the_node_cannot_run(change: dict, message: str) -> None:
    cfg = curia_config(**TINY_HF).to_dict() | change
    with pytest.raises(WeightsError, match="somewhere") as err:
        BackboneSpec.from_hf_config(cfg, "somewhere")
    assert message in str(err.value)


def test_missing_channel_field_means_the_transformers_default() -> None:
    cfg = curia_config(**TINY_HF).to_dict()
    del cfg["num_channels"]
    with pytest.raises(WeightsError, match="num_channels is 3"):
        BackboneSpec.from_hf_config(cfg, "x")


def test_timm_parameters_match_hf_tensor_count() -> None:
    model = build_backbone(CURIA_TINY, device="meta")
    n_hf = len(hf_tensor_shapes(CURIA_TINY)) - 1  # no mask token
    n_qkv_parts = 2 * 2 * CURIA_TINY.num_layers  # q,k,v -> qkv: 2 fewer, weight and bias
    assert len(model.state_dict()) == n_hf - n_qkv_parts
    assert model.blocks[0].mlp.fc1.weight.shape == (2 * CURIA_TINY.intermediate_size, 64)


# --- HF equivalence -----------------------------------------------------------------------


def test_features_equal_hf_last_hidden_state(tmp_path: Path) -> None:
    folder, model = hf_folder(tmp_path, curia_config(**TINY_HF))
    backbone = load_backbone(folder)
    x = images()
    reference = hf_tokens(model, x)
    features = backbone.features(x)
    assert features.shape == (2, 64)
    assert torch.max(torch.abs(features - reference[:, 0])) < 1e-4
    assert torch.max(torch.abs(backbone.tokens(x) - reference)) < 1e-4
    # the comparison means something: the two images give clearly different CLS tokens
    assert torch.max(torch.abs(reference[0, 0] - reference[1, 0])) > 1e-2


def test_identity_of_a_loaded_folder(tmp_path: Path) -> None:
    folder, _ = hf_folder(tmp_path, curia_config(**TINY_HF))
    identity = load_backbone(folder).identity
    assert identity.name == "curia"
    assert not identity.demo
    assert len(identity.weights_digest) == 64
    assert identity.version == f"sha256:{identity.weights_digest[:12]}"


@pytest.mark.slow
def test_full_vit_b_equals_hf(tmp_path: Path) -> None:
    """Real Curia-B shape (86 M parameters, 223 tensors), one image, on CPU."""
    folder, model = hf_folder(tmp_path, curia_config(**VIT_B_HF))
    assert len(load_file(folder / "model.safetensors")) == 223
    backbone = load_backbone(folder)
    assert backbone.spec == CURIA_B
    x = images(1)
    difference = torch.max(torch.abs(backbone.features(x) - hf_tokens(model, x)[:, 0]))
    assert difference < 1e-4


def test_save_hf_folder_round_trip(tmp_path: Path) -> None:
    backbone = demo_backbone("tiny", seed=3)
    save_hf_folder(backbone, tmp_path / "demo")
    loaded = load_backbone(tmp_path / "demo")
    x = images()
    assert torch.equal(loaded.features(x), backbone.features(x))
    assert loaded.spec == backbone.spec
    assert loaded.identity.demo  # demo weights stay flagged demo through a folder
    assert loaded.identity.name == "Curia-tiny (demo weights)"
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert config["architectures"] == ["Dinov2Model"]
    assert config["use_swiglu_ffn"] is True
    assert (tmp_path / "demo" / "preprocessor_config.json").is_file()
    assert "embeddings.mask_token" in load_file(tmp_path / "demo" / "model.safetensors")


def test_saved_folder_loads_in_transformers(tmp_path: Path) -> None:
    backbone = demo_backbone("tiny", seed=4)
    save_hf_folder(backbone, tmp_path / "demo")
    model = Dinov2Model.from_pretrained(tmp_path / "demo").eval()
    x = images(1)
    assert torch.max(torch.abs(backbone.features(x) - hf_tokens(model, x)[:, 0])) < 1e-4


# --- demo ---------------------------------------------------------------------------------


def test_demo_backbone_is_deterministic_and_flagged() -> None:
    a, b, c = demo_backbone("tiny", seed=0), demo_backbone("tiny", seed=0), demo_backbone("tiny", 1)
    x = images(2)
    assert torch.equal(a.features(x), b.features(x))
    assert not torch.equal(a.features(x), c.features(x))
    assert a.identity.demo and a.identity.name == "Curia-tiny (demo weights)"
    assert a.identity.weights_digest == b.identity.weights_digest != c.identity.weights_digest
    # features depend on the image (LayerScale is not left at 1e-5)
    f = a.features(x)
    assert torch.max(torch.abs(f[0] - f[1])) > 1e-3


def test_demo_backbone_rejects_unknown_size() -> None:
    with pytest.raises(ValueError, match="huge"):
        demo_backbone("huge")  # type: ignore[arg-type]


def test_backbone_checks_input_shape() -> None:
    backbone = demo_backbone("tiny")
    with pytest.raises(ValueError, match=r"\(N, 1, 512, 512\)"):
        backbone.features(torch.zeros(1, 3, 512, 512))


def test_backbone_runs_in_eval_mode_without_grad() -> None:
    backbone: Backbone = demo_backbone("tiny")
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.device.type == "cpu"


# --- refusals -----------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder, _ = hf_folder(tmp_path, curia_config(**TINY_HF))
    return folder


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone(tmp_path / "nope")


def test_refuses_missing_weights(tiny_folder: Path) -> None:
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing model\.safetensors") as err:
        load_backbone(tiny_folder)
    assert str(tiny_folder) in str(err.value)


def test_refuses_missing_config(tiny_folder: Path) -> None:
    (tiny_folder / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"missing config\.json"):
        load_backbone(tiny_folder)


def test_refuses_wrong_channel_count(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, num_channels=3)
    with pytest.raises(WeightsError, match="num_channels is 3 but Curia needs 1"):
        load_backbone(tiny_folder)


def test_refuses_missing_tensor(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda t: t.pop("encoder.layer.1.mlp.weights_out.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors: encoder\.layer\.1\.mlp\.weights_out"):
        load_backbone(tiny_folder)


def test_refuses_wrong_shape(tiny_folder: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["encoder.layer.0.mlp.weights_in.weight"] = torch.zeros(256, 64)

    _edit_weights(tiny_folder, shrink)
    with pytest.raises(WeightsError, match="shape mismatch") as err:
        load_backbone(tiny_folder)
    assert "encoder.layer.0.mlp.weights_in.weight is [256, 64]" in str(err.value)
    assert "needs [352, 64]" in str(err.value)


def test_refuses_config_that_disagrees_with_weights(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, num_hidden_layers=3)
    with pytest.raises(WeightsError, match=r"missing tensors: encoder\.layer\.2\."):
        load_backbone(tiny_folder)


def test_refuses_prefixed_classifier_checkpoint(tiny_folder: Path) -> None:
    def prefix(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors["dino." + key] = tensors.pop(key)

    _edit_weights(tiny_folder, prefix)
    with pytest.raises(WeightsError, match="classifier checkpoint"):
        load_backbone(tiny_folder)


def test_mask_token_is_optional(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda t: t.pop("embeddings.mask_token"))
    assert load_backbone(tiny_folder).spec.hidden_size == 64


def test_curia_b_has_the_published_tensor_count() -> None:
    assert len(hf_tensor_shapes(CURIA_B)) == 223
    assert hf_tensor_shapes(CURIA_B)["encoder.layer.0.mlp.weights_in.weight"] == (4096, 768)
    assert hf_tensor_shapes(CURIA_B)["encoder.layer.0.mlp.weights_out.weight"] == (768, 2048)
    assert hf_tensor_shapes(CURIA_B)["embeddings.position_embeddings"] == (1, 1025, 768)


def test_sharded_checkpoint_loads(tiny_folder: Path) -> None:
    reference = load_backbone(tiny_folder)
    tensors = load_file(tiny_folder / "model.safetensors")
    (tiny_folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, tiny_folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (tiny_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    x = images(1)
    assert torch.equal(load_backbone(tiny_folder).features(x), reference.features(x))


def test_precision_changes_the_arithmetic_not_the_answer() -> None:
    """fp32 is exact (what Raidium runs); bf16 autocast moves the CLS only slightly."""
    exact = demo_backbone("tiny", seed=0)
    lower = demo_backbone("tiny", seed=0, precision="bf16")
    batch = torch.randn(2, 1, 512, 512, generator=torch.Generator().manual_seed(0))
    a, b = exact.features(batch), lower.features(batch)
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # bf16 really ran
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99
    assert torch.equal(a, demo_backbone("tiny", seed=0).features(batch))
