"""Gauges read at scrape time: catalogue-wide states and this process's GPU memory.

Series, runs and deliveries by state are counted in the catalogue when Prometheus scrapes,
so they are right even when workers run in other processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.catalogue.db import Catalogue
from node.catalogue.models import Delivery, PipelineRun, Series


class CatalogueCollector(Collector):
    """Series, runs and deliveries by state, counted in the catalogue at scrape time."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tables = (
            ("curia_series", "Series by state", Series.state),
            (
                "curia_pipeline_runs",
                "Pipeline runs by state (queued = queue depth)",
                PipelineRun.state,
            ),
            ("curia_deliveries", "Deliveries by state (failed = dead-lettered)", Delivery.state),
        )
        with self.catalogue.session() as session:
            for name, doc, column in tables:
                family = GaugeMetricFamily(name, doc, labels=["state"])
                for state, count in session.execute(select(column, func.count()).group_by(column)):
                    family.add_metric([state.value], count)
                yield family


class GpuCollector(Collector):
    """GPU memory of this process, when torch has CUDA (never imports torch itself)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        family = GaugeMetricFamily(
            "curia_gpu_memory_bytes", "GPU memory allocated by this process", labels=["device"]
        )
        utilisation = GaugeMetricFamily(
            "curia_gpu_utilisation_ratio",
            "GPU busy fraction over the last sample period (needs NVML)",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            family.add_metric([str(index)], torch.cuda.memory_allocated(index))
            # Without NVML (pynvml) torch cannot read utilisation: memory only.
            with contextlib.suppress(Exception):
                utilisation.add_metric([str(index)], torch.cuda.utilization(index) / 100.0)
        yield family
        if utilisation.samples:
            yield utilisation
