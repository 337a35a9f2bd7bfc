"""Per-series features for training, computed once through the node's own inference path.

Features are cached per series under ``<cache>/<backbone digest>-<preprocessing>/``, keyed
by the series files' names, sizes and modification times, so a second run (another fold
count, another label set) never runs the backbone again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipelines.model.backbone import Backbone
from pipelines.model.inference import embed_chunks, slice_features
from pipelines.model.labelled_data import SeriesSource, TrainingError
from pipelines.model.nifti import load_nifti
from pipelines.model.orientation import SeriesError

FEATURE_DIR = ".curia-features"
CLS_KEY = "cls"
#: Bumped whenever the image processor's output changes (v2: resize before the clamp,
#: unbiased std).
PROCESSOR_REVISION = "p2"


# --- features and their cache ------------------------------------------------------------


class FeatureCache:
    """Per-slice CLS features of each series, for one backbone and one preprocessing."""

    def __init__(self, root: Path, backbone: Backbone, *, clip_below_air: bool) -> None:
        identity = backbone.identity
        key = (
            identity.weights_digest
            or hashlib.sha256(f"{identity.name}\0{identity.version}".encode()).hexdigest()
        )
        # the processor revision and the precision change the features too: features cached
        # with an earlier normalisation order or another precision are never reused
        setting = (
            f"{PROCESSOR_REVISION}-{backbone.precision}-{'clip' if clip_below_air else 'plain'}"
        )
        self.folder = Path(root) / f"{key[:16]}-{setting}"

    def path(self, source: SeriesSource) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)
        tag = hashlib.sha256(source.name.encode()).hexdigest()[:8]
        return self.folder / f"{safe}-{tag}.safetensors"

    def load(self, source: SeriesSource) -> torch.Tensor | None:
        """The cached (S, hidden) features, or None if absent or the files changed since."""
        path = self.path(source)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") != source.fingerprint():
                    return None
                features: torch.Tensor = fh.get_tensor(CLS_KEY)
                return features
        except (OSError, SafetensorError):
            return None

    def store(self, source: SeriesSource, features: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(source)
        partial = path.with_suffix(".partial")
        metadata = {"series": source.name, "fingerprint": source.fingerprint()}
        save_file({CLS_KEY: features.contiguous()}, str(partial), metadata=metadata)
        partial.replace(path)


def compute_slice_features(
    source: SeriesSource, backbone: Backbone, *, clip_below_air: bool, batch_size: int = 16
) -> torch.Tensor:
    """(S, hidden) CLS features of every slice, through the node's own inference path."""
    if source.kind == "dicom":
        return slice_features(
            list(source.paths), backbone, clip_below_air=clip_below_air, batch_size=batch_size
        )
    volume = load_nifti(source.paths[0])
    chunks = (volume[i : i + batch_size] for i in range(0, len(volume), batch_size))
    return embed_chunks(chunks, backbone, clip_below_air=clip_below_air)


class ProgressHook(Protocol):
    """What a caller (the CLI's progress bar) is told while features are computed."""

    def start(self, total: int) -> None: ...

    def advance(self, name: str, cached: bool) -> None: ...


def series_features(
    sources: Sequence[SeriesSource],
    backbone: Backbone,
    *,
    cache: FeatureCache | None,
    clip_below_air: bool,
    batch_size: int = 16,
    progress: ProgressHook | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean CLS feature per series (N, hidden) and how many came from the cache.

    The mean is taken in float64 like :func:`pipelines.model.inference.analyse_series`, so a
    trained head sees in production exactly the features it was trained on.
    """
    if progress:
        progress.start(len(sources))
    rows, cached = [], 0
    for source in sources:
        features = cache.load(source) if cache else None
        hit = features is not None
        if features is None:
            try:
                features = compute_slice_features(
                    source, backbone, clip_below_air=clip_below_air, batch_size=batch_size
                )
            except SeriesError as exc:
                raise TrainingError(f"series {source.name!r}: {exc}") from exc
            if cache:
                cache.store(source, features)
        cached += hit
        rows.append((features.double().sum(dim=0) / len(features)).float())
        if progress:
            progress.advance(source.name, hit)
    return torch.stack(rows), cached
