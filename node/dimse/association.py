"""What an association is to the node: who asked, what was agreed, what happened on it,
and what the acceptor asks of the node (:class:`Service`) on each event."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from pynetdicom.presentation import PresentationContext

from node.core.status import SUCCESS
from node.store.buffers import Parts
from node.store.header import InstanceHeader
from node.store.journal import Answer, Reservation
from node.store.spool import StagedFile

_SUCCESS_KEY = f"0x{SUCCESS:04X}"  # the status nearly every instance is counted under


@dataclass(frozen=True)
class Refusal:
    """Why an association is rejected: the A-ASSOCIATE-RJ fields and a line for the log."""

    result: int
    source: int
    diagnostic: int
    why: str
    hint: str = ""  # for the log line only


@dataclass(frozen=True)
class Requestor:
    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int


@dataclass
class Association:
    """One association: who asked, what was agreed, and what happened on it."""

    requestor: Requestor
    contexts: dict[int, PresentationContext] = field(default_factory=dict)
    peer_max_pdu: int = 0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    clock: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes_received: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    series_uids: set[str] = field(default_factory=set)  # series stored on it

    def count(self, status: int, size: int) -> None:
        self.bytes_received += size
        if status == SUCCESS:
            self.stored += 1
        else:
            self.failed += 1
        self.statuses[_SUCCESS_KEY if status == SUCCESS else f"0x{status:04X}"] += 1


@dataclass(frozen=True)
class StoreRequest:
    """A received C-STORE: its command's UIDs and the data set as a Part 10 file, in
    ``data``, or, for one too large for memory, written to ``staged`` (not yet synced)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    data: bytes | Parts  # or the parts it arrived in, not joined
    staged: StagedFile | None = None
    crc32: int | None = None  # of ``data``, computed as it arrived (None: not computed)
    ahead: int | None = None  # Service.look_ahead's answer when the command arrived
    reserved: Reservation | None = None  # where ``data`` was written as it arrived
    header: InstanceHeader | None = None  # read as ``data`` arrived (None: not read yet)
    answer: Answer | None = None  # its Success, sent by the journal where it can (see there)


@dataclass(frozen=True)
class NormalisedRequest:
    """A received N-CREATE, N-SET or N-ACTION: its command field, UIDs and data set.

    The data set is bytes in ``transfer_syntax_uid`` (no file meta); the handler decodes it.
    ``sop_instance_uid`` is empty for an N-CREATE that leaves it to the SCP.
    """

    command: int
    sop_class_uid: str
    sop_instance_uid: str
    action_type: int | None
    transfer_syntax_uid: str
    data: bytes


@dataclass(frozen=True)
class NormalisedAnswer:
    """Status, comment, and the SOP Instance UID to name in the response."""

    status: int
    comment: str = ""
    sop_instance_uid: str = ""


class Service(Protocol):
    """What the acceptor asks of the node (see :class:`node.dimse.listener.AssociationHandlers`)."""

    def admit(self, requestor: Requestor) -> Refusal | None: ...

    def stage(self) -> StagedFile: ...

    def accepted(self, association: Association) -> None: ...

    def look_ahead(self, sop_instance_uid: str) -> int | None:
        """Asked when a C-STORE command arrives, before its data set: what the node may
        prepare for it (a token handed back in :attr:`StoreRequest.ahead`), or None."""
        ...

    def reserve(self, size_hint: int) -> Reservation | None:
        """Asked after :meth:`look_ahead` found the instance new: room in the journal where
        its data set (of about ``size_hint`` bytes) is written as it arrives, or None."""
        ...

    def store(self, association: Association, request: StoreRequest) -> tuple[int, str]: ...

    def normalised(
        self, association: Association, request: NormalisedRequest
    ) -> NormalisedAnswer: ...

    def releasing(self, association: Association) -> None: ...

    def closed(self, association: Association, outcome: str, reason: str | None) -> None: ...


#: What one open connection may hold before it associates: its A-ASSOCIATE-RQ (grown as the
#: bytes arrive, never past this), the socket's read buffer, and its thread's stack and
#: bookkeeping as far as they are touched.
ASSOCIATE_RQ_BYTES = 1 << 20
READ_BUFFER_BYTES = 1 << 18
THREAD_BYTES = 1 << 18


@dataclass(frozen=True)
class Limits:
    max_associations: int = 16
    max_connections: int = 64
    max_connections_per_address: int = 32
    max_pdu: int = 262144
    max_instance_bytes: int = 1 << 30
    instance_memory_bytes: int = 32 << 20
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0

    def memory_bound(self) -> int:
        """Bytes the listener may hold at worst, beyond the process it runs in: every
        connection open with a request almost complete, and every association in the middle
        of an instance just under the size that is spilled to disk (held as received, then
        once more joined to its file meta for ingest) with one more PDU being read."""
        # A buffer grown as bytes arrive is over-allocated by up to an eighth, and the chunk
        # just read from the socket is alive beside it.
        request = ASSOCIATE_RQ_BYTES + ASSOCIATE_RQ_BYTES // 8 + READ_BUFFER_BYTES
        per_connection = request + READ_BUFFER_BYTES + THREAD_BYTES
        per_association = 2 * min(self.instance_memory_bytes, self.max_instance_bytes)
        per_association += self.max_pdu
        return self.max_connections * per_connection + self.max_associations * per_association
