"""Prometheus counters and histograms, updated where things happen.

The listener, the pipeline stages and deliveries all count into these, so they live at the
bottom of the house. Gauges read from the catalogue at scrape time are the web layer's
(:mod:`node.web.metrics`).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INSTANCES_RECEIVED = Counter(
    "curia_instances_received", "Instances stored (Success)", ["transport"]
)
BYTES_RECEIVED = Counter("curia_bytes_received", "Bytes of instances stored", ["transport"])
STORE_FAILURES = Counter(
    "curia_store_failures", "Instances refused, by C-STORE status", ["transport", "status"]
)
ASSOCIATIONS = Counter("curia_associations", "DIMSE associations by outcome", ["outcome"])
STAGE_SECONDS = Histogram(
    "curia_stage_seconds",
    "Pipeline stage duration",
    ["stage"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
DELIVERY_FAILURES = Counter("curia_delivery_failures", "Failed sends", ["destination"])
