"""The association acceptor at the protocol level: what a sender sees when it gets things
right (negotiation, roles, small PDUs) and when it gets them wrong (each ends in the
A-ABORT or A-ASSOCIATE-RJ of PS3.8, and the listener serves the next sender)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, build_role
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context, negotiate_as_acceptor
from pynetdicom.sop_class import CTImageStorage, PatientRootQueryRetrieveInformationModelFind
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import AssociationRecord, Instance, RefusedAssociations
from node.core.settings import DicomSettings
from node.core.status import STATUSES, STORE_KEPT, Category, category
from node.dimse import acceptor as acceptor_module
from node.dimse.acceptor import APPLICATION_CONTEXT_NAME, _decoded_request
from node.dimse.allow_list import SourcePolicy, add_source
from node.dimse.listener import start_listener
from node.dimse.messages import IMPLEMENTATION_CLASS_UID, command_set, parse_command, response
from node.dimse.server import Listener
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.peers import free_port, wait_for

CT_SMALL = get_testdata_file("CT_small.dcm")


def _start(tmp_path: Path, **settings: float) -> tuple[Listener, Ingestor]:
    """A listener on a fresh catalogue that admits the AE title SCU from 127.0.0.1."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "scu", "SCU", "127.0.0.1", actor="test")
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    dicom = DicomSettings(host="127.0.0.1", port=free_port(), **settings)
    return start_listener(dicom, ingestor, SourcePolicy(catalogue, False, 0)), ingestor


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Listener, Ingestor]]:
    server, ingestor = _start(tmp_path, max_associations=2)
    yield server, ingestor
    server.shutdown()


def _port(server: Listener) -> int:
    return server.server_address[1]


def _records(ingestor: Ingestor, count: int) -> list[AssociationRecord]:
    def rows() -> list[AssociationRecord] | None:
        with ingestor.catalogue.session() as session:
            found = list(session.scalars(select(AssociationRecord)))
        return found if len(found) >= count else None

    return wait_for(rows, 10, f"{count} association record(s)")


