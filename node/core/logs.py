"""Logging set-up: readable text for a terminal, or one JSON object per line for a collector.

Log records never carry patient data (names, IDs, dates of birth): modules log AE titles,
addresses, counts and catalogue ids only, and the end-to-end tests check every line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "thread"[, "exception"]}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RepeatedWarnings(logging.Filter):
    """Summarises a library's per-file warnings instead of logging one line per file.

    pydicom warns about each file it reads leniently ("Expected implicit VR, but found
    explicit VR"): a scanner that writes every file that way would fill the log with one
    line per slice. Inside :meth:`scope` (one series being read) each distinct message is
    counted and logged once when the scope ends, with its count. Outside a scope the first
    occurrence of a message is logged, and repeats only as a count at most once per
    ``interval`` seconds.
    """

    def __init__(self, interval: float = 600.0) -> None:
        super().__init__()
        self.interval = interval
        self._local = threading.local()
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (logged at, repeats since)

    def filter(self, record: logging.LogRecord) -> bool:
        counts: Counter[str] | None = getattr(self._local, "counts", None)
        message = record.getMessage()
        if counts is not None:
            counts[message] += 1
            return False
        now = time.monotonic()
        with self._lock:
            logged_at, repeats = self._seen.get(message, (None, 0))
            if logged_at is not None and now - logged_at < self.interval:
                self._seen[message] = (logged_at, repeats + 1)
                return False
            self._seen[message] = (now, 0)
        if repeats:
            record.msg, record.args = f"{message} (and {repeats} time(s) more before)", None
        return True

    @contextmanager
    def scope(self, what: str, logger: logging.Logger) -> Iterator[None]:
        """Collect the warnings of this thread while reading ``what`` (e.g. ``series 12``),
        then log each distinct one once, with how often it came."""
        outer = getattr(self._local, "counts", None)
        self._local.counts = Counter()
        try:
            yield
        finally:
            counts, self._local.counts = self._local.counts, outer
            for message, n in counts.items():
                logger.warning("%s: %s (%d file(s))", what, message, n)


#: The library loggers whose per-file warnings are summarised.
SUMMARISED_LOGGERS = ("pydicom",)
_REPEATED = RepeatedWarnings()


@contextmanager
def warnings_summarised(what: str) -> Iterator[None]:
    """Read the files of one series (``what`` names it, e.g. ``series 12``) with pydicom's
    per-file warnings summarised: each distinct warning is logged once, with its count."""
    with _REPEATED.scope(what, logging.getLogger("pydicom")):
        yield


def summarise_library_warnings() -> None:
    """Install the summary of per-file library warnings (idempotent; every process that
    reads DICOM files calls it: the node and separate workers)."""
    for name in SUMMARISED_LOGGERS:
        library = logging.getLogger(name)
        if _REPEATED not in library.filters:
            library.addFilter(_REPEATED)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    summarise_library_warnings()
