"""The connection gate's decisions, on real socket pairs: who is admitted, who is closed to
make room, and that a connection which never associates is shut down at its deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from node.dimse.connections import ROOM, ConnectionGate


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


def _pair(pairs: list[tuple[socket.socket, socket.socket]]) -> socket.socket:
    ours, theirs = socket.socketpair()
    pairs.append((ours, theirs))
    theirs.settimeout(2)
    return ours


def _shut(pairs: list[tuple[socket.socket, socket.socket]], index: int) -> bool:
    """True when the gate shut our end of pair ``index`` down (the peer reads EOF)."""
    return pairs[index][1].recv(1) == b""


def test_idle_connections_hold_no_association_slot(pairs: list) -> None:
    gate = ConnectionGate(max_connections=10, max_per_address=10, max_associations=1)
    idle = [gate.admit("10.0.0.9", _pair(pairs)).ticket for _ in range(5)]
    sender = gate.admit("10.0.0.1", _pair(pairs)).ticket
    assert all(idle) and sender is not None
    assert gate.associate(sender)
    second = gate.admit("10.0.0.1", _pair(pairs)).ticket
    assert second is not None and not gate.associate(second)  # the one slot is taken
    gate.close(sender)
    assert gate.associate(second)
    assert gate.counts() == (6, 1)


def test_a_full_address_closes_its_own_oldest_pending_connection(pairs: list) -> None:
    gate = ConnectionGate(max_connections=10, max_per_address=2, max_associations=4)
    first = gate.admit("10.0.0.9", _pair(pairs)).ticket
    gate.admit("10.0.0.9", _pair(pairs))
    admission = gate.admit("10.0.0.9", _pair(pairs))
    assert admission.ticket is not None and admission.evicted == (first,)
    assert first is not None and first.closed_why == ROOM and _shut(pairs, 0)
    assert gate.counts() == (2, 0)


def test_a_full_table_of_associations_turns_a_new_connection_away(pairs: list) -> None:
    gate = ConnectionGate(max_connections=2, max_per_address=5, max_associations=2)
    for _ in range(2):
        ticket = gate.admit("10.0.0.1", _pair(pairs)).ticket
        assert ticket is not None and gate.associate(ticket)
    refused = gate.admit("10.0.0.9", _pair(pairs))
    assert refused.ticket is None and refused.evicted == ()
    assert refused.why == "too many connections"


def test_a_connection_that_never_associates_is_shut_at_its_deadline(pairs: list) -> None:
    gate = ConnectionGate(max_connections=5, max_per_address=5, max_associations=5)
    late = gate.admit("10.0.0.9", _pair(pairs)).ticket
    associated = gate.admit("10.0.0.1", _pair(pairs)).ticket
    assert late is not None and associated is not None and gate.associate(associated)
    assert gate.expire(0.2) == []
    time.sleep(0.3)
    assert gate.expire(0.2) == [late]
    assert _shut(pairs, 0) and "no A-ASSOCIATE-RQ within" in late.closed_why
    assert gate.counts() == (1, 1)
