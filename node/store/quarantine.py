"""The quarantine: bytes the node refused, kept with why, for a while and within a size.

Each refused instance is one record: a line in its day's ``index.jsonl`` (reason, calling AE
title, time, size) and, when the bytes could be a DICOM file (at least a preamble and
``DICM``), one file ``<id>.dcm`` beside it. Anything shorter is junk whose first bytes ride in
the line itself, so a sender that posts thousands of tiny parts costs a line each, not files.

Retention: records older than ``max_age_days`` go, then the oldest go until the quarantine
holds at most ``max_bytes``. :meth:`Quarantine.enforce` applies it (at start, and at most
every few minutes while records are added); ``curia-node quarantine list / purge`` use the
same class.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
SMALLEST_FILE = 132  # a Part 10 file's preamble and "DICM": anything shorter is junk
ENFORCE_EVERY = 300.0  # seconds between two retention passes while records are added


@dataclass(frozen=True)
class Record:
    """One refused instance."""

    id: str
    day: str
    reason: str
    calling_ae_title: str | None
    received_at: str
    size: int
    file: Path | None  # the kept bytes, or None for junk kept in the line


class Quarantine:
    """Records under ``root/<YYYYMMDD>/``; one writer lock per process."""

    def __init__(self, root: Path, max_age_days: float = 30.0, max_bytes: int = 1 << 30) -> None:
        self.root = root
        self.max_age = timedelta(days=max_age_days)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._enforced = 0.0

    def add(
        self, reason: str, calling_ae: str | None, size: int, keep: Any, head: bytes = b""
    ) -> Path:
        """Record a refusal; ``keep(path)`` writes the bytes to ``path`` when ``size`` is a
        file's worth, else ``head`` (the bytes) goes into the line. Returns the record's file,
        or the index holding it."""
        now = datetime.now(UTC)
        folder = self.root / now.strftime("%Y%m%d")
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        entry: dict[str, Any] = {
            "id": name,
            "reason": reason,
            "calling_ae_title": calling_ae,
            "received_at": now.isoformat(),
            "size": size,
        }
        kept = folder / INDEX
        if size >= SMALLEST_FILE:
            kept = folder / f"{name}.dcm"
            keep(kept)
            entry["file"] = kept.name
        else:
            entry["head"] = head[:SMALLEST_FILE].hex()
        line = (json.dumps(entry) + "\n").encode()
        with self._lock:
            fd = os.open(folder / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if time.monotonic() - self._enforced > ENFORCE_EVERY:
            self.enforce()
        return kept

    def records(self) -> Iterator[Record]:
        """Every record, oldest first."""
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            yield from self._records_of(folder)

    def _records_of(self, folder: Path) -> Iterator[Record]:
        index = folder / INDEX
        if not index.is_file():
            return
        for line in index.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                name = entry.get("file")
                yield Record(
                    id=str(entry["id"]),
                    day=folder.name,
                    reason=str(entry["reason"]),
                    calling_ae_title=entry.get("calling_ae_title"),
                    received_at=str(entry["received_at"]),
                    size=int(entry["size"]),
                    file=folder / name if name else None,
                )

    def usage(self) -> int:
        """Bytes on disk under the quarantine."""
        total = 0
        for path in self.root.rglob("*") if self.root.is_dir() else ():
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def purge(self, older_than: timedelta | None = None) -> tuple[int, int]:
        """Remove whole days older than ``older_than`` (all, when None); (records, bytes)."""
        cutoff = None if older_than is None else datetime.now(UTC) - older_than
        removed = freed = 0
        for folder in self._days():
            if cutoff is not None and self._day_end(folder) > cutoff:
                continue
            count, size = self._remove_day(folder)
            removed, freed = removed + count, freed + size
        return removed, freed

    def enforce(self) -> tuple[int, int]:
        """Apply the retention: age first, then size (oldest days first, today's last)."""
        self._enforced = time.monotonic()
        with self._lock:
            removed, freed = self.purge(self.max_age)
            days = self._days()
            sizes = {folder: _folder_size(folder) for folder in days}
            total = sum(sizes.values())
            for folder in days:
                if total <= self.max_bytes:
                    break
                count, size = self._remove_day(folder)
                removed, freed, total = removed + count, freed + size, total - sizes[folder]
        if removed:
            log.info("quarantine retention removed %d record(s), %d bytes", removed, freed)
        return removed, freed

    def _days(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    @staticmethod
    def _day_end(folder: Path) -> datetime:
        try:
            return datetime.strptime(folder.name, "%Y%m%d").replace(tzinfo=UTC) + timedelta(1)
        except ValueError:
            return datetime.now(UTC)

    def _remove_day(self, folder: Path) -> tuple[int, int]:
        count = sum(1 for _ in self._records_of(folder))
        size = _folder_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return count, size


def _folder_size(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                total += entry.stat().st_size
    return total
