"""PDU framing for the upper layer (PS3.8 9.3): whole PDUs read from a socket, and the
few PDUs the acceptor writes itself (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT, P-DATA-TF).

Any failure here ends the association: :class:`AssociationAborted` carries why, and the
A-ABORT reason to send, if the peer is still there to hear it.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from node.dimse.association import READ_BUFFER_BYTES

# PDU types, PS3.8 9.3.1
ASSOCIATE_RQ, P_DATA, RELEASE_RQ, ABORT = 0x01, 0x04, 0x05, 0x07
PDU_HEADER = struct.Struct(">BxL")
READ_STEP = READ_BUFFER_BYTES  # bytes asked of the socket at once; also the read buffer's size
DEADLINE_LEEWAY = 1 + 1 / 16  # how far past a read's deadline a wait may end (as a factor)

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


class Connection:
    """Reads whole PDUs from a socket and writes P-DATA-TF within the peer's maximum."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = cast(io.BufferedReader, sock.makefile("rb", buffering=READ_STEP))

    def read_exact(self, size: int, deadline: float | None = None) -> bytearray:
        """``size`` bytes, in a buffer grown as they arrive: a length the peer claims costs
        nothing until the bytes are really there. With ``deadline`` (a ``time.monotonic()``
        value) the whole read must finish by then, however the peer paces its bytes."""
        buffer = bytearray()

        def step(done: int) -> int:
            chunk = self.reader.read1(min(size - done, READ_STEP))
            buffer.extend(chunk)
            return len(chunk)

        self._fill(size, deadline, step)
        return buffer

    def read_into(self, size: int, deadline: float | None = None) -> bytearray:
        """``size`` bytes, read straight into a buffer of that size: for a length already
        bounded by a limit the listener's memory bound counts (a P-DATA-TF within the
        maximum PDU length), it saves the copies of :meth:`read_exact`'s growing buffer.
        ``deadline`` as there."""
        buffer = bytearray(size)
        with memoryview(buffer) as view:
            self._fill(size, deadline, lambda done: self.reader.readinto1(view[done:]))
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
        except TimeoutError:
            why = f"timed out waiting for the peer ({self._unread()} bytes unread)"
            raise AssociationAborted(why, 0x00) from None
        except (OSError, ValueError) as exc:
            raise AssociationAborted(f"the connection failed: {exc}") from None

    def set_timeout(self, seconds: float | None) -> None:
        """The socket's timeout, left alone when it already has that value: each change is
        a system call, which lets every other association's thread take the interpreter
        lock in between."""
        if self.sock.gettimeout() != seconds:
            self.sock.settimeout(seconds)

    def _wait_at_most(self, left: float) -> None:
        """Bound the next wait for bytes by ``left`` seconds, give or take a sixteenth.

        A timeout already set a little above ``left`` (the one the previous read of the same
        PDU set, a few milliseconds ago) is kept: a deadline met a sixteenth late is still
        met, and a PDU no longer costs a timeout change per read. A shorter one is not: a
        wait cut short would end the association before its deadline."""
        current = self.sock.gettimeout()
        if current is None or not left <= current <= left * DEADLINE_LEEWAY:
            self.sock.settimeout(left)

    def _unread(self) -> int:
        """Bytes that have arrived and wait in the socket (0 when the peer sent nothing):
        a timeout with bytes waiting would be the node's fault, not the peer's.

        The peek must not wait: on a socket with a timeout Python retries a recv that would
        block until that timeout passes, whatever the flags, which made every timed-out
        association wait a second full timeout here (and then count bytes that arrived
        during it, such as the peer's own A-ABORT)."""
        timeout = self.sock.gettimeout()
        try:
            self.sock.settimeout(0.0)
            return len(self.sock.recv(1 << 16, socket.MSG_PEEK))
        except (OSError, ValueError):  # nothing there, or a TLS socket (no flags allowed)
            return 0
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(timeout)

    def read_pdu(
        self,
        limit: int,
        deadline: float | None = None,
        within: float | None = None,
        at_once: bool = False,
    ) -> tuple[int, bytearray]:
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
        idle = self.sock.gettimeout()
        first = self.read_exact(1)
        deadline = time.monotonic() + within
        pdu = self._read_pdu(first + self.read_exact(5, deadline), limit, deadline, at_once)
        self.set_timeout(idle)  # what the caller set, for its sends too
        return pdu

    def _read_pdu(
        self, header: bytearray, limit: int, deadline: float | None, at_once: bool = False
    ) -> tuple[int, bytearray]:
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

    def send_command(self, context_id: int, command: bytes, peer_max_pdu: int) -> None:
        """A command set in as many P-DATA-TF as the peer's maximum PDU length needs."""
        self.send(p_data(context_id, command, b"", peer_max_pdu))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()
