"""A C-STORE's data set as it arrives: in memory while small, on disk once it is large.

Most instances (a CT or MR slice) are well under a megabyte and go to ingest as bytes, held
as the PDVs that carried them. One larger than ``memory_limit`` is spilled as it arrives to a
staged file in the spool (its Part 10 file meta first), so a multi-gigabyte object costs the
listener ``memory_limit`` at most, not its size twice over. Past ``size_limit`` the rest is
read and dropped, and the instance is refused at its end.
"""

from __future__ import annotations

from collections.abc import Callable

from node.dimse.pdu import Room
from node.store.checksum import crc32
from node.store.header import InstanceHeader, header_ahead, header_of_data_set
from node.store.journal import ALIGN, PLACE_STEP, Reservation
from node.store.spool import StagedFile


class ReceivedDataSet(list[memoryview]):
    """The fragments held in memory (empty once spilled), the size so far, and the spill.

    A C-STORE's data set starts with its Part 10 file meta (:meth:`begin`), and its CRC-32
    is kept as the fragments arrive: the journal's checksum of the instance is then ready
    when its last byte is, instead of costing a pass over half a megabyte after it.

    Where the node gave it room in the journal (``reserved``), its bytes are written there
    as they arrive, in whole pages; the room is given back if it is spilled or discarded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.over_limit = False
        self.spill: StagedFile | None = None
        self.prefix = b""
        self.crc32 = 0  # of the prefix and the fragments held in memory
        self.reserved: Reservation | None = None
        self.syntax = ""  # the data set's transfer syntax, where it is an instance's
        self._ahead: tuple[InstanceHeader, int] | None = None

    def begin(self, prefix: bytes, syntax: str = "") -> None:
        """Set the file meta that goes before the fragments (before the first of them),
        and, for an instance, its transfer syntax: its header is then read from its first
        fragment as it arrives (:meth:`header`)."""
        self.prefix, self.crc32, self.syntax = prefix, crc32(prefix), syntax

    def header(self) -> InstanceHeader | None:
        """The instance's header, read as its first fragment arrived, where that fragment
        settled it (:func:`node.store.header.header_ahead`) and the data set ended where it
        said; else, where the data set is in one buffer (the compiled receiver's), read
        from it without joining it to its file meta
        (:func:`node.store.header.header_of_data_set`); else None, and the caller reads
        the whole, joined.

        Encapsulated (compressed) pixel data, or an element after the pixel data, leaves
        the start unsettled: the whole was then copied, file meta and data set joined, only
        to read its header (half a megabyte for a CT slice)."""
        if self.spill is not None or self.over_limit or not self.syntax:
            return None
        ahead = self._ahead
        if ahead is not None and self.size == ahead[1]:
            return ahead[0]
        if len(self) == 1:
            return header_of_data_set(self[0], self.syntax)
        return None

    def parts(self) -> tuple[bytes | memoryview, ...]:
        """The prefix and the fragments held in memory: a Part 10 file, not joined."""
        return (self.prefix, *self)

    def add(
        self,
        value: memoryview,
        size_limit: int,
        memory_limit: int,
        open_spill: Callable[[], StagedFile],
    ) -> None:
        """Take the next fragment; ``open_spill`` gives a staged file (the prefix is written
        to it first), called once when the data set outgrows ``memory_limit``."""
        self.size += len(value)
        if self.over_limit:
            return
        if self.size > size_limit:
            self.over_limit = True
            self.clear()
            self.discard()
            return
        if self.spill is None and self.size > memory_limit:
            self.release()
            staged = open_spill()
            self.spill = staged
            staged.write(self.prefix)
            for fragment in self:
                staged.write(fragment)
            self.clear()
        if self.spill is not None:
            self.spill.write(value)
        else:
            if self.syntax and not self:  # the first fragment: the header, off the answer's path
                self._ahead = header_ahead(value, self.syntax)
            self.append(value)
            self.crc32 = crc32(value, self.crc32)
            if self.reserved is not None:
                self.reserved.feed(value)

    def room(self) -> Room | None:
        """Where the compiled receiver writes this data set's whole pages as they arrive
        (:meth:`node.dimse.pdu.Connection.receive_fragments`): its journal room, from
        the first byte of its file meta on; None without one."""
        reserved = self.reserved
        if reserved is None or not reserved.open or reserved.overflowed or reserved.placed:
            return None
        base = reserved.offset + ALIGN
        return Room(reserved.segment.fd, base, 0, reserved.capacity, PLACE_STEP)

    def read_ahead(self, first: memoryview) -> None:
        """Read the header from the data set's first fragment, received into a buffer of
        the compiled receiver's (:meth:`add` does so for fragments it is given)."""
        if self.syntax:
            self._ahead = header_ahead(first, self.syntax)

    def received(self, buffer: bytearray, start: int, end: int, room: Room | None) -> None:
        """Take what the compiled receiver read into ``buffer``: its file meta up to
        ``start`` (the prefix), the data set's bytes from there to ``end``, their whole
        pages written to ``room`` up to its ``placed``. Any fragments that follow are
        given to :meth:`add`, as usual."""
        if end == start:
            return
        view = memoryview(buffer)
        fragment = view[start:end]
        if len(buffer) > 2 * end:  # a small instance in a buffer sized for a larger one:
            fragment = memoryview(bytes(fragment))  # what is kept until filed is its size
        self.append(fragment)
        self.size += end - start
        self.crc32 = crc32(fragment, self.crc32)
        reserved = self.reserved
        if reserved is None or room is None:
            return
        if room.placed < 0:
            reserved.overflowed = True
            reserved.waiting, reserved.waiting_bytes = [], 0
            return
        reserved.placed = room.placed
        reserved.waiting = [view[room.placed : end]]
        reserved.waiting_bytes = end - room.placed

    def write_into(self, reserved: Reservation | None) -> None:
        """Write the data set into ``reserved`` as it arrives, from its file meta on."""
        self.reserved = reserved
        if reserved is not None:
            reserved.feed(self.prefix)

    def discard(self) -> None:
        """Remove the spilled file unless ingest placed it, and give back journal room not
        used (safe to call more than once)."""
        self.release()
        if self.spill is not None:
            self.spill.discard()

    def release(self) -> None:
        """Give back the journal room, unless the instance was journalled in it."""
        if self.reserved is not None:
            self.reserved.release()
            self.reserved = None
