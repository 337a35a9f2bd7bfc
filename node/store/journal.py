"""A write-ahead journal of received instances: one ``fdatasync`` makes an instance durable.

A Success must not be sent before the instance's bytes and its catalogue record would
survive a power cut. Writing its own file (temporary name, fsync, rename, folder fsync) and
committing its catalogue row costs three or four flushes of the disk per instance; appending
bytes and record together to a preallocated file costs one, and one flush covers every
instance written before it (group commit: the threads of concurrent associations share it).

A segment is a file allocated and fsynced when it is created, so that an append changes no
metadata but the extents it fills. Each record starts on a 4 KiB boundary::

    magic "CJR2" | segment key (u64) | meta length (u32) | payload length (u64)
    | CRC-32 of the payload (u32) | CRC-32 of the fields before it and the meta (u32)
    | meta (JSON: the instance's header and where it goes) | payload (Part 10 bytes)

The listener computes the payload's CRC-32 as its PDVs arrive; the catalogue's SHA-256 is
computed behind the journal, by the filer. Records of the first format ("CJR1", the
payload's SHA-256 in place of its CRC-32) are still read.

A record may instead be written as its instance arrives (:meth:`Journal.reserve`): its
payload first, in whole pages started on their way to the disk while the rest is still on
the network, then its meta, and its head last, in a page of its own before both ("CJR3",
the same fields)::

    head page | payload (Part 10 bytes) | meta

The flush after the last byte then finds most of the instance written already.

Recovery reads every 4 KiB boundary of every segment left behind and keeps the records
whose checksums hold, so a record cut short by a crash (never answered with Success) costs
nothing but itself. So it also reads bytes a sender chose: a record cut short, or what a
reused segment held in its earlier life, may hold what looks like a record. Each life of a
segment therefore has a random 64-bit key, in its file name (``NUMBER-KEY.journal``) and in
every head written during it, and a head with another key is not read: no sender can
know the key of a life that has not begun. (Segments named by their number alone, of an
earlier version, have their number as their key.)

Records are materialised behind the journal (:mod:`node.store.ingest`): their spool file
written and catalogue row committed; a segment is deleted once all its records are
materialised and their files synced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.store.buffers import Buffer, checksum_of, pwrite_parts, size_of
from node.store.buffers import slice_of as _slice
from node.store.checksum import crc32 as _crc32
from node.store.spool import fsync_dir
from node.store.syscalls import start_write_out, write_out

try:  # built by setup.py where there is a C compiler; else the same in Python
    from node.store import _flush  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised where the module is not built
    _flush = None

log = logging.getLogger(__name__)

MAGIC, MAGIC_V1, MAGIC_STREAMED = b"CJR2", b"CJR1", b"CJR3"
ALIGN = 4096
SEGMENT_BYTES = 128 << 20
# Retired segments kept for reuse (their blocks written, or nearly): 2 GiB, which is also as
# much as a burst may fill before the filer starts (write_ahead.FILING_BACKLOG_BYTES), so
# that a burst appends to files whose blocks and cached pages it already has. Removing a
# segment frees its cached pages; a virtual machine whose host takes freed memory back
# (free page reporting) then pays for every page of the next segment anew: ten senders into
# a 2-core VM with 4 kept fell to 534-669/s in one turn of three (the copies into the page
# cache 37 % of the listener's processor time, its system time 1.4-2.1 ms per instance),
# and received 903-1,026/s in every turn with 16 (0.5 ms).
SPARE_SEGMENTS = 16
# A record written as it arrives is written this much at a time, or more, each write then
# started on its way to the disk (sync_file_range): each call costs the association's thread
# more than its bytes do (on a virtual machine, a notification of the host's disk among it).
# With 256 KiB steps the thread's time in those two calls fell by about a quarter (perf), and
# one association sending 513 KiB slices into a 2-core VM, alternated in one process, 8 pairs
# each, received a median 1.08 x faster with 256 KiB steps than with 64 KiB, 1.10 x than
# with 128 KiB and 1.14 x than with none before the last byte; 192 and 384 KiB within the
# noise of 256 (1.03, 0.97); ten senders (one streams at a time) 1.04.
PLACE_STEP = 256 << 10
# Flushes in flight at once: an append that finds fewer running starts its own beside them
# rather than waiting for one to end and then flushing (see Journal._sync). Ten senders into
# a 2-core VM whose disk flushes slowly (a 513 KiB append and flush about 1 ms), alternated
# in one process, 20 pairs in three runs: 4 against 2 a median 1.04 x (14 of 20 above 1,
# 0.82-1.38); 8 against 4 0.96 x (6 pairs). One association has one in flight at most.
FLUSHES_AT_ONCE = 4
_ZERO_CHUNK = 1 << 20  # a spare is zero-filled this much at a time
JOURNAL_DIR = (
    ".journal"  # under the spool root, beside its staging folder; no UID starts with a dot
)
_HEAD = struct.Struct("<4sQIQI")
_HEAD_V1 = struct.Struct("<4sQIQ32s")
_HEAD_CRC = struct.Struct("<I")
HEAD_BYTES = _HEAD.size + _HEAD_CRC.size
# A record's meta, compact; one encoder for all (json.dumps with separators builds one per call).
_META = json.JSONEncoder(separators=(",", ":"))
_SUFFIX = ".journal"
_SPARE = ".spare"  # a retired or zero-filled segment, ready to be renamed and reused


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Segment:
    """One preallocated journal file, appended to until full."""

    number: int
    path: Path
    fd: int
    size: int
    key: int  # this life's, in every head (see the module's docstring)
    end: int = 0  # bytes reserved so far
    full: bool = False
    outstanding: int = 0  # records appended and not yet materialised
    written: list[str] = field(default_factory=list)  # spool files materialised from it
    # group commit: appends finished, and how many of them the last fdatasync covered
    finished: int = 0
    synced: int = 0
    syncing: int = 0  # flushes in flight
    prepared: bool = False  # blocks written beforehand (or nearly): appends change little metadata
    streaming: int = 0  # reservations open: their receivers may still write to it
    flusher: Any = None  # its writes and group commit in C (node.store._flush), where built


@dataclass(eq=False)
class Reservation:
    """Room in a segment for one record written as its instance arrives: a head page,
    then ``capacity`` bytes for its payload and meta. The receiver places the bytes as
    they arrive, and releases the room if the instance is not journalled after all."""

    journal: Journal
    segment: Segment
    offset: int  # of the head page
    capacity: int
    placed: int = 0  # payload bytes written so far (whole pages)
    open: bool = True  # neither committed nor released
    overflowed: bool = False  # outgrew the room (or a write failed): appended instead
    waiting: list[memoryview] = field(default_factory=list)  # fed, not yet written
    waiting_bytes: int = 0

    def feed(self, data: Buffer) -> None:
        """Take the payload's next bytes; its whole pages are written once ``PLACE_STEP``
        of them wait (:meth:`Journal.place`). Past the room nothing more is written, and
        :meth:`Journal.commit` appends the record instead."""
        if not self.open or self.overflowed:
            return
        self.waiting.append(memoryview(data).cast("B"))
        self.waiting_bytes += len(data)
        if self.placed + self.waiting_bytes > self.capacity:
            self.overflowed = True
            self.waiting, self.waiting_bytes = [], 0
            return
        whole = self.waiting_bytes // ALIGN * ALIGN
        if whole >= PLACE_STEP:
            self.journal.place(self, whole)

    def release(self) -> None:
        """See :meth:`Journal.release`."""
        self.journal.release(self)


@dataclass(frozen=True)
class Entry:
    """Where a record was made durable: its segment, and the offset of its payload in it
    (from which the filer reads it back, in a process of its own)."""

    segment: Segment
    payload_at: int


@dataclass(eq=False)
class Answer:
    """A sender's Success response, sent by the journal on ``socket`` the moment a flush
    covers the instance's record (:mod:`node.store._flush`), before the interpreter takes
    the thread back: the bookkeeping of the instance then runs while the sender turns to
    its next one. ``sent`` once it went; ``error``: the errno of a send that failed (the
    record is durable; the connection is not). Not sent where the journal is not compiled,
    or the record not committed: the caller answers, as usual."""

    socket: int
    pdus: bytes
    sent: bool = False
    error: int = 0


@dataclass(frozen=True)
class Record:
    """A record read back from a segment: its meta, payload, and the segment it is in."""

    segment: int
    meta: dict[str, Any]
    payload: bytes


class JournalError(OSError):
    """The journal cannot take a record now (its disk refused a write or a flush)."""


def _flusher(fd: int) -> Any:
    """A segment's compiled writer and group commit, or None where it is not built."""
    return None if _flush is None else _flush.Flusher(fd, FLUSHES_AT_ONCE)


