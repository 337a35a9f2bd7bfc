"""The compiled data set receiver (:mod:`node.dimse._receive`): the bytes of a C-STORE's
data set land after its file meta exactly as sent, however they are paced, their whole
pages in the journal room as they arrive; whatever the loop does not take comes back
whole to the Python upper layer; a peer that stops, closes or overruns a limit ends the
association as it does when Python reads. And the node stores the same bytes with the
loop as without it."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, Association
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance
from node.core.settings import DicomSettings
from node.dimse import pdu as pdu_module
from node.dimse.allow_list import SourcePolicy
from node.dimse.dataset import ReceivedDataSet
from node.dimse.listener import start_listener
from node.dimse.pdu import (
    FRAGMENTS_DONE,
    FRAGMENTS_FIRST,
    FRAGMENTS_HANDOFF,
    AssociationAborted,
    Connection,
    Room,
    new_buffer,
)
from node.dimse.server import Listener
from node.store.header import InstanceHeader, read_header
from node.store.ingest import Ingestor
from node.store.journal import JOURNAL_DIR, Journal
from node.store.spool import Spool
from tests.support.pacing import dripping
from tests.support.peers import free_port

compiled = pytest.mark.skipif(pdu_module._receive is None, reason="the module is not built")

P_DATA, RELEASE_RQ = 0x04, 0x05
CONTEXT = 1
PREFIX = b"M" * 300  # stands for the Part 10 file meta
LIMIT = 1 << 20


def _pdv(value: bytes, last: bool, context: int = CONTEXT, command: bool = False) -> bytes:
    flags = (0x02 if last else 0) | (0x01 if command else 0)
    return struct.pack(">LBB", len(value) + 2, context, flags) + value


def _pdu(*pdvs: bytes, pdu_type: int = P_DATA) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _data_set(fragments: list[bytes]) -> bytes:
    return b"".join(
        _pdu(_pdv(value, last=index == len(fragments) - 1)) for index, value in enumerate(fragments)
    )


def _buffer(capacity: int) -> bytearray:
    buffer = new_buffer(len(PREFIX) + capacity)
    buffer[: len(PREFIX)] = PREFIX
    return buffer


def _send_paced(
    peer: socket.socket, data: bytes, piece: int, pause: float = 0.0
) -> threading.Thread:
    def send() -> None:
        for start in range(0, len(data), piece):
            peer.sendall(data[start : start + piece])
            if pause:
                time.sleep(pause)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


@compiled
def test_fragments_land_after_the_file_meta_and_their_pages_in_the_room(
    pair: tuple[Connection, socket.socket], tmp_path: Path
) -> None:
    connection, peer = pair
    fragments = [os.urandom(size) for size in (70_000, 131_066, 1, 0, 90_001)]
    sender = _send_paced(peer, _data_set(fragments), 7_001)
    journal = tmp_path / "room"
    fd = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        room = Room(fd, base=8192, placed=0, capacity=1 << 20, step=64 << 10)
        buffer = _buffer(400_000)
        got = connection.receive_fragments(buffer, len(PREFIX), CONTEXT, LIMIT, 10, room)
        sender.join()
        whole = PREFIX + b"".join(fragments)
        assert got.status == FRAGMENTS_DONE and got.pdu is None
        assert bytes(buffer[: got.end]) == whole
        assert room.placed % 4096 == 0 and 64 << 10 <= room.placed <= len(whole)
        assert os.pread(fd, room.placed, 8192) == whole[: room.placed]
    finally:
        os.close(fd)


@compiled
def test_it_stops_after_the_first_fragment_when_asked(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    fragments = [os.urandom(5_000), os.urandom(6_000)]
    peer.sendall(_data_set(fragments))
    buffer = _buffer(20_000)
    first = connection.receive_fragments(buffer, len(PREFIX), CONTEXT, LIMIT, 10, None, True)
    assert (first.status, first.end) == (FRAGMENTS_FIRST, len(PREFIX) + 5_000)
    rest = connection.receive_fragments(buffer, first.end, CONTEXT, LIMIT, 10, None)
    assert rest.status == FRAGMENTS_DONE
    assert bytes(buffer[: rest.end]) == PREFIX + b"".join(fragments)


@compiled
@pytest.mark.parametrize(
    "other",
    [
        _pdu(_pdv(b"C" * 40, last=True, command=True)),  # a command fragment
        _pdu(_pdv(b"D" * 40, last=True, context=3)),  # another presentation context
        _pdu(_pdv(b"E" * 40, last=False), _pdv(b"F" * 40, last=True)),  # two PDVs in one PDU
        _pdu(b"\x00" * 4, pdu_type=RELEASE_RQ),  # another PDU type
        _pdu(_pdv(b"G" * 20_000, last=True)),  # a fragment past the buffer's end
        _pdu(b"\x00\x00"),  # a P-DATA-TF too short for a PDV
    ],
    ids=["command", "other-context", "two-pdvs", "release", "past-the-buffer", "short"],
)
def test_a_pdu_it_does_not_take_comes_back_whole(
    pair: tuple[Connection, socket.socket], other: bytes
) -> None:
    """What the loop read of a PDU it does not take, and the rest, is the body the Python
    reader would have returned: the upper layer checks and answers it as ever."""
    connection, peer = pair
    before = os.urandom(3_000)
    peer.sendall(_pdu(_pdv(before, last=False)) + other)
    buffer = _buffer(10_000)
    got = connection.receive_fragments(buffer, len(PREFIX), CONTEXT, LIMIT, 10, None)
    assert got.status == FRAGMENTS_HANDOFF
    assert got.pdu == (other[0], bytearray(other[6:]))
    assert bytes(buffer[: got.end]) == PREFIX + before


@compiled
def test_a_room_outgrown_is_given_up(
    pair: tuple[Connection, socket.socket], tmp_path: Path
) -> None:
    """Past its room nothing more is written to the journal: the record is appended after
    its last byte instead (``placed`` -1)."""
    connection, peer = pair
    peer.sendall(_data_set([os.urandom(100_000), os.urandom(100_000)]))
    fd = os.open(tmp_path / "room", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        room = Room(fd, base=0, placed=0, capacity=150_000, step=4096)
        got = connection.receive_fragments(_buffer(300_000), len(PREFIX), CONTEXT, LIMIT, 10, room)
    finally:
        os.close(fd)
    assert got.status == FRAGMENTS_DONE
    assert room.placed == -1


@compiled
def test_a_fragment_cut_short_by_the_peer_ends_the_association(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    peer.sendall(_data_set([os.urandom(10_000)])[:5_000])
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(AssociationAborted, match="closed the connection"):
        connection.receive_fragments(_buffer(20_000), len(PREFIX), CONTEXT, LIMIT, 10, None)


@compiled
def test_a_pdu_over_the_limit_ends_the_association_before_its_body(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    peer.sendall(struct.pack(">BBL", P_DATA, 0, 1 << 30))
    with pytest.raises(AssociationAborted, match="over the maximum"):
        connection.receive_fragments(_buffer(20_000), len(PREFIX), CONTEXT, LIMIT, 10, None)


@compiled
def test_a_trickled_pdu_must_arrive_whole_within_its_time(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, peer = pair
    started = time.monotonic()
    with (
        dripping(peer, _data_set([os.urandom(1_000)])),
        pytest.raises(AssociationAborted, match="timed out"),
    ):
        connection.receive_fragments(_buffer(2_000), len(PREFIX), CONTEXT, LIMIT, 0.5, None)
    assert time.monotonic() - started < 3


@compiled
@pytest.mark.parametrize("cut", [3, 3_000], ids=["header", "body"])
def test_a_pause_inside_a_pdu_longer_than_the_silence_between_pdus_is_not_an_end(
    pair: tuple[Connection, socket.socket], cut: int
) -> None:
    """Inside its header or its body; and once the PDU is in, the wait for the next is the
    caller's again."""
    connection, peer = pair
    connection.set_timeout(0.2)
    data = _data_set([os.urandom(10_000), os.urandom(10)])
    sender = _send_paced(peer, data[:cut], cut)
    sender.join()

    def rest() -> None:
        time.sleep(0.6)
        peer.sendall(data[cut:])

    late = threading.Thread(target=rest)
    late.start()
    try:
        got = connection.receive_fragments(_buffer(20_000), len(PREFIX), CONTEXT, LIMIT, 5, None)
    finally:
        late.join()
    assert got.status == FRAGMENTS_DONE
    wait = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    assert struct.unpack("@ll", wait) == (0, 200_000)


