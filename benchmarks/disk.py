"""What a disk was asked to do while a benchmark ran, read from /proc/diskstats (Linux).

A receiver that answers before its bytes reach the disk (DCMTK's storescp writes into the
page cache) and one that makes them durable first (the node) load the disk differently; the
rates alone do not show it. Counting the device's writes while each one receives does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512  # /proc/diskstats counts in 512-byte sectors, whatever the device's own size


@dataclass
class DiskCounters:
    """Totals for one block device since it appeared; subtract two readings."""

    bytes_written: int = 0
    flushes: int = 0
    busy_ms: int = 0  # time with at least one request in flight

    def __sub__(self, other: DiskCounters) -> DiskCounters:
        return DiskCounters(
            self.bytes_written - other.bytes_written,
            self.flushes - other.flushes,
            self.busy_ms - other.busy_ms,
        )

    def __add__(self, other: DiskCounters) -> DiskCounters:
        return DiskCounters(
            self.bytes_written + other.bytes_written,
            self.flushes + other.flushes,
            self.busy_ms + other.busy_ms,
        )


def device_of(path: Path) -> tuple[int, int]:
    """The (major, minor) numbers of the device holding ``path``."""
    dev = os.stat(path).st_dev
    return os.major(dev), os.minor(dev)


def read_counters(device: tuple[int, int]) -> DiskCounters | None:
    """The device's counters now; None where /proc/diskstats does not list it (a file
    system on no block device, such as tmpfs or overlayfs)."""
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 14 or (int(fields[0]), int(fields[1])) != device:
            continue
        flushes = int(fields[18]) if len(fields) > 18 else 0  # Linux 5.5 and later
        return DiskCounters(int(fields[9]) * SECTOR, flushes, int(fields[12]))
    return None


def creation_us(folder: Path, files: int = 300) -> float:
    """Microseconds to create each of ``files`` empty files in ``folder`` (new; kept).

    Every receiver here creates a file per instance (storescp as it receives, the node's
    filer behind its journal). On ext4 without a journal, a new file skips the inodes freed
    in the last half minute (five and a half while their table's block waits to be written
    back), each looked up in the buffer cache: on a 2-core guest, 70-124 us per file for
    about four and a half minutes after another run's clean-up, then 6-18 us."""
    folder.mkdir()
    started = time.perf_counter()
    for number in range(files):
        os.close(os.open(folder / str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return (time.perf_counter() - started) * 1e6 / files