class Journal:
    """Appends records durably; safe to call from many threads.

    :meth:`recover` must be called once, before the first :meth:`append`: it returns the
    records a previous run left behind, which the caller materialises, then :meth:`retire`
    removes their segments.
    """

    def __init__(self, folder: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._flushes = 0  # fdatasyncs in flight
        self._current: Segment | None = None
        self._next_number = 1
        self._old: list[Path] = []
        self._full: list[Segment] = []
        self._spares: list[Path] = []  # prepared segments, ready to be renamed and used
        self._preparing: threading.Thread | None = None
        self._closed = False

    # -- recovery

    def recover(self) -> Iterator[Record]:
        """The valid records of the segments a previous run left, oldest first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.folder.parent)
        for path in self.folder.glob("*.tmp"):  # a spare cut short while it was zero-filled
            path.unlink(missing_ok=True)
        # A spare keeps the number it last had: numbers only grow, so records of a reused
        # segment's earlier life can never carry the number it is given again.
        numbers = [0]
        for path in self.folder.glob(f"*{_SPARE}"):
            named = _parse_name(path.stem)
            if named is not None:
                numbers.append(named[0])
            if path.stat().st_size == self.segment_bytes:
                self._spares.append(path)
            else:  # made for another segment size
                path.unlink()
        found = sorted(
            (*named, path)
            for path in self.folder.glob(f"*{_SUFFIX}")
            if (named := _parse_name(path.stem)) is not None
        )
        self._old = [path for _, _, path in found]
        self._next_number = max(numbers + [number for number, _, _ in found]) + 1
        for number, key, path in found:
            yield from _read_segment(number, key, path)

    def retire_recovered(self) -> None:
        """Remove the segments :meth:`recover` read, once their records are materialised
        and synced."""
        for path in self._old:
            path.unlink(missing_ok=True)
        if self._old:
            fsync_dir(self.folder)
        self._old = []

    # -- appending

    def append(
        self,
        meta: dict[str, Any],
        payload: Sequence[Buffer],
        crc32: int | None = None,
        answer: Answer | None = None,
    ) -> Entry:
        """Write one record and return once it is durable: where it is (its segment's
        ``outstanding`` count already includes the record). ``crc32``: the payload's, where
        the caller has it already (computed as the bytes arrived); ``answer``: sent once it
        is durable, where the journal is compiled (see :class:`Answer`)."""
        meta_bytes = _META.encode(meta).encode()
        size = size_of(payload)
        length = HEAD_BYTES + len(meta_bytes) + size
        if length > self.segment_bytes:
            raise ValueError(f"a record of {length} bytes does not fit a journal segment")
        with self._lock:
            segment = self._room(length)
            offset = segment.end
            segment.end += _aligned(length)
            segment.outstanding += 1
        try:
            if crc32 is None:
                crc32 = checksum_of(payload)
            head = _head(MAGIC, segment.key, meta_bytes, size, crc32)
            # Padded to whole pages: a page written in part is read from disk first.
            padding = _zeros()[: _aligned(length) - length]
            parts: list[Buffer] = [head, meta_bytes, *payload, padding]
        except BaseException:
            with self._lock:
                segment.outstanding -= 1
            raise
        self._durable(segment, [(offset, parts)], answer)
        return Entry(segment, offset + HEAD_BYTES + len(meta_bytes))

    # -- writing as the instance arrives

    def reserve(self, capacity: int) -> Reservation | None:
        """Room for a record whose payload and meta take ``capacity`` bytes at most (a
        segment's worth at most); None once the journal is closed."""
        capacity = min(_aligned(capacity), self.segment_bytes - ALIGN)
        with self._lock:
            if self._closed:
                return None
            segment = self._room(ALIGN + capacity)
            offset = segment.end
            segment.end += ALIGN + capacity
            segment.outstanding += 1
            segment.streaming += 1
        return Reservation(self, segment, offset, capacity)

    def place(self, reservation: Reservation, length: int) -> None:
        """Write the first ``length`` bytes waiting in a reservation (whole pages) and
        start them on their way to the disk without waiting for them."""
        waiting = reservation.waiting
        fd, start = reservation.segment.fd, reservation.offset + ALIGN + reservation.placed
        try:
            self._write(fd, _slice(waiting, 0, length), start)
            start_write_out(fd, start, length)
        except OSError as exc:  # the commit appends it the usual way, or says why it cannot
            log.debug("cannot write a journal record as it arrives: %s", exc)
            reservation.overflowed = True
            reservation.waiting, reservation.waiting_bytes = [], 0
            return
        reservation.placed += length
        reservation.waiting = _slice(waiting, length, reservation.waiting_bytes)
        reservation.waiting_bytes -= length

    def commit(
        self,
        reservation: Reservation,
        meta: dict[str, Any],
        payload: Sequence[Buffer],
        crc32: int | None = None,
        answer: Answer | None = None,
    ) -> Entry:
        """Finish a reserved record with the whole ``payload`` (its parts, one after the
        other; its first pages placed already) and return once it is durable, as
        :meth:`append` does. One that outgrew its room is appended the usual way, and its
        room given back."""
        meta_bytes = _META.encode(meta).encode()
        size = size_of(payload)
        length = size + len(meta_bytes)
        if not reservation.open or reservation.overflowed or length > reservation.capacity:
            try:
                return self.append(meta, payload, crc32, answer)
            finally:
                self.release(reservation)
        segment = reservation.segment
        try:
            if crc32 is None:
                crc32 = checksum_of(payload)
            head = _head(MAGIC_STREAMED, segment.key, meta_bytes, size, crc32)
            padding = _zeros()[: _aligned(length) - length]
            rest: list[Buffer] = [*_slice(payload, reservation.placed, size), meta_bytes, padding]
            start = reservation.offset + ALIGN + reservation.placed
            page: list[Buffer] = [head, _zeros()[: ALIGN - HEAD_BYTES]]
        except BaseException:
            self.release(reservation)
            raise
        with self._lock:
            reservation.open = False
            reservation.waiting, reservation.waiting_bytes = [], 0
            segment.streaming -= 1
            self._shrink(reservation, ALIGN + _aligned(length))
        # The payload's rest and the meta first, the head page last: a head never names
        # bytes written after it.
        self._durable(segment, [(start, rest), (reservation.offset, page)], answer)
        return Entry(segment, reservation.offset + ALIGN)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation that will not be committed (safe to call again)."""
        with self._lock:
            if not reservation.open:
                return
            reservation.open = False
            reservation.waiting, reservation.waiting_bytes = [], 0
            reservation.segment.outstanding -= 1
            reservation.segment.streaming -= 1
            self._shrink(reservation, 0)

    @staticmethod
    def _shrink(reservation: Reservation, used: int) -> None:
        """Give back the unused end of a reservation that is still its segment's last (the
        lock held); one with records after it keeps its room, never read."""
        segment = reservation.segment
        if segment.end == reservation.offset + ALIGN + reservation.capacity:
            segment.end = reservation.offset + used

    def _room(self, length: int) -> Segment:
        """The segment to append ``length`` bytes to (the lock held): the current one while
        it has room, unless it was merely allocated and a prepared one is ready (an append
        to blocks not yet written also commits the file system's journal: one association
        received 320-354 instances/s filling allocated segments to their end)."""
        segment = self._current
        if (
            segment is not None
            and segment.end + length <= segment.size
            and (segment.prepared or not self._spares)
        ):
            return segment
        if segment is not None:
            segment.full = True
            self._full.append(segment)
        spare = self._take_spare()
        self._current = spare or self._create()
        return self._current

    def _take_spare(self) -> Segment | None:
        """A prepared segment under the next number, or None when there is none."""
        while self._spares:
            spare = self._spares.pop()
            number, key = self._next_number, _new_key()
            path = self.folder / _segment_name(number, key)
            try:
                os.rename(spare, path)
            except OSError as exc:
                log.warning("cannot reuse a spare journal segment: %s", exc)
                spare.unlink(missing_ok=True)
                continue
            self._next_number += 1  # the name is taken, whatever happens next
            fd = -1
            try:
                fd = os.open(path, os.O_RDWR)
                fsync_dir(self.folder)  # its new name is durable before a record needs it
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                path.unlink(missing_ok=True)
                raise JournalError(exc.errno, f"cannot reuse a journal segment: {exc}") from exc
            return Segment(
                number, path, fd, self.segment_bytes, key, prepared=True, flusher=_flusher(fd)
            )
        return None

    def _create(self) -> Segment:
        number, key = self._next_number, _new_key()
        self._next_number += 1
        path = self.folder / _segment_name(number, key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_bytes)
            os.fsync(fd)
            fsync_dir(self.folder)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise JournalError(exc.errno, f"cannot create a journal segment: {exc}") from exc
        return Segment(number, path, fd, self.segment_bytes, key, flusher=_flusher(fd))

    def prepare_spares(self, least: int) -> None:
        """Zero-fill a spare segment in the background while fewer than ``least`` are
        ready, unless one is being made: called while the node is idle, never on an
        append's path.

        Making a spare writes a whole segment's blocks (128 MiB), the disk's time taken from
        the flushes senders wait for. Made whenever an append took the last spare, they
        fell in the middle of bursts: ten senders, their filing held back, received
        336-410 instances/s with spares made as they ran against 578-636/s appending to
        merely allocated segments instead (a 2-core VM whose disk writes about 630 MB/s).
        Retired segments are kept as spares (``SPARE_SEGMENTS``), so under steady load the
        journal reuses its own; zero-filled ones are for a new node, or after a burst."""
        with self._lock:
            if len(self._spares) < least:
                self._prepare_spare()

    def _prepare_spare(self) -> None:
        """Zero-fill a spare segment in the background (the lock held), unless one is
        being made."""
        if self._closed or (self._preparing is not None and self._preparing.is_alive()):
            return
        self._preparing = threading.Thread(
            target=self._zero_fill, name="journal-spare", daemon=True
        )
        self._preparing.start()

    def _zero_fill(self) -> None:
        """Write a spare segment's every block, bypassing the page cache where the file
        system allows (``O_DIRECT``): copying 128 MiB of zeros through it costs as much
        processor time as receiving 128 MiB of instances."""
        path = self.folder / f"{uuid.uuid4().hex}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        direct = hasattr(os, "O_DIRECT") and self.segment_bytes % _ZERO_CHUNK == 0
        try:
            try:
                fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)
            except OSError:  # a file system without direct I/O (tmpfs)
                path.unlink(missing_ok=True)
                fd, direct = os.open(path, flags, 0o600), False
            try:
                for offset in range(0, self.segment_bytes, _ZERO_CHUNK):
                    zeros = _zeros()[: min(_ZERO_CHUNK, self.segment_bytes - offset)]
                    self._zero_chunk(fd, zeros, offset, direct)
                    if self._closed:
                        raise InterruptedError("the journal closed")
                os.fsync(fd)
            finally:
                os.close(fd)
            spare = path.with_name(f"{path.stem}{_SPARE}")
            os.rename(path, spare)
            fsync_dir(self.folder)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if not isinstance(exc, InterruptedError):
                log.warning("cannot prepare a journal segment: %s", exc)
            return
        with self._lock:
            self._spares.append(spare)

    @staticmethod
    def _zero_chunk(fd: int, zeros: memoryview, offset: int, direct: bool) -> None:
        os.pwrite(fd, zeros, offset)
        if not direct:
            # Written out a chunk at a time: the disk's queue never holds more than one of
            # them in front of an append's flush (one fsync of a whole segment written
            # through the page cache held each flush behind it for 70 ms).
            write_out(fd, offset, len(zeros))

    @property
    def streaming(self) -> int:
        """Reservations open: records being written as their bytes arrive."""
        with self._lock:
            return sum(s.streaming for s in (self._current, *self._full) if s is not None)

    @property
    def preparing(self) -> bool:
        """Whether a spare segment is being zero-filled (in the background)."""
        with self._lock:
            return self._preparing is not None and self._preparing.is_alive()

    @property
    def spares(self) -> int:
        """Prepared segments ready for use."""
        with self._lock:
            return len(self._spares)

    @staticmethod
    def _write(fd: int, parts: Sequence[Buffer], offset: int) -> None:
        try:
            pwrite_parts(fd, parts, offset)
        except OSError as exc:
            raise JournalError(exc.errno, f"cannot write to the journal: {exc}") from exc

    def _durable(
        self,
        segment: Segment,
        writes: list[tuple[int, list[Buffer]]],
        answer: Answer | None = None,
    ) -> None:
        """Write each ``(offset, parts)`` of one record, in order, and return once a flush
        covers them: by the compiled writer where it is built (:meth:`_commit_compiled`,
        which also sends ``answer``), else here (:meth:`_write`, then :meth:`_sync`). A
        record whose write failed is no longer counted as outstanding (nothing waits for
        it); one whose flush failed stays counted (it may be on disk: its segment is kept
        until a restart reads it)."""
        if segment.flusher is not None:
            self._commit_compiled(segment, writes, answer)
            return
        try:
            for offset, parts in writes:
                self._write(segment.fd, parts, offset)
        except BaseException:
            with self._lock:
                segment.outstanding -= 1
            raise
        self._sync(segment)

    def _commit_compiled(
        self,
        segment: Segment,
        writes: list[tuple[int, list[Buffer]]],
        answer: Answer | None = None,
    ) -> None:
        """Write each ``(offset, parts)`` of one record and return once a flush covers
        them, in one call of :mod:`node.store._flush` without the interpreter lock (the
        rule of :meth:`_sync`, kept in C): the writes and the flush took the lock back
        after each system call and each wait, from every other association's thread.
        Ten senders into one listener on a 2-core VM, alternated in one process: 8 pairs,
        1.00-1.21, median 1.08 (the association threads' `futex` calls 21 per instance
        down to 15). Failures counted as :meth:`_durable` says.

        With an ``answer``, the same call sends it once the flush covers the record
        (where the acceptor gives one: see ``AssociationAcceptor._early_answer``)."""
        if answer is None:
            status, error = segment.flusher.commit(writes)
        else:
            status, error = segment.flusher.commit(writes, answer.socket, answer.pdus)
            if status == _flush.OK:
                answer.sent = True
            elif status == _flush.UNSENT:  # durable all the same: the connection failed
                answer.error = error
                return
        if status == _flush.WRITE_FAILED:
            with self._lock:
                segment.outstanding -= 1
            raise JournalError(error, f"cannot write to the journal: {os.strerror(error)}")
        if status == _flush.FLUSH_FAILED:
            raise JournalError(error, f"cannot flush the journal: {os.strerror(error)}")

    def _sync(self, segment: Segment) -> None:
        """Group commit: whoever finds fewer than ``FLUSHES_AT_ONCE`` flushes running
        flushes for everyone whose append had finished by then; the rest wait for one that
        covers them. An ``fdatasync`` makes durable every byte written before it was
        called, so a flush started beside another covers what the first did not.

        With one flush at a time, an append finished just after a flush began waited for
        that flush and then its own. Two in flight (the disk merges their cache flushes):
        ten senders 628 and 657 instances/s against 556 and 590/s, alternated in one
        process on a 2-core VM; a flush each (ten in flight) 562 and 636/s. Four in flight,
        on another such VM, a few per cent above two (see ``FLUSHES_AT_ONCE``)."""
        with self._lock:
            segment.finished += 1
            ticket = segment.finished
            while segment.synced < ticket:
                if segment.syncing >= FLUSHES_AT_ONCE:
                    self._synced.wait()
                    continue
                segment.syncing += 1
                self._flushes += 1
                target = segment.finished
                self._lock.release()
                try:
                    os.fdatasync(segment.fd)
                except OSError as exc:
                    raise JournalError(exc.errno, f"cannot flush the journal: {exc}") from exc
                finally:
                    self._lock.acquire()
                    segment.syncing -= 1
                    self._flushes -= 1
                    self._synced.notify_all()
                segment.synced = max(segment.synced, target)

    def wait_quiet(self, timeout: float) -> None:
        """Wait until no flush is in flight, or ``timeout`` seconds at most: for a writer
        that shares the disk with the journal and can wait (the filer). A sender waits for
        each flush, so a write queued in front of one delays its answer; between flushes
        (while the next instance arrives) the disk is idle."""
        with self._lock:
            current = self._current
            if self._flushes:
                self._synced.wait_for(lambda: not self._flushes, timeout)
        if current is not None and current.flusher is not None:
            current.flusher.wait_quiet(timeout)

    # -- retiring

    def materialised(self, segment: Segment, paths: Sequence[str]) -> None:
        """Count records of ``segment`` as materialised (their files at ``paths``)."""
        with self._lock:
            segment.outstanding -= len(paths)
            segment.written.extend(paths)

    def retirable(self, least: int = 0) -> list[Segment]:
        """The full segments with no record left to materialise, handed over once, when
        together they hold ``least`` bytes or more."""
        with self._lock:
            done = [s for s in self._full if s.outstanding == 0]
            if sum(s.size for s in done) < least:
                return []
            self._full = [s for s in self._full if s.outstanding != 0]
            return done

    def forget(self, segment: Segment) -> None:
        """Retire a segment whose files the caller has synced: kept as a spare when it was
        prepared, or its records reached its last eighth (they wrote nearly every block: no
        spare need be zero-filled under load), and fewer than ``SPARE_SEGMENTS`` are kept;
        else removed."""
        os.close(segment.fd)
        with self._lock:  # kept at shutdown too: the next start needs no zero-filling
            reusable = segment.prepared or segment.end >= segment.size - segment.size // 8
            keep = reusable and len(self._spares) < SPARE_SEGMENTS
        if keep:
            spare = segment.path.with_suffix(_SPARE)
            try:
                os.rename(segment.path, spare)
                fsync_dir(self.folder)
            except OSError as exc:
                log.warning("cannot keep journal segment %d as a spare: %s", segment.number, exc)
            else:
                with self._lock:
                    self._spares.append(spare)
                return
        segment.path.unlink(missing_ok=True)

    def close(self) -> list[Segment]:
        """Stop appending; the segments left, for the caller to retire once drained."""
        with self._lock:
            self._closed = True
            preparing = self._preparing
            segment, self._current = self._current, None
            if segment is not None:
                segment.full = True
                self._full.append(segment)
            left, self._full = self._full, []
        if preparing is not None:
            preparing.join()
        return left


def _head(magic: bytes, key: int, meta: bytes, size: int, crc32: int) -> bytes:
    """A record's head: its fields, then the CRC-32 of the fields and the meta."""
    head = _HEAD.pack(magic, key, len(meta), size, crc32)
    return head + _HEAD_CRC.pack(_crc32(meta, _crc32(head)))


@functools.cache
def _zeros() -> memoryview:
    """Zeros for padding records and filling spares, made on first use, in page-aligned
    memory as direct I/O needs (an anonymous map is aligned)."""
    return memoryview(mmap.mmap(-1, _ZERO_CHUNK))


def _new_key() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _segment_name(number: int, key: int) -> str:
    return f"{number:012d}-{key:016x}{_SUFFIX}"


def _parse_name(stem: str) -> tuple[int, int] | None:
    """A segment's (or spare's) number and key from its name; None for another file."""
    number, _, key = stem.partition("-")
    if not number.isdigit():
        return None
    if not key:  # named by an earlier version: its heads carry its number
        return int(number), int(number)
    try:
        return int(number), int(key, 16)
    except ValueError:
        return None


def _read_segment(number: int, key: int, path: Path) -> Iterator[Record]:
    """Every record of a segment whose checksums hold, skipping what a crash cut short."""
    with path.open("rb") as fp:
        if fp.seek(0, 2) == 0:
            return
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset, size = 0, len(data)
            while offset + HEAD_BYTES <= size:
                record = _record_at(data, offset, key)
                if record is None:
                    offset += ALIGN
                    continue
                meta, payload, length = record
                yield Record(number, meta, payload)
                offset += _aligned(length)


def _record_at(data: mmap.mmap, offset: int, key: int) -> tuple[dict[str, Any], bytes, int] | None:
    magic = data[offset : offset + 4]
    if magic not in (MAGIC, MAGIC_V1, MAGIC_STREAMED):
        return None
    layout = _HEAD_V1 if magic == MAGIC_V1 else _HEAD
    if offset + layout.size + _HEAD_CRC.size > len(data):
        return None
    head = data[offset : offset + layout.size]
    (check,) = _HEAD_CRC.unpack_from(data, offset + layout.size)
    _, segment, meta_length, size, payload_check = layout.unpack(head)
    if magic == MAGIC_STREAMED:  # head page, payload, meta
        start = offset + ALIGN
        payload_at, meta_at = start, start + size
    else:  # head, meta, payload
        start = offset + layout.size + _HEAD_CRC.size
        meta_at, payload_at = start, start + meta_length
    end = start + meta_length + size
    if segment != key or end > len(data):
        return None
    meta_bytes = data[meta_at : meta_at + meta_length]
    if _crc32(meta_bytes, _crc32(head)) != check:
        return None
    payload = data[payload_at : payload_at + size]
    if magic != MAGIC_V1:
        intact = _crc32(payload) == payload_check
    else:
        intact = hashlib.sha256(payload).digest() == payload_check
    if not intact:
        return None  # cut short by a crash: it was never answered
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        return None
    return meta, payload, end - offset