@compiled
def test_a_silent_peer_ends_the_association_once_the_timeout_passes(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, _ = pair
    connection.set_timeout(0.3)
    started = time.monotonic()
    with pytest.raises(AssociationAborted, match="timed out"):
        connection.receive_fragments(_buffer(2_000), len(PREFIX), CONTEXT, LIMIT, 10, None)
    assert 0.25 < time.monotonic() - started < 3


# -- an answer sent and the next PDU read in one call ---------------------------------------

ANSWER = _pdu(_pdv(b"R" * 150, last=True, command=True))  # stands for a C-STORE-RSP


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def ends(
    request: pytest.FixtureRequest,
    pair: tuple[Connection, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Connection, socket.socket]:
    """``pair``, read with the compiled module and without it: both must behave alike."""
    if not request.param:
        monkeypatch.setattr(pdu_module, "_receive", None)
    elif pdu_module._receive is None:
        pytest.skip("the module is not built")
    return pair


@pytest.mark.parametrize(
    "following",
    [
        _pdu(_pdv(b"C" * 200, last=True, command=True)),  # the next command
        _pdu(b"\x00" * 4, pdu_type=RELEASE_RQ),
        _pdu(_pdv(b"C" * 180, last=True, command=True), _pdv(b"D" * 9_000, last=True)),
    ],
    ids=["command", "release", "command-and-data-in-one"],
)
def test_an_answer_goes_out_whole_and_the_next_pdu_comes_back_whole(
    ends: tuple[Connection, socket.socket], following: bytes
) -> None:
    """A long PDU (a sender's command and data in one) is read on in Python."""
    connection, peer = ends
    peer.sendall(following)
    pdu_type, body = connection.exchange(ANSWER, LIMIT, 10)
    assert (pdu_type, bytes(body)) == (following[0], following[6:])
    peer.settimeout(5)
    assert peer.recv(len(ANSWER), socket.MSG_WAITALL) == ANSWER


def test_after_an_exchange_the_wait_for_the_next_pdu_is_the_callers_again(
    ends: tuple[Connection, socket.socket],
) -> None:
    connection, peer = ends
    connection.set_timeout(0.2)
    data = _pdu(_pdv(b"C" * 200, last=True, command=True))
    peer.sendall(data[:3])

    def rest() -> None:
        time.sleep(0.5)  # longer than the silence allowed between PDUs, inside one
        peer.sendall(data[3:])

    late = threading.Thread(target=rest)
    late.start()
    try:
        assert connection.exchange(ANSWER, LIMIT, 5)[0] == P_DATA
    finally:
        late.join()
    wait = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    assert struct.unpack("@ll", wait) == (0, 200_000)


def test_an_exchange_ends_the_association_as_a_read_does(
    ends: tuple[Connection, socket.socket],
) -> None:
    """The peer's close, a PDU over the limit, a trickled PDU, a silent peer."""
    connection, peer = ends
    peer.sendall(struct.pack(">BBL", P_DATA, 0, LIMIT + 1))
    with pytest.raises(AssociationAborted, match="over the maximum"):
        connection.exchange(ANSWER, LIMIT, 10)
    connection.set_timeout(0.3)
    started = time.monotonic()
    with pytest.raises(AssociationAborted, match="timed out"):
        connection.exchange(ANSWER, LIMIT, 10)
    assert 0.25 < time.monotonic() - started < 3
    started = time.monotonic()
    with (
        dripping(peer, _pdu(_pdv(b"C" * 200, last=True, command=True))),
        pytest.raises(AssociationAborted, match="timed out"),
    ):
        connection.set_timeout(5)
        connection.exchange(ANSWER, LIMIT, 0.5)
    assert time.monotonic() - started < 3
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(AssociationAborted, match="closed the connection"):
        connection.exchange(ANSWER, LIMIT, 10)


def test_an_answer_the_peer_cannot_take_ends_the_association(
    ends: tuple[Connection, socket.socket],
) -> None:
    connection, peer = ends
    peer.close()
    with pytest.raises(AssociationAborted, match="cannot send to the peer"):
        connection.exchange(ANSWER, LIMIT, 10)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_the_module_is_built_where_a_compiler_is() -> None:
    """The install builds it (setup.py); without it the listener is several times
    slower per instance, in Python."""
    assert pdu_module._receive is not None


# -- the node, with and without the loop ---------------------------------------------------


@dataclass
class _Node:
    """A listener with its journal (16 KiB PDUs), and what it stores into."""

    listener: Listener
    port: int
    catalogue: Catalogue
    spool: Spool
    ingestor: Ingestor

    def associate(self) -> Association:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate("127.0.0.1", self.port, ae_title="CURIA", max_pdu=16384)
        assert assoc.is_established
        return assoc


@contextmanager
def _node(tmp_path: Path) -> Iterator[_Node]:
    """A running node; once the block ends, everything it received is filed."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    ingestor = Ingestor(spool, catalogue, journal=Journal(spool.root / JOURNAL_DIR))
    port = free_port()
    listener = start_listener(
        DicomSettings(host="127.0.0.1", port=port, max_pdu=16384),
        ingestor,
        SourcePolicy(catalogue, accept_any=True),
    )
    try:
        yield _Node(listener, port, catalogue, spool, ingestor)
        ingestor.settle()
    finally:
        listener.shutdown()
        ingestor.close()


def _stored_bytes(tmp_path: Path, sends: list[bytes]) -> list[bytes]:
    """The spool files of the instances one pynetdicom association sends, in order."""
    uids = []
    with _node(tmp_path) as node:
        assoc = node.associate()
        for data in sends:
            dataset = dcmread(BytesIO(data))
            uids.append(str(dataset.SOPInstanceUID))
            assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
    with node.catalogue.session() as session:
        paths = {row.sop_instance_uid: row.path for row in session.scalars(select(Instance))}
    return [node.spool.absolute(paths[uid]).read_bytes() for uid in uids]


@compiled
def test_the_node_stores_the_same_bytes_with_the_loop_as_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Growing instances (each outgrows the buffer the one before sized) and a small one,
    sent in 16 KiB PDUs: the loop hands the rest of an outgrown data set to Python."""
    sends = []
    for size in (1, 400, 8, 900, 3):
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.add_new(0x00090010, "LO", "PADDING")
        dataset.add_new(0x00091010, "OB", os.urandom(size * 1024))
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        sends.append(out.getvalue())
    with_loop = _stored_bytes(tmp_path / "compiled", sends)
    monkeypatch.setattr(pdu_module, "_receive", None)
    without = _stored_bytes(tmp_path / "python", sends)
    assert with_loop == without
    assert len(with_loop) == len(sends)


def test_a_small_instance_keeps_only_its_own_bytes_not_the_buffer_it_arrived_in() -> None:
    """Until filed, an instance held in memory counts its size against the backlog's bound:
    a 2 KiB report received into a buffer sized for a CT slice must not hold the slice's
    worth of memory."""
    fragments = ReceivedDataSet()
    fragments.begin(PREFIX)
    buffer = _buffer(600_000)
    buffer[len(PREFIX) : len(PREFIX) + 2048] = os.urandom(2048)
    fragments.received(buffer, len(PREFIX), len(PREFIX) + 2048, None)
    [kept] = fragments
    assert bytes(kept) == bytes(buffer[len(PREFIX) : len(PREFIX) + 2048])
    assert len(kept.obj) == 2048
    large = _buffer(600_000)
    fragments = ReceivedDataSet()
    fragments.received(large, len(PREFIX), 500_000, None)
    assert fragments[0].obj is large, "a buffer mostly used is kept as it is, not copied"


def _headers_given(node: _Node) -> list[InstanceHeader | None]:
    """The headers the receiver hands ingest with each instance, from now on, in order."""
    headers: list[InstanceHeader | None] = []
    store = node.listener.service.store

    def spy(association, request):  # type: ignore[no-untyped-def]
        headers.append(request.header)
        return store(association, request)

    node.listener.service.store = spy  # type: ignore[method-assign]
    return headers


@compiled
@pytest.mark.parametrize("open_at_once", [1, 2])
def test_the_header_is_read_from_the_start_of_the_data_set_however_many_associations_are_open(
    tmp_path: Path, open_at_once: int
) -> None:
    """Alone, the loop stops after the first fragment and the header is read while the
    rest arrives; beside another association it reads the data set whole and the header
    from its start after: either way ingest gets it ready, and the instance is stored."""
    with _node(tmp_path) as node:
        headers = _headers_given(node)
        associations = [node.associate() for _ in range(open_at_once)]
        for assoc in associations:
            dataset = dcmread(get_testdata_file("CT_small.dcm"))
            dataset.SOPInstanceUID = generate_uid()
            for tag in [element.tag for element in dataset if element.tag > 0x7FE00010]:
                del dataset[tag]  # the pixel data last, as a scanner's slice has it
            assert assoc.send_c_store(dataset).Status == 0x0000
        for assoc in associations:
            assoc.release()
    assert len(headers) == open_at_once
    assert all(header is not None for header in headers)
    with node.catalogue.session() as session:
        assert len(session.scalars(select(Instance)).all()) == open_at_once


@compiled
def test_a_header_its_start_left_unsettled_is_read_from_the_buffer_not_a_joined_copy(
    tmp_path: Path,
) -> None:
    """CT_small has an element after its pixel data, so its start does not settle its
    header: read from the compiled loop's buffer after the last byte, it is the one the
    stored file reads as, and ingest gets it ready (nothing joined to read it)."""
    with _node(tmp_path) as node:
        headers = _headers_given(node)
        assoc = node.associate()
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = generate_uid()
        assert max(element.tag for element in dataset) > 0x7FE00010
        assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
    with node.catalogue.session() as session:
        [row] = session.scalars(select(Instance)).all()
    [header] = headers
    assert header is not None
    assert header == read_header(node.spool.absolute(row.path).read_bytes())


@compiled
def test_the_journal_answers_the_only_association_and_two_at_once_are_answered_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the only association, each C-STORE's Success goes out from the journal the moment
    its record is durable; with another association open, from the association's thread
    as before. Either way every instance is answered Success once, and catalogued by the
    time the associations have ended."""
    from node.store import journal as journal_module

    if journal_module._flush is None:
        pytest.skip("the compiled flusher is not built")
    sent_by_journal: list[bool] = []
    original = journal_module.Journal._durable

    def noted(self: Journal, segment: object, writes: object, answer: object = None) -> None:
        original(self, segment, writes, answer)  # type: ignore[arg-type]
        sent_by_journal.append(answer is not None and answer.sent)  # type: ignore[attr-defined]

    monkeypatch.setattr(journal_module.Journal, "_durable", noted)

    def instance() -> object:
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        return dataset

    with _node(tmp_path) as node:
        alone = node.associate()
        for _ in range(3):
            assert alone.send_c_store(instance()).Status == 0x0000
        other = node.associate()
        for assoc in (alone, other):
            assert assoc.send_c_store(instance()).Status == 0x0000
        other.release()
        alone.release()
        node.ingestor.settle()
        with node.catalogue.session() as session:
            assert len(session.scalars(select(Instance)).all()) == 5
    assert sent_by_journal == [True, True, True, False, False]
