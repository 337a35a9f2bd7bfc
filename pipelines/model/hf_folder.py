"""Reading and writing the files of an HF Dinov2 folder: config, safetensors, identity.

Nothing is downloaded: a folder is what a site fetched once. Weights are read one file (or
shard) at a time; their digest is streamed so a multi-GB checkpoint is never held in memory
to hash it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pipelines.findings import ModelIdentity
from pipelines.model.backbone_spec import WeightsError
from pipelines.model.hf_weights import IGNORED_HF_KEYS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
#: config.json entry where ``save_hf_folder`` records the backbone's name and demo flag.
NODE_CONFIG_KEY = "curia_node"


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; a missing or malformed one names the file."""
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


def file_digest(paths: list[Path]) -> str:
    """sha256 over the weight files, streamed so a multi-GB checkpoint is never in memory."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for block in iter(partial(fh.read, 1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_shapes(files: list[Path], folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the file headers, without reading a single weight."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except (OSError, SafetensorError) as exc:
            raise WeightsError(f"{folder}: cannot read {path.name}: {exc}") from exc
    return shapes


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor inference uses, as float32 (the pretraining-only mask token is skipped)."""
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


def folder_identity(folder: Path, cfg: Mapping[str, Any], digest: str) -> ModelIdentity:
    """Name and version for reports; demo weights written by ``save_hf_folder`` stay demo."""
    node = cfg.get(NODE_CONFIG_KEY)
    node = node if isinstance(node, dict) else {}
    version = cfg.get("version")
    return ModelIdentity(
        name=str(node.get("name") or _hub_name(cfg) or folder.name),
        version=str(version) if version else f"sha256:{digest[:12]}",
        demo=bool(node.get("demo", False)),
        weights_digest=digest,
    )