def _associate_raw(port: int, max_pdu: int = 16384) -> tuple[socket.socket, bytes]:
    """Open an association by hand, proposing CT Image Storage as context 1."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = "SCU"
    primitive.called_ae_title = "CURIA"
    primitive.presentation_context_definition_list = [build_context(CTImageStorage)]
    primitive.presentation_context_definition_list[0].context_id = 1
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(pdu.encode())
    return sock, _read_pdu(sock)


def _read_pdu(sock: socket.socket) -> bytes:
    header = _read(sock, 6)
    return header + _read(sock, struct.unpack(">L", header[2:])[0])


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _p_data(context_id: int, header: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, context_id, header) + value
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _echo_command() -> bytes:
    return command_set(
        [
            (0x0002, b"1.2.840.10008.1.1\x00"),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", 7)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def test_commands_round_trip_and_responses_answer_their_request() -> None:
    request = parse_command(_echo_command())
    assert request[0x0100] == struct.pack("<H", 0x0030)
    encoded = response(request, 0xA700, "free disk space below the watermark")
    answer = parse_command(encoded)
    assert answer[0x0100] == struct.pack("<H", 0x8030)
    assert answer[0x0120] == struct.pack("<H", 7)
    assert answer[0x0900] == struct.pack("<H", 0xA700)
    assert answer[0x0902].rstrip() == b"free disk space below the watermark"
    assert struct.unpack("<L", answer[0x0000])[0] == len(encoded) - 12  # after the length


def test_every_status_the_node_answers_has_its_category() -> None:
    """The table agrees with PS3.7 C.1 on each code it lists, and the peer's answers a C-STORE
    counts as kept are Success and the Storage warnings only."""
    for code, row in STATUSES.items():
        assert row.code == code
        if code == 0x0000:
            assert row.category == Category.SUCCESS
        else:
            warning = code >> 12 == 0xB
            assert row.category == (Category.WARNING if warning else Category.FAILURE), str(row)
    assert {category(code) for code in STORE_KEPT} == {Category.SUCCESS, Category.WARNING}
    assert category(0xC211) == Category.FAILURE and category(0x0107) == Category.WARNING


def test_a_store_is_answered_and_the_association_is_accepted_with_our_identity(
    node: tuple[Listener, Ingestor],
) -> None:
    server, ingestor = node
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage)
    assoc = scu.associate("127.0.0.1", _port(server), ae_title="CURIA", max_pdu=1024)
    assert assoc.is_established
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    status = assoc.send_c_store(dcmread(CT_SMALL))  # the answer fits a 1 KiB PDU
    assoc.release()
    assert status.Status == 0x0000
    with ingestor.catalogue.session() as session:
        [row] = session.scalars(select(Instance))
    assert row.sop_instance_uid == dcmread(CT_SMALL).SOPInstanceUID
    [record] = _records(ingestor, 1)
    assert (record.outcome, record.stored, record.statuses) == ("released", 1, {"0x0000": 1})


def test_the_stored_file_meta_names_the_context_and_the_sender(
    node: tuple[Listener, Ingestor], tmp_path: Path
) -> None:
    server, ingestor = node
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage)
    assoc = scu.associate("127.0.0.1", _port(server), ae_title="CURIA")
    sent = dcmread(CT_SMALL)
    assert assoc.send_c_store(sent).Status == 0
    assoc.release()
    with ingestor.catalogue.session() as session:
        [row] = session.scalars(select(Instance))
    stored = dcmread(tmp_path / "spool" / row.path)
    meta = stored.file_meta
    assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # pynetdicom's first proposal
    assert meta.SourceApplicationEntityTitle == "SCU"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert stored.PixelData == sent.PixelData


def test_a_request_with_role_selection_is_served(node: tuple[Listener, Ingestor]) -> None:
    server, _ = node
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage)
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = scu.associate("127.0.0.1", _port(server), ae_title="CURIA", ext_neg=[role])
    assert assoc.is_established
    assert assoc.send_c_store(dcmread(CT_SMALL)).Status == 0
    assoc.release()


def test_a_sender_proposing_again_is_answered_alike_without_a_second_decoding(
    node: tuple[Listener, Ingestor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Senders open association after association with the same request: decoding it and
    negotiating its contexts is what negotiation costs, so a request seen lately is neither
    decoded nor negotiated again, its answer is the same, and the association works."""
    server, _ = node
    _decoded_request.cache_clear()
    decodings, negotiations = [], []
    decode = A_ASSOCIATE_RQ.decode

    def counted(self: A_ASSOCIATE_RQ, data: bytes) -> None:
        decodings.append(len(data))
        decode(self, data)

    def negotiated(*args: object) -> object:
        negotiations.append(args)
        return negotiate_as_acceptor(*args)

    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", counted)
    monkeypatch.setattr(acceptor_module, "negotiate_as_acceptor", negotiated)
    answers = []
    for _ in range(3):
        sock, answer = _associate_raw(_port(server))
        sock.close()
        answers.append(answer)
    assert answers[0][0] == 0x02, "accepted"
    assert answers[1:] == answers[:1] * 2
    assert (len(decodings), len(negotiations)) == (1, 1)
    sock, _ = _associate_raw(_port(server))
    with sock:
        _echo_and_release(sock)


def test_an_unsupported_sop_class_is_refused_in_negotiation(
    node: tuple[Listener, Ingestor],
) -> None:
    """The context is answered "abstract syntax not supported"; pynetdicom, left with no
    context, aborts."""
    server, ingestor = node
    scu = AE(ae_title="SCU")
    scu.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = scu.associate("127.0.0.1", _port(server), ae_title="CURIA")
    assert not assoc.is_established
    [cx] = assoc.rejected_contexts
    assert cx.result == 0x03
    [record] = _records(ingestor, 1)
    assert (record.outcome, record.stored) == ("aborted", 0)


def _echo_and_release(sock: socket.socket) -> None:
    """A C-ECHO on context 1 answered Success, then a release answered."""
    sock.sendall(_p_data(1, 0x03, _echo_command()))
    reply = _read_pdu(sock)
    assert reply[0] == 0x04
    fields = parse_command(reply[12:])
    assert fields[0x0900] == b"\x00\x00"
    assert fields[0x0100] == struct.pack("<H", 0x8030)
    sock.sendall(struct.pack(">BBLL", 0x05, 0, 4, 0))
    assert _read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


