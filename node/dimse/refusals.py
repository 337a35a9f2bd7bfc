"""Refused associations counted in memory and written to the catalogue in batches.

A sender that is not allowed can retry as fast as the network lets it. Each refusal adds one
to a counter for (period, calling AE title, address, reason); the counters reach the
catalogue a few seconds later in one transaction, so a flood of refusals costs one UPDATE
per distinct key and period, not one row each. Tallies older than the retention are
deleted as new ones are written.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from node.catalogue.db import Catalogue
from node.catalogue.refusals import TallyKey, add_refusals, prune_refusals
from node.core.logs import escape

log = logging.getLogger(__name__)

PERIOD = timedelta(minutes=10)  # one row per key in each period
FLUSH_SECONDS = 2.0  # counts wait this long in memory before they are written
PRUNE_SECONDS = 3600.0  # between two deletions of old tallies
MAX_KEYS = 10000  # distinct keys held between two writes; past this, new keys are summed


class RefusalTally:
    """Counts refusals and writes them to the catalogue from a short-lived timer thread."""

    def __init__(self, catalogue: Catalogue, retention: timedelta) -> None:
        self.catalogue = catalogue
        self.retention = retention
        self._lock = threading.Lock()
        self._counts: dict[TallyKey, tuple[int, datetime]] = {}
        self._timer: threading.Timer | None = None
        self._pruned = 0.0

    def add(self, calling_ae_title: str, address: str, reason: str) -> None:
        now = datetime.now(UTC)
        period = datetime.fromtimestamp(
            now.timestamp() // PERIOD.total_seconds() * PERIOD.total_seconds(), UTC
        )
        key: TallyKey = (period, escape(calling_ae_title)[:16], address[:64], reason[:200])
        with self._lock:
            if key not in self._counts and len(self._counts) >= MAX_KEYS:
                key = (period, "*", "*", "(too many distinct senders)")
            count, _ = self._counts.get(key, (0, now))
            self._counts[key] = (count + 1, now)
            if self._timer is None:
                self._timer = threading.Timer(FLUSH_SECONDS, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write what was counted (and prune old tallies, at most hourly)."""
        with self._lock:
            counts, self._counts, self._timer = self._counts, {}, None
        if not counts:
            return
        try:
            add_refusals(self.catalogue, counts)
            if time.monotonic() - self._pruned > PRUNE_SECONDS:
                self._pruned = time.monotonic()
                prune_refusals(self.catalogue, datetime.now(UTC) - self.retention)
        except Exception as exc:  # the catalogue is down: these counts are lost, said once
            log.error("cannot record %d refused association tallies: %s", len(counts), exc)
