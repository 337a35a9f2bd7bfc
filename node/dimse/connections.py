"""Admission of TCP connections, before and apart from associations.

A connection costs a thread and buffers from the moment it is accepted, long before its
A-ASSOCIATE-RQ says who is calling. So connections are capped on their own, in total and per
IP address, and an association slot is taken only once a request has been admitted: a client
that connects and says nothing never holds one of the ``max_associations`` slots a sender
needs.

When a cap is reached, the newest connection is not simply turned away: the oldest
connection still waiting to associate (from the same address, for the per-address cap) is
closed to make room. A sender's own negotiation lasts milliseconds, so whoever holds idle
connections loses them first, and nobody can fill the table with connections that never speak.
Connections already associated are never evicted; when they alone fill a cap, the new
connection is closed at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

ROOM = "closed to make room for another connection"


@dataclass(eq=False)
class Ticket:
    """One accepted connection: where from, since when, and whether it has associated."""

    address: str
    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    associated: bool = False
    evicted: bool = False
    closed_why: str = ""  # why the gate closed it, for the log


@dataclass(frozen=True)
class Admission:
    """What :meth:`ConnectionGate.admit` decided: the new ticket (None: closed at once) and
    the pending connections it closed to make room."""

    ticket: Ticket | None
    evicted: tuple[Ticket, ...] = ()
    why: str = ""


class ConnectionGate:
    """Counts open connections and associations and decides who may have one."""

    def __init__(self, max_connections: int, max_per_address: int, max_associations: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._open: list[Ticket] = []  # in order of arrival
        self._per_address: Counter[str] = Counter()
        self._associations = 0

    def admit(self, address: str, sock: socket.socket) -> Admission:
        """Take a new connection in, closing pending ones to make room where a cap is full."""
        evicted: list[Ticket] = []
        with self._lock:
            if self._per_address[address] >= self.max_per_address:
                victim = self._oldest_pending(address)
                if victim is None:
                    return Admission(None, why="too many connections from this address")
                evicted.append(self._evict(victim, ROOM))
            if len(self._open) >= self.max_connections:
                victim = self._oldest_pending(None)
                if victim is None:
                    return Admission(None, tuple(evicted), why="too many connections")
                evicted.append(self._evict(victim, ROOM))
            ticket = Ticket(address, sock)
            self._open.append(ticket)
            self._per_address[address] += 1
        for victim in evicted:  # outside the lock: a shutdown may block briefly
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        return Admission(ticket, tuple(evicted))

    @property
    def associations(self) -> int:
        """Associations open at this moment (read without the lock: a hint, not a count
        to act on as exact)."""
        return self._associations

    def associate(self, ticket: Ticket) -> bool:
        """Take an association slot for an admitted request; False when all are in use."""
        with self._lock:
            if ticket.evicted or self._associations >= self.max_associations:
                return False
            self._associations += 1
            ticket.associated = True
            return True

    def close(self, ticket: Ticket) -> None:
        """The connection has ended: free its place and, if it had one, its slot."""
        with self._lock:
            if ticket.associated:
                self._associations -= 1
                ticket.associated = False
            if not ticket.evicted and ticket in self._open:
                self._remove(ticket)

    def expire(self, max_age: float) -> list[Ticket]:
        """Shut down connections that have not associated within ``max_age`` seconds of
        connecting, whatever they are doing (a TLS handshake or a request trickling in):
        the hard deadline behind the reader's own."""
        now = time.monotonic()
        with self._lock:
            late = [t for t in self._open if not t.associated and now - t.opened > max_age]
            for ticket in late:
                self._evict(ticket, f"no A-ASSOCIATE-RQ within {max_age:.0f} s of connecting")
        for ticket in late:
            with contextlib.suppress(OSError):
                ticket.sock.shutdown(socket.SHUT_RDWR)
        return late

    def counts(self) -> tuple[int, int]:
        """(open connections, associations)."""
        with self._lock:
            return len(self._open), self._associations

    def _oldest_pending(self, address: str | None) -> Ticket | None:
        for ticket in self._open:
            if not ticket.associated and (address is None or ticket.address == address):
                return ticket
        return None

    def _evict(self, ticket: Ticket, why: str) -> Ticket:
        ticket.evicted, ticket.closed_why = True, why
        self._remove(ticket)
        return ticket

    def _remove(self, ticket: Ticket) -> None:
        self._open.remove(ticket)
        self._per_address[ticket.address] -= 1
        if self._per_address[ticket.address] <= 0:
            del self._per_address[ticket.address]
