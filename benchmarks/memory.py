"""Memory and processor time of the processes a benchmark measures, read from /proc (Linux),
the processor time the host of a virtual machine took from it, and the machine's free
memory filled with page cache before anything is timed."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
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


def machine_ticks() -> tuple[int, int]:
    """All the processors' ticks so far and those stolen (``/proc/stat``'s first line: time
    a virtual machine's processors were ready to run but the host ran something else);
    (0, 0) where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice, counted in user]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


class Steal:
    """The share of the processors' time the host took while timed sections ran, summed
    over them: a receiver timed while the host took a fifth of the machine ran on four
    fifths of it, which a ratio taken at another moment does not show."""

    def __init__(self) -> None:
        self.ticks = self.stolen = 0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        ticks, stolen = machine_ticks()
        try:
            yield
        finally:
            after, after_stolen = machine_ticks()
            self.ticks += after - ticks
            self.stolen += after_stolen - stolen

    @property
    def percent(self) -> float:
        return 100 * self.stolen / self.ticks if self.ticks else 0.0


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


def fill_memory(work: Path, margin: int = 1 << 30) -> None:
    """Fill the machine's free memory, but ``margin``, with page cache that costs no disk
    (a sparse file read through, kept until the end), as a server's memory is once it has
    run a while: every receiver then gets its pages by reclaiming cache.

    On a virtual machine whose host takes freed memory back (free page reporting), a page
    never touched, or freed a while ago, costs the host a fault the first time it is
    written: receivers that take fresh pages for the page cache paid 1 to 1.5 ms of system
    time per 513 KiB instance for it (storescp --fork 752-844/s in two runs, 1,886/s in a
    third, once earlier runs had filled the memory). Measured so, no receiver's pace
    depends on how much memory the ones before it left untouched."""
    free = _meminfo_bytes("MemFree") - margin
    if free <= 0:
        return
    path = work / "memory.fill"
    with open(path, "wb") as out:
        out.truncate(free)
    started = time.perf_counter()
    chunk = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as source:
        while source.readinto(chunk):
            pass
    print(
        f"memory: {free / (1 << 30):.1f} GiB of free memory filled with page cache in "
        f"{time.perf_counter() - started:.0f} s (a sparse file read through; left free "
        f"{_meminfo_bytes('MemFree') / (1 << 30):.1f} GiB)"
    )


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")
