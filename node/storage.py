"""The spool: received DICOM files, written so that a Success status is never a lie.

Every file is written to a temporary name in its final folder, fsynced, renamed into
place and its folder fsynced, so after a crash a final name always holds complete bytes.
Paths are built only from validated UIDs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from node.uids import validate_uid


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + rename + dir fsync)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Spool:
    """Files under ``root/<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path, quarantine: Path) -> None:
        self.root = root
        self.quarantine_root = quarantine
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for value, name in (
            (study_uid, "StudyInstanceUID"),
            (series_uid, "SeriesInstanceUID"),
            (sop_uid, "SOPInstanceUID"),
        ):
            validate_uid(value, name)
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` and make each new level durable in its parent (once per run)."""
        if folder in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            current = folder
            while not current.exists():
                missing.append(current)
                current = current.parent
            folder.mkdir(parents=True, exist_ok=True)
            for created in reversed(missing):
                fsync_dir(created.parent)
            self._known_dirs.add(folder)

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        path = self.root / relative
        self._ensure_dir(path.parent)
        write_durably(path, data)
        return StoredFile(relative, len(data), hashlib.sha256(data).hexdigest())

    def remove(self, relative_path: str) -> None:
        path = self.root / relative_path
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def quarantine(self, data: bytes, reason: str, calling_ae: str | None) -> Path:
        """Keep bytes the node refused, with why, under a name the node chose."""
        day = datetime.now(UTC).strftime("%Y%m%d")
        folder = self.quarantine_root / day
        self._ensure_dir(folder)
        name = uuid.uuid4().hex
        write_durably(folder / f"{name}.dcm", data)
        meta = {
            "reason": reason,
            "calling_ae_title": calling_ae,
            "received_at": datetime.now(UTC).isoformat(),
            "size": len(data),
        }
        write_durably(folder / f"{name}.json", json.dumps(meta, indent=1).encode())
        return folder / f"{name}.dcm"
