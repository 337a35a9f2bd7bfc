"""What a worker process holds: catalogue, spool, the loaded model, heads and templates.

Built once per process on first use (never before a fork), so the model is loaded in the
process that runs inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import generate_uid

from node import __version__
from node.catalogue.db import Catalogue
from node.catalogue.models import PipelineRun, Series
from node.core.settings import Settings
from node.delivery.destinations import dispatchers, result_destinations
from node.delivery.transport import Destination
from node.store.spool import Spool, spool_for, write_durably
from node.workflow.routing import Router

if TYPE_CHECKING:
    import torch

    from pipelines.model.backbone import Backbone
    from pipelines.model.heads import Head
    from pipelines.model.masks import MaskHead
    from pipelines.reporting.provenance import DeviceIdentity
    from pipelines.reporting.templates import ReportTemplate

log = logging.getLogger(__name__)


def model_key(settings: Settings) -> str:
    """A cheap fingerprint of the configured backbone and heads (no model load).

    Part of each run's key: the same series analysed by the same model is reported once.
    """
    parts: list[str] = []
    weights = settings.model.weights_dir
    if weights is None:
        parts.append(f"demo:{settings.model.demo_size}:{settings.model.seed}")
    else:
        config = Path(weights) / "config.json"
        tensors = Path(weights) / "model.safetensors"
        parts.append(hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "")
        parts.append(str(tensors.stat().st_size) if tensors.is_file() else "")
    heads, masks = settings.model.heads_dir, settings.model.mask_heads_dir
    if heads is None:
        parts.append("demo-heads:body-region,demo-region-mask")
    for folder in (heads, masks):
        if folder is not None:
            for card in sorted(Path(folder).glob("*/head.json")):
                meta = json.loads(card.read_text())
                parts.append(f"{meta.get('name')}@{meta.get('version')}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_key_for(settings: Settings) -> Callable[[Series], str]:
    key = model_key(settings)

    def run_key(series: Series) -> str:
        return f"{series.series_instance_uid}:{key}"

    return run_key


def persistent_device_uid(settings: Settings) -> str:
    """The node's DeviceUID: configured, or generated once and kept in the data folder."""
    if settings.identity.device_uid:
        return settings.identity.device_uid
    path = settings.data_path / "device-uid"
    if path.is_file():
        return path.read_text().strip()
    uid = generate_uid()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    write_durably(path, uid.encode())
    return uid


class Runtime:
    """Lazily built per-process state for the pipeline tasks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._model_lock = threading.Lock()

    @cached_property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.settings.effective_database_url)

    @cached_property
    def router(self) -> Router:
        return Router(self.catalogue, self.settings.spool_dir)

    @cached_property
    def spool(self) -> Spool:
        return spool_for(self.settings)

    @cached_property
    def device(self) -> torch.device:
        from pipelines.model.inference import select_device

        return select_device(self.settings.model.device)

    @cached_property
    def backbone(self) -> Backbone:
        from pipelines.model.backbone import demo_backbone, load_backbone

        with self._model_lock:
            model = self.settings.model
            if model.weights_dir is None:
                log.warning("no weights configured: using DEMO weights (random, not for diagnosis)")
                backbone = demo_backbone(
                    model.demo_size, seed=model.seed, device=self.device, precision=model.precision
                )
            else:
                backbone = load_backbone(
                    Path(model.weights_dir), device=self.device, precision=model.precision
                )
            if model.compile:
                import torch

                # Compiled on first use per input shape; worth it for long-running GPU workers.
                backbone.model = torch.compile(backbone.model)  # type: ignore[assignment]
            return backbone

    @cached_property
    def heads(self) -> list[Head]:
        from pipelines.model.heads import demo_head, load_heads

        heads_dir = self.settings.model.heads_dir
        if heads_dir is None:
            return [demo_head(self.backbone.spec.hidden_size, seed=self.settings.model.seed)]
        return list(load_heads(Path(heads_dir)).values())

    @cached_property
    def mask_heads(self) -> list[MaskHead]:
        """Heads that produce masks (and so a SEG); the demo one goes with the demo heads."""
        from pipelines.model.masks import demo_mask_head, load_mask_head

        model = self.settings.model
        if model.mask_heads_dir is not None:
            return [
                load_mask_head(card.parent)
                for card in sorted(Path(model.mask_heads_dir).glob("*/head.json"))
            ]
        if model.heads_dir is None:
            return [demo_mask_head(self.backbone.spec.hidden_size, seed=model.seed)]
        return []

    @cached_property
    def templates(self) -> dict[str, ReportTemplate]:
        from pipelines.reporting.templates import load_templates

        return load_templates(self.settings.templates_dir)

    @cached_property
    def device_identity(self) -> DeviceIdentity:
        from pipelines.reporting.provenance import DeviceIdentity

        identity = self.settings.identity
        return DeviceIdentity(
            manufacturer=identity.manufacturer,
            model_name=identity.model_name,
            software_version=__version__,
            device_uid=persistent_device_uid(self.settings),
            device_name=self.settings.dicom.ae_title,
            institution_name=identity.institution_name,
        )

    def destinations(self) -> dict[str, Destination]:
        """Enabled destinations by name, read from the catalogue on every call so an admin's
        change applies to the next delivery without a restart."""
        return dispatchers(self.catalogue, self.settings)

    def result_destinations(self) -> list[str]:
        """Destinations that receive every result (routing rules may add others)."""
        return result_destinations(self.catalogue, self.settings)

    def priority_of_run(self, run_id: int) -> int:
        """The routing priority of a run's series (0 routine .. 9 stat)."""
        with self.catalogue.session() as session:
            run = session.get(PipelineRun, run_id)
            return run.series.priority if run is not None else 0
