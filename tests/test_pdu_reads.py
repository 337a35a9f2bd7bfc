"""Reading PDUs off the socket: a P-DATA-TF body read straight into a buffer of its size
gets exactly the bytes sent, however the peer paces them, and keeps the limits of a read
that grows as bytes arrive (a peer that stops or trickles is cut off)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from node.dimse.pdu import AssociationAborted, Connection
from tests.support.pacing import dripping

P_DATA = 0x04
TIMEOUTS = (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)


def _pdu(body: bytes) -> bytes:
    return struct.pack(">BBL", P_DATA, 0, len(body)) + body


@pytest.mark.parametrize("at_once", [False, True])
def test_a_body_sent_in_small_pieces_arrives_whole(
    pair: tuple[Connection, socket.socket], at_once: bool
) -> None:
    connection, peer = pair
    bodies = [os.urandom(size) for size in (0, 1, 5000, 200_000)]
    data = b"".join(_pdu(body) for body in bodies)

    def trickle() -> None:
        for start in range(0, len(data), 7_001):
            peer.sendall(data[start : start + 7_001])

    sender = threading.Thread(target=trickle)
    sender.start()
    received = [connection.read_pdu(1 << 20, within=10, at_once=at_once) for _ in bodies]
    sender.join()
    assert received == [(P_DATA, bytearray(body)) for body in bodies]


def test_a_body_cut_short_by_the_peer_ends_the_association(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    peer.sendall(_pdu(os.urandom(10_000))[:5_000])
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(AssociationAborted, match="closed the connection"):
        connection.read_pdu(1 << 20, within=10, at_once=True)


def test_a_trickled_body_must_arrive_whole_within_its_time(
    pair: tuple[Connection, socket.socket],
) -> None:
    """A byte now and then keeps no PDU open past ``within``: its buffer taken whole at
    the start changes nothing to that."""
    connection, peer = pair
    started = time.monotonic()
    with (
        dripping(peer, _pdu(os.urandom(1_000))),
        pytest.raises(AssociationAborted, match="timed out"),
    ):
        connection.read_pdu(1 << 20, within=0.5, at_once=True)
    assert time.monotonic() - started < 3


def test_a_length_over_the_limit_is_refused_before_its_body_is_read(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    peer.sendall(struct.pack(">BBL", P_DATA, 0, 1 << 30))
    with pytest.raises(AssociationAborted, match="over the maximum"):
        connection.read_pdu(1 << 20, within=10, at_once=True)


class _CountingSocket(socket.socket):
    """A socket that counts its timeout changes, Python's and the kernel's."""

    changes = 0

    def settimeout(self, value: float | None) -> None:
        type(self).changes += 1
        super().settimeout(value)

    def setsockopt(self, level: int, option: int, value: object, *rest: object) -> None:
        if option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            type(self).changes += 1
        super().setsockopt(level, option, value, *rest)  # type: ignore[call-overload]


def test_pdus_read_in_pieces_leave_the_timeout_the_caller_set() -> None:
    """Each timeout change is a system call, which under many associations hands the
    interpreter lock to another thread: a PDU whose bytes come in several reads, within a
    deadline the caller's own timeout already bounds, changes it not once."""
    ours, theirs = socket.socketpair()
    counting = _CountingSocket(fileno=ours.detach())
    counting.settimeout(10)
    connection = Connection(counting)
    _CountingSocket.changes = 0
    bodies = [os.urandom(size) for size in (5000, 200_000, 300_000)]
    data = b"".join(_pdu(body) for body in bodies)

    def send() -> None:
        for start in range(0, len(data), 50_000):
            theirs.sendall(data[start : start + 50_000])
            time.sleep(0.002)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        received = [connection.read_pdu(1 << 20, within=10, at_once=True) for _ in bodies]
    finally:
        sender.join()
        connection.close()
        theirs.close()
    assert received == [(P_DATA, bytearray(body)) for body in bodies]
    assert _CountingSocket.changes == 0


def test_a_timeout_shorter_than_the_deadline_does_not_cut_a_pdu_short(
    pair: tuple[Connection, socket.socket],
) -> None:
    """The silence allowed before a PDU may be shorter than the time it has to arrive
    whole once begun: a pause in the middle of it longer than the first is not an end."""
    connection, peer = pair
    connection.set_timeout(0.2)
    data = _pdu(os.urandom(10_000))

    def send() -> None:
        peer.sendall(data[:3_000])
        time.sleep(0.6)
        peer.sendall(data[3_000:])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        pdu_type, body = connection.read_pdu(1 << 20, within=5, at_once=True)
    finally:
        sender.join()
    assert (pdu_type, bytes(body)) == (P_DATA, data[6:])
    assert connection.timeout == 0.2, "the caller's timeout is back for its sends"
    waits = [connection.sock.getsockopt(socket.SOL_SOCKET, option, 16) for option in TIMEOUTS]
    assert [struct.unpack("@ll", wait) for wait in waits] == [(0, 200_000)] * 2


def test_a_silent_peer_ends_the_association_once_the_timeout_passes(
    pair: tuple[Connection, socket.socket],
) -> None:
    """A plain socket waits in the kernel, bounded by the timeout the caller set: silence
    before a PDU ends the association then, not later, and not at once."""
    connection, _ = pair
    connection.set_timeout(0.3)
    started = time.monotonic()
    with pytest.raises(AssociationAborted, match="timed out"):
        connection.read_pdu(1 << 20, within=10, at_once=True)
    assert 0.25 < time.monotonic() - started < 3