def test_echo_by_hand_then_release(node: tuple[Listener, Ingestor]) -> None:
    server, _ = node
    sock, answer = _associate_raw(_port(server))
    with sock:
        assert answer[0] == 0x02  # A-ASSOCIATE-AC
        _echo_and_release(sock)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">BBL", 0x09, 0, 0), 0x01),  # unknown PDU type
        (struct.pack(">BBL", 0x01, 0, 0), 0x02),  # a second A-ASSOCIATE-RQ
        (_p_data(3, 0x03, _echo_command()), 0x06),  # a context that was not accepted
        (_p_data(1, 0x02, b"\x08\x00\x00\x00"), 0x02),  # a data set with no command
        (_p_data(1, 0x03, b"\x00\x00\x00\x01\x04"), 0x06),  # a cut command element
    ],
    ids=["unknown-pdu", "second-request", "unaccepted-context", "data-first", "bad-command"],
)
def test_protocol_errors_end_in_an_abort_and_the_next_sender_is_served(
    node: tuple[Listener, Ingestor], data: bytes, reason: int
) -> None:
    server, ingestor = node
    sock, answer = _associate_raw(_port(server))
    with sock:
        assert answer[0] == 0x02
        sock.sendall(data)
        abort = _read_pdu(sock)
    assert abort[0] == 0x07 and abort[8:10] == bytes((0x02, reason))
    [record] = _records(ingestor, 1)
    assert record.outcome == "aborted"
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage)
    assoc = scu.associate("127.0.0.1", _port(server), ae_title="CURIA")
    assert assoc.is_established
    assoc.release()


def test_too_many_associations_are_refused_as_a_local_limit(
    node: tuple[Listener, Ingestor],
) -> None:
    server, ingestor = node
    held = [_associate_raw(_port(server))[0] for _ in range(2)]
    try:
        sock, answer = _associate_raw(_port(server))
        sock.close()
        assert answer[0] == 0x03 and answer[7:10] == bytes((0x02, 0x03, 0x02))

        def tallies() -> list[tuple[str, int]] | None:
            with ingestor.catalogue.session() as session:
                rows = session.scalars(select(RefusedAssociations)).all()
                found = [(row.reason, row.count) for row in rows]
            return found or None

        assert wait_for(tallies, 10, "the refusal tally") == [("too many associations", 1)]
    finally:
        for sock in held:
            sock.close()


def test_a_silent_peer_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    server, ingestor = _start(tmp_path, network_timeout=0.5)
    try:
        sock, answer = _associate_raw(_port(server))
        with sock:
            assert answer[0] == 0x02
            started = time.monotonic()
            assert _read_pdu(sock)[0] == 0x07
            assert time.monotonic() - started < 5
        [record] = _records(ingestor, 1)
        assert record.outcome == "aborted"
    finally:
        server.shutdown()


def test_a_timed_out_association_is_aborted_after_one_timeout_not_two(tmp_path: Path) -> None:
    """The node looks, without waiting, for bytes left unread when it gives up: the A-ABORT
    comes network_timeout after the last PDU, and the log says no bytes were unread."""
    server, ingestor = _start(tmp_path, network_timeout=2.0)
    try:
        sock, answer = _associate_raw(_port(server))
        with sock:
            assert answer[0] == 0x02
            started = time.monotonic()
            assert _read_pdu(sock)[0] == 0x07
            elapsed = time.monotonic() - started
        assert 1.9 <= elapsed < 3.5, elapsed
        [record] = _records(ingestor, 1)
        assert record.reason == "timed out waiting for the peer (0 bytes unread)"
    finally:
        server.shutdown()


def test_shutdown_ends_open_associations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    settings = DicomSettings(host="127.0.0.1", port=free_port())
    server = start_listener(settings, ingestor, SourcePolicy(catalogue, True, 0))
    sock, answer = _associate_raw(_port(server))
    assert answer[0] == 0x02
    started = time.monotonic()
    server.shutdown()
    assert time.monotonic() - started < 5
    assert server.active_count() == 0
    sock.close()
