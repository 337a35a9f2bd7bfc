"""PDU framing for the upper layer (PS3.8 9.3): whole PDUs read from a socket, and the
few PDUs the acceptor writes itself (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT, P-DATA-TF).

Any failure here ends the association: :class:`AssociationAborted` carries why, and the
A-ABORT reason to send, if the peer is still there to hear it.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, cast

from node.dimse.association import READ_BUFFER_BYTES

try:  # compiled with the node where a C compiler was at hand (setup.py); else Python alone
    from node.dimse import _receive  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised where the module is not built
    _receive = None

# PDU types, PS3.8 9.3.1
ASSOCIATE_RQ, P_DATA, RELEASE_RQ, ABORT = 0x01, 0x04, 0x05, 0x07
PDU_HEADER = struct.Struct(">BxL")
READ_STEP = READ_BUFFER_BYTES  # bytes asked of the socket at once; also the read buffer's size
DEADLINE_LEEWAY = 1 + 1 / 16  # how far past a read's deadline a wait may end (as a factor)
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO and SO_SNDTIMEO

# What :meth:`Connection.receive_fragments` ran into (the compiled loop's statuses)
FRAGMENTS_DONE, FRAGMENTS_FIRST, FRAGMENTS_HANDOFF = 0, 1, 2
_CLOSED, _TIMEOUT, _FAILED, _TOO_LONG, _UNSENT = 3, 4, 5, 6, 7

# A-ABORT provider reasons, PS3.8 9.3.8
ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06


class AssociationAborted(Exception):
    """The association ends here: the peer went away, timed out or broke the protocol."""

    def __init__(self, why: str, reason: int | None = None) -> None:
        super().__init__(why)
        self.reason = reason  # an A-ABORT to send, or None when the peer is gone


def bad_ae_titles(body: bytes | bytearray) -> str | None:
    """Why the called or calling AE title of an A-ASSOCIATE-RQ body is not valid (PS3.5
    6.2: printable ASCII without backslash), the bytes escaped for the log; None if both
    are. Checked before the request is decoded, so such bytes never reach a decoder's own
    error reporting."""
    for name, start in (("called", 4), ("calling", 20)):
        field = bytes(body[start : start + 16])
        if any(byte < 0x20 or byte > 0x7E or byte == 0x5C for byte in field):
            shown = field.decode("latin-1").rstrip()
            escaped = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in shown)
            return f"a {name} AE title that is not printable ASCII: '{escaped}'"
    return None


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, len(body)) + body


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return _pdu(0x03, bytes((0, result, source, diagnostic)))


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    return _pdu(ABORT, bytes((0, 0, source, reason)))


RELEASE_RP = _pdu(0x06, b"\x00" * 4)


def p_data(context_id: int, command: bytes, data: bytes, peer_max_pdu: int) -> bytes:
    """A DIMSE message as P-DATA-TF PDUs: its command set, then its data set (if any), each
    cut into PDVs that fit the peer's maximum PDU length (PS3.8 9.3.5)."""
    room = peer_max_pdu - 6 if peer_max_pdu > 6 else max(len(command), len(data))
    pdus = []
    for value, kind in ((command, 0x01), (data, 0x00)):
        for start in range(0, len(value), room):
            chunk = value[start : start + room]
            last = 0x02 if start + room >= len(value) else 0x00
            pdv = struct.pack(">LBB", len(chunk) + 2, context_id, kind | last)
            pdus.append(_pdu(P_DATA, pdv + chunk))
    return b"".join(pdus)


def new_buffer(size: int) -> bytearray:
    """A buffer of ``size`` bytes for the compiled loop to read into: not zero-filled
    where the module is built (every byte read is written first)."""
    return _receive.buffer(size) if _receive is not None else bytearray(size)


@dataclass
class Room:
    """Where a data set's whole pages are written as they arrive: a file (the journal),
    the offset of the data set's first byte in it, the bytes of it written already, its
    room, and how many bytes wait before a write. ``placed`` is -1 once the room is given
    up (outgrown, or a write failed)."""

    fd: int
    base: int
    placed: int
    capacity: int
    step: int


_NO_ROOM = Room(fd=-1, base=0, placed=-1, capacity=0, step=0)  # nothing written anywhere


@dataclass
class Fragments:
    """What :meth:`Connection.receive_fragments` did: why it stopped (``FRAGMENTS_*``),
    where the data set's bytes now end in the buffer, and a PDU it did not take (its
    type and whole body), to be handled the usual way."""

    status: int
    end: int
    pdu: tuple[int, bytes | bytearray] | None = None


