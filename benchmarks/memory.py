"""Memory and processor time of the processes a benchmark measures, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory of a process so far (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its children (``storescp --fork`` forks one per
    association), read from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if int(entry.name) == root or ppid == root:
            total += _rss(entry)
    return total


def _rss(proc: Path) -> int:
    try:
        stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(stat[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """User and system processor seconds of a process so far; 0 for none, or one gone."""
    if pid is None:
        return 0.0, 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(stat[11]) / tick, int(stat[12]) / tick


class HighWater:
    """The peak resident sizes of processes while the block runs, summed: each one's
    high-water mark (``VmHWM``), reset on entry where the kernel allows it.

    For the process that hosts the receiver measured: read once at the end, it takes
    nothing from that process while it runs, where sampling every 20 ms from a thread of
    its own took the interpreter lock from the receiver's threads (a twentieth of the
    samples that held it, ten senders). The sum of the peaks is at least the peak of the
    sum: it may overstate, never understate."""

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids, self.peak = pids, 0.0

    def __enter__(self) -> HighWater:
        for pid in self.pids:
            # "5": reset the peak to the current resident size (Linux 4.0 and later);
            # where refused, the peak since the process started
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        return self

    def __exit__(self, *_: object) -> None:
        self.peak = sum(peak_rss_mib(pid) for pid in self.pids)

    @property
    def mib(self) -> float:
        return self.peak


class PeakRss:
    """The largest resident size of a process and its children while it is running,
    sampled every 20 ms (for a process whose children come and go: ``storescp --fork``;
    for one that lasts, :class:`HighWater` reads its peak without sampling)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._stop.wait(0.02):
                return

    @property
    def mib(self) -> float:
        return self.peak / (1 << 20)
