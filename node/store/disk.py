"""The disk guard: never accept what cannot be kept.

Below ``dicom.min_free_mb`` of free space in the data folder, C-STOREs are answered
0xA700 (out of resources) and new associations are refused as transient congestion, so a
sender retries later instead of believing a study was stored.

Every instance received asks, so the answer must be cheap: the file system is asked
(``statvfs``) at most once per ``RECHECK_SECONDS`` while the free space, less what was let
in since (twice over: the journal's copy and the spool's), stays ``MARGIN_BYTES`` above the
watermark; nearer to it, at every question. ``statvfs`` lets go of the interpreter lock,
and with ten associations receiving at once each such hand-over is a wait to take it back.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

RECHECK_SECONDS = 1.0
MARGIN_BYTES = 256 << 20  # room for what others write within a second, not counted here
_COPIES = 2  # an instance lets in takes room in the journal, then in the spool


@dataclass
class DiskGuard:
    path: Path
    min_free_bytes: int
    _free: int = field(default=0, init=False, repr=False)  # at the last reading
    _read_at: float = field(default=float("-inf"), init=False, repr=False)
    _let_in: int = field(default=0, init=False, repr=False)  # bytes let in since it

    def free_bytes(self) -> int:
        """The file system's free bytes now (and the guard's reading from then on)."""
        self._free = shutil.disk_usage(self.path).free
        self._read_at = time.monotonic()
        self._let_in = 0
        return self._free

    def can_accept(self, incoming: int = 0) -> bool:
        """True if ``incoming`` more bytes still leave the watermark free (counted as let
        in when they do). Threads may ask at once: a count lost between two of them is one
        instance, far inside the margin, and the next reading starts the count again."""
        fresh = time.monotonic() - self._read_at < RECHECK_SECONDS
        estimate = self._free - self._let_in - incoming  # by the reading, and since
        far = fresh and estimate >= self.min_free_bytes + MARGIN_BYTES
        if not far and self.free_bytes() - incoming < self.min_free_bytes:
            return False
        self._let_in += _COPIES * incoming
        return True
