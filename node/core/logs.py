"""Logging set-up: readable text for a terminal, or one JSON object per line for a collector.

Log records never carry patient data (names, IDs, dates of birth): modules log AE titles,
addresses, counts and catalogue ids only, and the end-to-end tests check every line.

What a sender puts on the wire (an AE title, a reason, an HTTP path) can hold any byte: both
formatters escape control and non-ASCII characters in the message (and in a traceback, each
exception's message whole), so one log line stays one line and a terminal never receives an
escape sequence. The HTTP server's own loggers write through the same handler
(:data:`SERVER_LOGGERS`). Events a stranger can repeat at will (refused
associations, closed connections) go through :class:`Throttle`, so they cannot flood the log.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def escape(text: str) -> str:
    """``text`` with every character outside printable ASCII written as a Python escape."""
    return _UNSAFE.sub(_escaped, text)


def escape_lines(text: str) -> str:
    """``text`` escaped line by line, its line breaks kept."""
    return "\n".join(escape(line) for line in text.split("\n"))


def format_traceback(ei: Any) -> str:
    """A traceback as Python prints it, but each exception's message escaped whole, line
    breaks included: a message can carry bytes from the wire (a path, a header), and a line
    break in it must not start a line that reads like a record of its own. The frames, which
    come from the code, keep their lines (escaped too)."""
    exception = traceback.TracebackException(*ei[:3], compact=True)
    if _has_groups(exception):  # exception groups: Python's layout, line by line
        return escape_lines("".join(exception.format()).rstrip("\n"))
    return "\n".join(_traceback_lines(exception))


def _has_groups(exception: traceback.TracebackException) -> bool:
    while exception is not None:
        if exception.exceptions:
            return True
        exception = exception.__cause__ or exception.__context__  # type: ignore[assignment]
    return False


def _traceback_lines(exception: traceback.TracebackException) -> list[str]:
    lines: list[str] = []
    if exception.__cause__ is not None:
        lines += _traceback_lines(exception.__cause__)
        lines += ["", "The above exception was the direct cause of the following exception:", ""]
    elif exception.__context__ is not None and not exception.__suppress_context__:
        lines += _traceback_lines(exception.__context__)
        lines += ["", "During handling of the above exception, another exception occurred:", ""]
    if exception.stack:
        lines.append("Traceback (most recent call last):")
        lines += escape_lines("".join(exception.stack.format()).rstrip("\n")).split("\n")
    lines += [escape(part.rstrip("\n")) for part in exception.format_exception_only()]
    return lines


def _escaped_record(record: logging.LogRecord) -> logging.LogRecord:
    clean = copy.copy(record)
    clean.msg, clean.args = escape(record.getMessage()), None
    return clean


class TextFormatter(logging.Formatter):
    """The standard text format with the message escaped, and tracebacks line by line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(_escaped_record(record))

    def formatException(self, ei: Any) -> str:
        return format_traceback(ei)

    def formatStack(self, stack_info: str) -> str:
        return escape_lines(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "thread"[, "exception"]}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = format_traceback(record.exc_info)
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


#: The HTTP server's loggers. uvicorn gives them handlers and formatters of its own unless it
#: is started with ``log_config=None`` (as the node does); they write through the root
#: handler instead, so their lines (a request line, an exception in the application) are
#: escaped like any other.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in SERVER_LOGGERS:
        server = logging.getLogger(name)
        server.handlers[:] = []
        server.propagate = True
    summarise_library_warnings()


class Throttle:
    """At most ``burst`` lines per key in each ``interval`` seconds; the lines held back are
    counted and the count is added to the key's next line that is written."""

    def __init__(
        self, logger: logging.Logger, interval: float = 60.0, burst: int = 3, keys: int = 4096
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.keys = keys
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # key: [window start, lines, held back]

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log the line unless its key is over the limit; True when it was written."""
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            held = 0
            if window is None or now - window[0] >= self.interval:
                held = int(window[2]) if window else 0
                if window is None and len(self._windows) >= self.keys:
                    self._windows.pop(next(iter(self._windows)))  # the oldest key
                window = self._windows[key] = [now, 0, 0]
            window[1] += 1
            if window[1] > self.burst:
                window[2] += 1
                return False
        if held:
            msg, args = msg + " (%d like it not logged in the last interval)", (*args, held)
        self.logger.log(level, msg, *args)
        return True