class Connection:
    """Reads whole PDUs from a socket and writes P-DATA-TF within the peer's maximum.

    A plain TCP socket is read straight into the buffers that keep the bytes, and left in
    blocking mode with its waits bounded by the kernel (``SO_RCVTIMEO``, ``SO_SNDTIMEO``):
    a P-DATA-TF's body then arrives in one ``recv(MSG_WAITALL)``, where a socket with a
    Python timeout costs a ``poll`` before every ``recv``, and each system call lets another
    thread take the interpreter lock. A TLS socket keeps Python's timeouts and a buffered
    reader (its records do not map onto the PDUs' bytes).

    The connection owns its socket's timeouts from here on: callers change them through
    :meth:`set_timeout`, never on the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timeout = sock.gettimeout()  # what the caller set: the wait for the next PDU
        self._kernel_timeouts: dict[int, float | None] = {}  # SO_RCVTIMEO, SO_SNDTIMEO
        self.reader: io.BufferedReader | None = None  # TLS only
        if isinstance(sock, ssl.SSLSocket):
            self.reader = cast(io.BufferedReader, sock.makefile("rb", buffering=READ_STEP))
        else:
            sock.settimeout(None)  # blocking: its waits are bounded below, by the kernel
            self.set_timeout(self.timeout)

    @property
    def direct(self) -> bool:
        """Whether the socket is read straight, without a buffered reader (plain TCP)."""
        return self.reader is None

    @property
    def compiled(self) -> bool:
        """Whether data sets can be received by the compiled loop (a plain TCP socket,
        where the module was built)."""
        return self.reader is None and _receive is not None

    def receive_fragments(
        self,
        buffer: bytearray,
        end: int,
        context_id: int,
        limit: int,
        within: float | None,
        room: Room | None,
        first_only: bool = False,
    ) -> Fragments:
        """Data set fragments of ``context_id`` read into ``buffer`` from ``end`` on, one
        P-DATA-TF of one PDV at a time, without the interpreter lock, until the last one
        (or the first, with ``first_only``); whole pages written to ``room`` as they
        arrive (its ``placed`` updated). A PDU it does not take (another type, several
        PDVs, a command, another context, a fragment past the buffer's end) is read whole
        and returned. Waits and ``within`` are :meth:`read_pdu`'s; a PDU over ``limit``
        bytes, a timeout or the peer's close end the association as there."""
        assert _receive is not None
        rcvtimeo = self._kernel_timeouts.get(socket.SO_RCVTIMEO)
        into = room or _NO_ROOM
        status, end, placed, pdu_type, length, held, error, left = _receive.receive(
            self.sock.fileno(),
            buffer,
            end,
            context_id,
            limit,
            into.fd,
            into.base,
            into.placed,
            into.capacity,
            into.step,
            int((within or 0) * 1e9),
            int((rcvtimeo or 0) * 1e9),
            first_only,
        )
        self._kernel_timeouts[socket.SO_RCVTIMEO] = left / 1e9 if left else None
        if room is not None:
            room.placed = placed
        if status in (FRAGMENTS_DONE, FRAGMENTS_FIRST):
            return Fragments(status, end)
        if status == FRAGMENTS_HANDOFF:
            deadline = time.monotonic() + within if within else None
            rest = self.read_into(length - (len(held) - 6), deadline) if length else b""
            self.set_timeout(self.timeout)
            return Fragments(status, end, (pdu_type, held[6:] + rest))
        self._ended(status, length, limit, error)

    def exchange(
        self, answer: bytes, limit: int, within: float | None
    ) -> tuple[int, bytes | bytearray]:
        """Send ``answer`` and read the next PDU, as :meth:`send` then :meth:`read_pdu`
        (``within`` as there) do, in one call of the compiled module where the connection
        is :attr:`compiled`: the answer to a C-STORE and its sender's next command then
        cost one hand-over of the interpreter lock, not three. A long PDU's body (over
        4 KiB: not a command) is read here the usual way."""
        if _receive is None or self.reader is not None:
            self.send(answer)
            return self.read_pdu(limit, within=within, at_once=True)
        rcvtimeo = self._kernel_timeouts.get(socket.SO_RCVTIMEO)
        status, pdu_type, length, body, error, left = _receive.exchange(
            self.sock.fileno(), answer, limit, int((within or 0) * 1e9), int((rcvtimeo or 0) * 1e9)
        )
        self._kernel_timeouts[socket.SO_RCVTIMEO] = left / 1e9 if left else None
        if status == FRAGMENTS_DONE:
            return pdu_type, body
        if status == FRAGMENTS_HANDOFF:
            deadline = time.monotonic() + within if within else None
            body = self.read_into(length, deadline)
            self.set_timeout(self.timeout)
            return pdu_type, body
        if status == _UNSENT:
            raise AssociationAborted(f"cannot send to the peer: {os.strerror(error)}")
        self._ended(status, length, limit, error)

    def _ended(self, status: int, length: int, limit: int, error: int) -> NoReturn:
        """Why the compiled module stopped reading, as the association's end."""
        if status == _CLOSED:
            raise AssociationAborted("the peer closed the connection")
        if status == _TIMEOUT:
            why = f"timed out waiting for the peer ({self._unread()} bytes unread)"
            raise AssociationAborted(why, 0x00)
        if status == _TOO_LONG:
            raise AssociationAborted(
                f"a PDU of {length} bytes, over the maximum of {limit}", ABORT_INVALID_PARAMETER
            )
        raise AssociationAborted(f"the connection failed: {os.strerror(error)}")

    def read_exact(self, size: int, deadline: float | None = None) -> bytearray:
        """``size`` bytes, in a buffer grown as they arrive: a length the peer claims costs
        nothing until the bytes are really there. With ``deadline`` (a ``time.monotonic()``
        value) the whole read must finish by then, however the peer paces its bytes."""
        buffer = bytearray()

        def step(done: int) -> int:
            want = min(size - done, READ_STEP)
            chunk = self.sock.recv(want) if self.reader is None else self.reader.read1(want)
            buffer.extend(chunk)
            return len(chunk)

        self._fill(size, deadline, step)
        return buffer

    def read_into(self, size: int, deadline: float | None = None) -> bytes | bytearray:
        """``size`` bytes, read straight into a buffer of that size: for a length already
        bounded by a limit the listener's memory bound counts (a P-DATA-TF within the
        maximum PDU length), it saves the copies of :meth:`read_exact`'s growing buffer.
        ``deadline`` as there.

        A direct socket's ``recv(MSG_WAITALL)`` fills a buffer it allocates itself, which
        is not zero-filled first as ``bytearray(size)`` is: one pass less over each PDU,
        with the interpreter lock held. A peer that paces its bytes costs a join of the
        pieces."""
        if self.reader is None:
            pieces: list[bytes] = []

            def whole(done: int) -> int:
                pieces.append(self.sock.recv(size - done, socket.MSG_WAITALL))
                return len(pieces[-1])

            self._fill(size, deadline, whole)
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        buffer = bytearray(size)
        with memoryview(buffer) as view:
            reader = self.reader
            self._fill(size, deadline, lambda done: reader.readinto1(view[done:]))
        return buffer

    def _fill(self, size: int, deadline: float | None, step: Callable[[int], int]) -> None:
        """Call ``step(bytes so far)``, which reads what has arrived and says how much,
        until ``size`` bytes are in; the peer's close, a failure or ``deadline`` passing
        end the association."""
        done = 0
        try:
            while done < size:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self._wait_at_most(left)
                read = step(done)
                if not read:
                    raise AssociationAborted("the peer closed the connection")
                done += read
        except (TimeoutError, BlockingIOError):  # BlockingIOError: the kernel's timeout
            why = f"timed out waiting for the peer ({self._unread()} bytes unread)"
            raise AssociationAborted(why, 0x00) from None
        except (OSError, ValueError) as exc:
            raise AssociationAborted(f"the connection failed: {exc}") from None

    def set_timeout(self, seconds: float | None) -> None:
        """The longest wait for the peer's bytes (and for room to send), left alone when it
        already has that value: each change is a system call, which lets every other
        association's thread take the interpreter lock in between."""
        self.timeout = seconds
        if not self.direct:
            if self.sock.gettimeout() != seconds:
                self.sock.settimeout(seconds)
            return
        self._set_kernel_timeout(socket.SO_RCVTIMEO, seconds)
        self._set_kernel_timeout(socket.SO_SNDTIMEO, seconds)

    def _set_kernel_timeout(self, option: int, seconds: float | None) -> None:
        """``SO_RCVTIMEO`` or ``SO_SNDTIMEO`` of a direct socket, unless it has that value."""
        if self._kernel_timeouts.get(option, -1.0) == seconds:
            return
        # 0 in a timeval means no limit; a timeout of 0 means not waiting: a microsecond.
        wait = 0.0 if seconds is None else max(seconds, 1e-6)
        value = _TIMEVAL.pack(int(wait), int(wait % 1 * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, option, value)
        self._kernel_timeouts[option] = seconds

    def _wait_at_most(self, left: float) -> None:
        """Bound the next wait for bytes by ``left`` seconds, give or take a sixteenth.

        A timeout already set a little above ``left`` (the one the previous read of the same
        PDU set, a few milliseconds ago) is kept: a deadline met a sixteenth late is still
        met, and a PDU no longer costs a timeout change per read. A shorter one is not: a
        wait cut short would end the association before its deadline."""
        if self.direct:
            current = self._kernel_timeouts.get(socket.SO_RCVTIMEO)
        else:
            current = self.sock.gettimeout()
        if current is None or not left <= current <= left * DEADLINE_LEEWAY:
            if self.direct:
                self._set_kernel_timeout(socket.SO_RCVTIMEO, left)
            else:
                self.sock.settimeout(left)

    def _unread(self) -> int:
        """Bytes that have arrived and wait in the socket (0 when the peer sent nothing):
        a timeout with bytes waiting would be the node's fault, not the peer's. The peek
        must not wait (``MSG_DONTWAIT``). A TLS socket cannot peek (no flags allowed on
        its ``recv``): 0."""
        if not self.direct:
            return 0
        try:
            return len(self.sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing there
            return 0

    def readable(self, timeout: float) -> bool:
        """Whether the peer's next bytes are there within ``timeout``, without reading any.

        Bytes already in a TLS reader's buffer count; a timeout on that socket would make
        its reader unusable, hence a non-blocking peek, then ``poll``."""
        if self.reader is not None:
            previous = self.sock.gettimeout()
            try:
                self.sock.settimeout(0.0)
                if self.reader.peek(1):
                    return True
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (OSError, ValueError):
                return True  # the read that follows reports what went wrong
            finally:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(previous)
        if timeout <= 0:
            return self._unread() > 0
        poller = select.poll()  # not select(): a descriptor number may pass FD_SETSIZE
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the peer to close the connection (or send anything)."""
        with contextlib.suppress(OSError, ValueError, AssociationAborted):
            self.set_timeout(timeout)
            if self.reader is None:
                self.sock.recv(1)
            else:
                self.reader.read(1)

    def read_pdu(
        self,
        limit: int,
        deadline: float | None = None,
        within: float | None = None,
        at_once: bool = False,
    ) -> tuple[int, bytes | bytearray]:
        """One whole PDU of at most ``limit`` bytes after its header; a longer one ends the
        association before a byte of its body is read. With ``at_once``, the body's buffer
        is taken whole before its bytes arrive (:meth:`read_into`).

        ``deadline`` bounds the whole read, waiting for the first byte included. ``within``
        bounds it from the PDU's first byte on: the wait for a PDU to begin is the socket's
        own timeout (silence between PDUs), but once it has begun it must arrive whole in
        ``within`` seconds, so a peer that trickles a byte now and then cannot hold the
        association open with one PDU that never ends."""
        if within is None or deadline is not None:
            return self._read_pdu(self.read_exact(6, deadline), limit, deadline, at_once)
        header = self._first_bytes(6)
        deadline = time.monotonic() + within
        if len(header) < 6:
            header += self.read_exact(6 - len(header), deadline)
        pdu = self._read_pdu(header, limit, deadline, at_once)
        self.set_timeout(self.timeout)  # what the caller set, for its sends too
        return pdu

    def _first_bytes(self, most: int) -> bytearray:
        """The first of the next ``most`` bytes, as soon as any arrive, within the socket's
        own timeout: a direct socket's one ``recv`` usually brings a PDU's whole header."""
        if self.reader is not None:
            return self.read_exact(1)
        buffer = bytearray()

        def step(_: int) -> int:
            buffer.extend(self.sock.recv(most))
            return len(buffer)

        self._fill(1, None, step)
        return buffer

    def _read_pdu(
        self, header: bytearray, limit: int, deadline: float | None, at_once: bool = False
    ) -> tuple[int, bytes | bytearray]:
        pdu_type, length = PDU_HEADER.unpack(header)
        if length > limit:
            raise AssociationAborted(
                f"a PDU of {length} bytes, over the maximum of {limit}", ABORT_INVALID_PARAMETER
            )
        read = self.read_into if at_once else self.read_exact
        return pdu_type, read(length, deadline)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise AssociationAborted(f"cannot send to the peer: {exc}") from None

    def close(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(OSError):
                self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()
