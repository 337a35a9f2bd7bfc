"""The tensors of a released Raidium head folder: the head kept, the backbone copy checked.

``model.safetensors`` holds the classifier, the optional attention probe (renamed here to the
node's names) and a full copy of the backbone under ``dino.``. The copy is digested and, when
asked, compared with the site's backbone folder one tensor at a time, so a ViT-L copy is
never held twice in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pipelines.model.backbone_spec import WeightsError
from pipelines.model.head_card import ATTENTION_PREFIX, BIAS_KEY, WEIGHT_KEY, HeadCard
from pipelines.model.heads import expected_tensors
from pipelines.model.hf_folder import file_digest
from pipelines.model.hf_folder import weight_files as backbone_weight_files
from pipelines.model.hf_weights import IGNORED_HF_KEYS
from pipelines.model.raidium_config import HeadImportError

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


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards its index lists (the backbone loader's rule)."""
    try:
        return backbone_weight_files(folder)
    except WeightsError as exc:
        raise HeadImportError(str(exc)) from exc


def open_all(files: list[Path]) -> dict[str, Path]:
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


def read_tensor(where: Mapping[str, Path], key: str) -> torch.Tensor:
    """One tensor, read from the file :func:`open_all` found it in."""
    with safe_open(str(where[key]), framework="pt") as fh:
        tensor: torch.Tensor = fh.get_tensor(key)
    return tensor


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


def check_backbone_copy(
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
        reference = open_all(weight_files(Path(backbone_folder)))
    digest = hashlib.sha256()
    problems: list[str] = []
    for key in keys:
        tensor = read_tensor(where, key)
        _tensor_digest(digest, key, tensor)
        name = key[len(BACKBONE_PREFIX) :]
        if reference is None or name in IGNORED_HF_KEYS:
            continue
        if name not in reference:
            problems.append(f"{name} not in the backbone folder")
            continue
        other = read_tensor(reference, name)
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


def folder_digest(folder: Path) -> str:
    """sha256 of a backbone folder's weight files: the node's weights_digest for it."""
    return file_digest(weight_files(folder))


def released_head_tensors(where: Mapping[str, Path], source: str) -> dict[str, torch.Tensor]:
    """The classifier and probe tensors under the node's names; anything else is refused."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in where:
        if key.startswith(BACKBONE_PREFIX):
            continue
        if key.startswith(RAIDIUM_CLASSIFIER_PREFIX):
            out[key] = read_tensor(where, key)
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
                out[ATTENTION_PREFIX + renamed] = read_tensor(where, key)
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


def check_head_shapes(tensors: Mapping[str, torch.Tensor], card: HeadCard, source: str) -> None:
    """Refuse tensors that do not fit the card, listing every missing, extra or misshapen one."""
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
