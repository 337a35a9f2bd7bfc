"""The disk guard's watermark: exact near it, and cheap far from it (the file system asked
at most once a second there, not once per instance)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from node.store import disk
from node.store.disk import MARGIN_BYTES, RECHECK_SECONDS, DiskGuard

Usage = namedtuple("Usage", "total used free")
MIB = 1 << 20
WATERMARK = 1024 * MIB


class _Disk:
    """A file system whose free space the test sets, counting how often it is asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
        self.free, self.asked, self.now = free, 0, 1000.0
        monkeypatch.setattr(disk.shutil, "disk_usage", self._usage)
        monkeypatch.setattr(disk.time, "monotonic", lambda: self.now)

    def _usage(self, path: Path) -> Usage:
        self.asked += 1
        return Usage(1 << 40, 0, self.free)


def _guarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free: int) -> tuple[_Disk, DiskGuard]:
    """A guard with the usual watermark on a file system with ``free`` bytes free."""
    return _Disk(monkeypatch, free), DiskGuard(tmp_path, WATERMARK)


def test_far_above_the_watermark_the_file_system_is_asked_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, guard = _guarded(monkeypatch, tmp_path, WATERMARK + 100 * MARGIN_BYTES)
    assert all(guard.can_accept(MIB // 2) for _ in range(1000))
    assert fs.asked == 1
    fs.now += RECHECK_SECONDS
    assert guard.can_accept(MIB // 2)
    assert fs.asked == 2, "a reading older than a second is not trusted"


def test_near_the_watermark_every_question_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, guard = _guarded(monkeypatch, tmp_path, WATERMARK + 10 * MIB)
    assert guard.can_accept(10 * MIB), "exactly at the watermark after it: accepted"
    assert not guard.can_accept(10 * MIB + 1)
    assert fs.asked == 2
    fs.free = WATERMARK - 1  # something else filled the disk
    assert not guard.can_accept(), "a new association is refused at once"
    assert fs.asked == 3


def test_what_was_let_in_since_the_reading_brings_the_next_one_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instance let in counts twice (its journal record and its spool file) against
    the last reading, so the guard looks again before the disk can reach the watermark."""
    fs, guard = _guarded(monkeypatch, tmp_path, WATERMARK + MARGIN_BYTES + 10 * MIB)
    assert guard.can_accept(4 * MIB) and fs.asked == 1
    assert guard.can_accept(1 * MIB) and fs.asked == 1, "still a margin's worth above it"
    fs.free -= 10 * MIB  # what was let in took its room
    assert guard.can_accept(1 * MIB)
    assert fs.asked == 2, "8 MiB let in and 1 more leave less than the margin: asked again"


def test_a_raised_watermark_is_honoured_at_the_next_question(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, guard = _guarded(monkeypatch, tmp_path, WATERMARK + 100 * MARGIN_BYTES)
    assert guard.can_accept()
    guard.min_free_bytes = fs.free + 1
    assert not guard.can_accept()
