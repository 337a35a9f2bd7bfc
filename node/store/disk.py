"""The disk guard: never accept what cannot be kept.

Below ``dicom.min_free_mb`` of free space in the data folder, C-STOREs are answered
0xA700 (out of resources) and new associations are refused as transient congestion, so a
sender retries later instead of believing a study was stored.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DiskGuard:
    path: Path
    min_free_bytes: int

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def can_accept(self, incoming: int = 0) -> bool:
        """True if ``incoming`` more bytes still leave the watermark free."""
        return self.free_bytes() - incoming >= self.min_free_bytes
