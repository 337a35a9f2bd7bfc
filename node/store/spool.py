"""The spool: received DICOM files, written so that a Success status is never a lie.

Every file written here is written to a temporary name, fsynced, renamed into place and its
folder fsynced, so after a crash a final name always holds complete bytes. (The ingest
journal's filer writes its files in place instead, :mod:`node.store.write_ahead`: the
journal holds their bytes until they are synced, and a file a crash cut short is written
again from it at start-up, before anything reads the spool.) Paths are built only from
validated UIDs.

Bytes that arrive as a stream (STOW-RS) are staged: written and hashed as they come, to a
file under ``<spool>/.incoming`` (same file system, so placing is a rename), fsynced when
complete and renamed into place in batches, with one fsync per folder touched.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.core.settings import Settings
from node.core.uids import validate_uid
from node.store.quarantine import SMALLEST_FILE, Quarantine

log = logging.getLogger(__name__)

STAGING_DIR = ".incoming"  # under the spool root; no UID starts with a dot
STALE_STAGED_SECONDS = 24 * 3600  # staged files this old are leftovers of a crash
_COPY_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str | None  # None: not computed (filed from the journal; see the catalogue's)


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of the file at ``path``, read in chunks; None where it cannot be read."""
    try:
        with open(path, "rb") as fp:
            return hashlib.file_digest(fp, "sha256").hexdigest()
    except OSError:
        return None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def temporary_beside(path: Path) -> Path:
    """A new, unique name in ``path``'s folder to write its bytes under before renaming
    them to ``path``: hidden, so that listings of the spool skip it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def leftovers_beside(path: Path) -> list[Path]:
    """The :func:`temporary_beside` files of ``path`` still there: a crash cut them short
    before their rename."""
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + rename + dir fsync)."""
    tmp = temporary_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StagedFile:
    """Bytes on their way into the spool, hashed while they are written.

    One thread at a time uses it: the writer, then whoever syncs and places it. Until it is
    placed it is only a staging file, never catalogued; :meth:`discard` removes it.
    """

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.size = 0
        self.placed = False
        self._mode = mode
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise ValueError("the staged file is closed for writing")
        _write_all(self._fd, data)
        self._hash.update(data)
        self.size += len(data)

    def close(self) -> None:
        """Stop writing; the bytes stay staged."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def sync(self) -> None:
        """Make the staged bytes durable, and stop writing."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(self._fd)
        finally:
            self.close()

    def move_to(self, target: Path) -> None:
        """Rename into ``target`` (replacing it); the caller fsyncs ``target``'s folder."""
        self.close()
        try:
            os.replace(self.path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_to(target)  # another file system (a separately mounted quarantine)
            self.path.unlink(missing_ok=True)
        self.path = target
        self.placed = True

    def _copy_to(self, target: Path) -> None:
        tmp = temporary_beside(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._mode)
        try:
            with self.path.open("rb") as source:
                while chunk := source.read(_COPY_CHUNK):
                    _write_all(fd, chunk)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, target)

    def discard(self) -> None:
        """Remove the staging file unless it was placed; safe to call more than once."""
        self.close()
        if not self.placed:
            self.path.unlink(missing_ok=True)


def spool_for(settings: Settings) -> Spool:
    """The spool and quarantine of a node's data folder, with the configured retention."""
    return Spool(
        settings.spool_dir,
        settings.quarantine_dir,
        settings.quarantine_max_age_days,
        settings.quarantine_max_mb << 20,
    )


class Spool:
    """Files under ``root/<study>/<series>/<sop>.dcm``."""

    def __init__(
        self,
        root: Path,
        quarantine: Path,
        quarantine_max_age_days: float = 30.0,
        quarantine_max_bytes: int = 1 << 30,
    ) -> None:
        self.root = root
        self.quarantine_root = quarantine
        self.quarantined = Quarantine(quarantine, quarantine_max_age_days, quarantine_max_bytes)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._swept = False
        self._staged_names = itertools.count()
        self._staged_token = uuid.uuid4().hex[:12]

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

    def stage(self) -> StagedFile:
        """A new staging file, to be written, synced, then placed or discarded."""
        folder = self.root / STAGING_DIR
        self._ensure_dir(folder)
        if not self._swept:
            self._swept = True
            self._sweep(folder)
        # Unique without a random draw per part; the pid tells forked processes apart.
        name = f"{os.getpid()}-{self._staged_token}-{next(self._staged_names)}.part"
        return StagedFile(folder / name)

    def _sweep(self, folder: Path) -> None:
        """Remove staging files a crash left behind (old enough to belong to no request)."""
        cutoff = time.time() - STALE_STAGED_SECONDS
        for path in folder.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError as exc:
                log.warning("cannot remove stale staging file %s: %s", path.name, exc)

    def place(self, staged: Sequence[tuple[StagedFile, str]]) -> list[StoredFile | OSError]:
        """Rename synced staged files to their relative paths (replacing what is there).

        On return every placed name is durable: each folder touched is fsynced once. An item
        that could not be placed gets its error instead of a :class:`StoredFile`.
        """
        results: list[StoredFile | OSError] = []
        folders: dict[Path, list[int]] = {}
        for index, (item, relative) in enumerate(staged):
            path = self.root / relative
            try:
                self._ensure_dir(path.parent)
                item.move_to(path)
            except OSError as exc:
                results.append(exc)
                continue
            results.append(StoredFile(relative, item.size, item.sha256))
            folders.setdefault(path.parent, []).append(index)
        for folder, indices in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for index in indices:
                    results[index] = exc
        return results

    def remove(self, *relative_paths: str) -> None:
        """Remove stored files; each folder touched is fsynced once."""
        folders: set[Path] = set()
        for relative_path in relative_paths:
            path = self.root / relative_path
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:
            fsync_dir(folder)

    def quarantine(self, data: bytes, reason: str, calling_ae: str | None) -> Path:
        """Keep bytes the node refused, with why, under a name the node chose (one record:
        see :mod:`node.store.quarantine`)."""
        return self.quarantined.add(
            reason, calling_ae, len(data), lambda path: write_durably(path, data), data
        )

    def quarantine_staged(self, staged: StagedFile, reason: str, calling_ae: str | None) -> Path:
        """:meth:`quarantine` for staged bytes: moved, not copied (junk too short to be a
        file is read into its record and the staged file removed)."""

        def keep(path: Path) -> None:
            staged.sync()
            staged.move_to(path)
            fsync_dir(path.parent)

        head = b""
        if staged.size < SMALLEST_FILE:
            staged.close()
            head = staged.path.read_bytes()
        kept = self.quarantined.add(reason, calling_ae, staged.size, keep, head)
        if head or staged.size < SMALLEST_FILE:
            staged.discard()
        return kept
