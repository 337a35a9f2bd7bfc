"""A stranger on the network cannot stall or exhaust the DICOM listener.

Each test plays one attack against a real `curia-node run` process on loopback, the attacker
connecting from 127.0.0.2 and the legitimate sender (DCMTK's echoscu / storescu, pynetdicom)
from 127.0.0.1, and asserts what a hospital relies on: the sender is still served while the
attack runs, the node's memory and threads stay bounded, and the attacker's connections end
as the README's "Limits and hardening" section says. Limits are set small so that each attack
is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.support.env import require_tool
from tests.support.peers import VENV_BIN, NodeProcess, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATTACKER = "127.0.0.2"
ACSE_TIMEOUT = 3.0
MAX_CONNECTIONS = 24
PER_ADDRESS = 16
MAX_PDU = 16384
MAX_INSTANCE_MB = 3
INSTANCE_MEMORY_MB = 1


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("hardened")
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_DICOM__MIN_FREE_MB": "0",
        "CURIA_DICOM__ACSE_TIMEOUT": str(ACSE_TIMEOUT),
        "CURIA_DICOM__MAX_ASSOCIATIONS": "4",
        "CURIA_DICOM__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "CURIA_DICOM__MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
        "CURIA_DICOM__MAX_PDU": str(MAX_PDU),
        "CURIA_DICOM__MAX_INSTANCE_MB": str(MAX_INSTANCE_MB),
        "CURIA_DICOM__INSTANCE_MEMORY_MB": str(INSTANCE_MEMORY_MB),
        "CURIA_ARCHIVE__ENABLED": "false",
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": "1",
        "CURIA_COMPLETION__POLL_SECONDS": "0.2",
        "CURIA_PIPELINE__EMBEDDED_WORKER": "false",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{os.getpid()}-{free_port()}",
    }
    process = NodeProcess(env, root)
    umask = os.umask(0o022)  # the usual umask: the node must not rely on a stricter one
    try:
        process.allow_source("storescu", "STORESCU")
        process.start()
    finally:
        os.umask(umask)
    yield process
    process.stop()


def _status(node: NodeProcess) -> dict[str, int]:
    """The node process's resident memory (KiB) and thread count, from /proc."""
    assert node.node is not None
    fields = {}
    for line in Path(f"/proc/{node.node.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def _echo(node: NodeProcess) -> subprocess.CompletedProcess[bytes]:
    """A C-ECHO by DCMTK's echoscu from the allowed sender; its exit status is the verdict."""
    echoscu = require_tool("echoscu")
    return subprocess.run(
        [
            echoscu,
            "-aet",
            "STORESCU",
            "-aec",
            "CURIA",
            "-to",
            "10",
            "127.0.0.1",
            str(node.dicom_port),
        ],
        capture_output=True,
        timeout=30,
    )


def _connect(node: NodeProcess, source: str = ATTACKER) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", node.dicom_port), timeout=10, source_address=(source, 0)
    )
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the node closes ``sock`` within ``timeout`` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def _associate(node: NodeProcess) -> socket.socket:
    """An association by pynetdicom's encoder from the allowed sender, opened by hand."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "CURIA"
    primitive.presentation_context_definition_list = [build_context(CTImageStorage)]
    primitive.presentation_context_definition_list[0].context_id = 1
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = _connect(node, "127.0.0.1")
    sock.sendall(pdu.encode())
    header = sock.recv(6)
    assert header[:1] == b"\x02", f"not accepted: {header!r}"
    (length,) = struct.unpack(">L", header[2:6])
    while length:
        length -= len(sock.recv(length))
    return sock


def _read_abort(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < 10:
        chunk = sock.recv(10 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_idle_and_trickling_connections_hold_no_slot_and_end_at_the_deadline(
    node: NodeProcess,
) -> None:
    """17 silent connections and 17 that send a PDU header and then one byte every 0.5 s:
    echoscu is answered meanwhile, and every one of them is closed by the node within
    acse_timeout of connecting (plus scheduling slack), though the trickle never stops."""
    silent = [_connect(node) for _ in range(17)]
    trickling = [_connect(node) for _ in range(17)]
    started = time.monotonic()
    try:
        for sock in trickling:
            sock.sendall(bytes.fromhex("01 00 00 0F FF FF"))
        assert _echo(node).returncode == 0
        closed: set[int] = set()
        while time.monotonic() - started < ACSE_TIMEOUT + 5 and len(closed) < len(trickling):
            for index, sock in enumerate(trickling):
                if index in closed:
                    continue
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    closed.add(index)
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        assert len(closed) == len(trickling), f"{len(closed)} closed after {elapsed:.1f} s"
        assert all(_closed_by_peer(sock, 5) for sock in silent)
        assert _echo(node).returncode == 0
    finally:
        for sock in silent + trickling:
            sock.close()


def test_a_connection_flood_is_capped_and_costs_no_memory_for_claimed_lengths(
    node: NodeProcess,
) -> None:
    """400 connections each announcing a 1 MiB A-ASSOCIATE-RQ: the node keeps at most
    max_connections of them, its threads and memory stay bounded, and echoscu is answered."""
    before = _status(node)
    socks = []
    try:
        for _ in range(400):
            try:
                sock = _connect(node)
                sock.sendall(struct.pack(">BxL", 0x01, 1 << 20))
                socks.append(sock)
            except OSError:
                pass  # closed at once by the node: the cap at work
        time.sleep(1.0)
        during = _status(node)
        assert _echo(node).returncode == 0
    finally:
        for sock in socks:
            sock.close()
    assert during["Threads"] - before["Threads"] <= MAX_CONNECTIONS + 2, (before, during)
    # Claimed lengths are never allocated up front: far less than one MiB per connection.
    assert during["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, during)
    assert "connections are at their limit" in node.log()


def test_a_pdu_longer_than_the_advertised_maximum_ends_the_association(
    node: NodeProcess,
) -> None:
    """An allowed sender's P-DATA claiming 0xFFFFFFFF bytes, and a real 4 MiB one, each end
    in an A-ABORT (source 2, reason 6) before the body is read, with the reason in the log."""
    before = _status(node)
    sock = _associate(node)
    with sock:
        sock.sendall(struct.pack(">BxL", 0x04, 0xFFFFFFFF) + b"\x00" * 64)
        abort = _read_abort(sock)
    assert abort[:1] == b"\x07" and abort[8:10] == b"\x02\x06", abort
    sock = _associate(node)
    with sock, contextlib.suppress(OSError):
        sock.sendall(struct.pack(">BxL", 0x04, 4 << 20))
        sock.sendall(b"\x00" * (4 << 20))
        abort = _read_abort(sock)
    assert abort[:1] == b"\x07" and abort[8:10] == b"\x02\x06", abort
    after = _status(node)
    assert after["VmRSS"] - before["VmRSS"] < 32 * 1024, (before, after)
    wait_for(
        lambda: f"a PDU of 4294967295 bytes, over the maximum of {MAX_PDU}" in node.log(),
        10,
        "the abort's reason in the log",
    )
    assert _echo(node).returncode == 0


def test_an_instance_over_the_size_limit_gets_out_of_resources(
    node: NodeProcess, tmp_path: Path
) -> None:
    """A C-STORE of a data set larger than max_instance_mb gets 0xA700 with the reason, the
    association goes on, and the next instance of normal size is stored."""
    big = _new_ct()
    big.add_new(0x00091010, "OB", b"\x00" * ((MAX_INSTANCE_MB << 20) + 1024))
    small = _new_ct()
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, big.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", node.dicom_port, ae_title="CURIA")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(big)
        stored = assoc.send_c_store(small)
    finally:
        assoc.release()
    assert refused.Status == 0xA700
    assert "larger than" in str(refused.get("ErrorComment", ""))
    assert stored.Status == 0x0000


def _new_ct() -> Dataset:
    """pydicom's small CT under a new SOP Instance UID."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _store_one(node: NodeProcess) -> None:
    ds = _new_ct()
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", node.dicom_port, ae_title="CURIA")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_files_the_node_creates_are_private_whatever_the_umask(node: NodeProcess) -> None:
    """Started under umask 022, the node still creates its catalogue, WAL, broker, token,
    spool and folders readable by its own user only; `config check` says so, and reports a
    data folder opened to others (exit 1)."""
    _store_one(node)
    data = Path(node.env["CURIA_DATA_DIR"])
    # The broker's file appears with the first message: the series' completion.
    wait_for(lambda: (data / "broker.sqlite").exists(), 30, "the embedded broker's file")
    files = [data / "catalogue.sqlite", data / "catalogue.sqlite-wal", data / "broker.sqlite"]
    files += [data / "api-token", *(p for p in (data / "spool").rglob("*") if p.is_file())]
    folders = [data, *(p for p in data.rglob("*") if p.is_dir())]
    assert len(files) >= 5
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in folders:
        assert path.stat().st_mode & 0o777 == 0o700, path
    check = [str(VENV_BIN / "curia-node")]
    env = {**os.environ, **node.env}
    ok = subprocess.run([*check, "config", "check"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    data.chmod(0o755)
    try:
        bad = subprocess.run([*check, "config", "check"], env=env, capture_output=True, text=True)
    finally:
        data.chmod(0o700)
    assert bad.returncode == 1
    assert f"folder {data} is 0755: other users can read it" in bad.stderr


@pytest.mark.parametrize(
    ("title", "shown"),
    [
        (b"EVIL\n2026 FAKE", r"EVIL\x0a2026 FAKE"),
        (b"\x1b[31mRED\x00", r"\x1b[31mRED\x00"),
        ("\u00e9t\u00e9".encode(), r"\xc3\xa9t\xc3\xa9"),
    ],
    ids=["newline", "escape-nul", "utf8"],
)
def test_wire_bytes_in_an_ae_title_are_escaped_in_the_log(
    node: NodeProcess, title: bytes, shown: str
) -> None:
    """A calling AE title with a newline, an escape sequence, NUL or non-ASCII bytes: the
    request is aborted (reason 6) and the log holds one escaped line, no raw byte and no
    traceback."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "PLACEHOLDER_AE16"
    primitive.called_ae_title = "CURIA"
    primitive.presentation_context_definition_list = [build_context(CTImageStorage)]
    primitive.presentation_context_definition_list[0].context_id = 1
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    raw = pdu.encode().replace(b"PLACEHOLDER_AE16", title.ljust(16))
    offset = len(node.log())
    # An address of its own: lines about one address are rate-limited, and the attacks
    # above came from ATTACKER.
    with _connect(node, f"127.0.0.{10 + len(shown)}") as sock:
        sock.sendall(raw)
        abort = _read_abort(sock)
    assert abort[:1] == b"\x07" and abort[8:10] == b"\x02\x06", abort
    line = f"a calling AE title that is not printable ASCII: '{shown}'"
    wait_for(lambda: line in node.log()[offset:], 10, "the escaped line")
    written = (Path(node.root) / "node.log").read_bytes()
    assert title.rstrip() not in written
    assert b"Traceback" not in written


def test_a_flood_of_refused_associations_is_counted_not_recorded_one_by_one(
    node: NodeProcess,
) -> None:
    """200 requests from an AE title that is not allowed: each is refused (1/1/3), the log
    holds at most three lines about them, and the catalogue one tally row counting 200."""
    import sqlalchemy as sa
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FLOODER"
    primitive.called_ae_title = "CURIA"
    primitive.presentation_context_definition_list = [build_context(CTImageStorage)]
    primitive.presentation_context_definition_list[0].context_id = 1
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    raw = pdu.encode()
    for _ in range(200):
        with _connect(node, "127.0.0.3") as sock:
            sock.sendall(raw)
            assert sock.recv(10)[:1] == b"\x03"
    engine = sa.create_engine(f"sqlite:///{node.env['CURIA_DATA_DIR']}/catalogue.sqlite")

    def tallied() -> list[tuple[str, int]] | None:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT reason, count FROM refused_associations"
                    " WHERE calling_ae_title = 'FLOODER'"
                )
            ).all()
        total = sum(row[1] for row in rows)
        return [(row[0], row[1]) for row in rows] if total >= 200 else None

    rows = wait_for(tallied, 20, "200 refusals tallied")
    with engine.connect() as connection:
        recorded = connection.execute(
            sa.text("SELECT count(*) FROM associations WHERE calling_ae_title = 'FLOODER'")
        ).scalar()
    engine.dispose()
    assert {reason for reason, _ in rows} == {"not in allow-list"}
    assert len(rows) <= 2  # one per 10-minute period; the flood may straddle two
    assert recorded == 0
    assert node.log().count("refused association from AE 'FLOODER'") <= 3


def _store_begun(node: NodeProcess, size: int) -> socket.socket:
    """An association from the allowed sender that has sent a C-STORE's command and
    ``size`` bytes of its data set, in PDUs of the advertised maximum, and not the end."""
    from node.dimse.messages import command_set

    sock = _associate(node)
    command = command_set(
        [
            (0x0002, str(CTImageStorage).encode() + b"\x00"),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", 1)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, generate_uid().encode()),
        ]
    )
    pdv = struct.pack(">LBB", len(command) + 2, 1, 0x03) + command
    sock.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)
    chunk = MAX_PDU - 6
    for start in range(0, size, chunk):
        value = b"\x00" * min(chunk, size - start)
        pdv = struct.pack(">LBB", len(value) + 2, 1, 0x00) + value
        sock.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)
    return sock


def test_the_listener_stays_within_its_stated_memory_bound_in_the_worst_case(
    node: NodeProcess,
) -> None:
    """Every association slot in the middle of an instance just under instance_memory_mb with
    a PDU of max_pdu in flight, and every other connection holding an A-ASSOCIATE-RQ one byte
    short of its 1 MiB maximum, from two addresses: the node's RSS grows by no more than
    Limits.memory_bound() (the README's formula), echoscu is answered once a slot is free,
    and the memory is used (the worst case was really reached)."""
    from node.dimse.association import Limits

    associations = 4
    limits = Limits(
        max_associations=associations,
        max_connections=MAX_CONNECTIONS,
        max_connections_per_address=PER_ADDRESS,
        max_pdu=MAX_PDU,
        max_instance_bytes=MAX_INSTANCE_MB << 20,
        instance_memory_bytes=INSTANCE_MEMORY_MB << 20,
    )
    before = _status(node)
    # Just under the size that is spilled to disk: the most an association holds in memory,
    # and one more PDU of the maximum length on its way, one byte short.
    held = [_store_begun(node, (INSTANCE_MEMORY_MB << 20) - 4096) for _ in range(associations)]
    for sock in held:
        sock.sendall(struct.pack(">BxL", 0x04, MAX_PDU) + b"\x00" * (MAX_PDU - 1))
    rq = struct.pack(">BxL", 0x01, 1 << 20) + b"\x00" * ((1 << 20) - 1)
    for index in range(MAX_CONNECTIONS - associations):
        sock = _connect(node, ATTACKER if index % 2 else "127.0.0.4")
        sock.sendall(rq)
        held.append(sock)
    try:
        time.sleep(1.0)
        during = _status(node)
        grown = (during["VmRSS"] - before["VmRSS"]) << 10
        bound = limits.memory_bound()
        assert grown <= bound, f"RSS grew {grown >> 20} MiB, bound {bound >> 20} MiB"
        assert grown >= 10 << 20, f"RSS grew only {grown >> 20} MiB: the worst case not held"
        print(f"worst case: RSS grew {grown >> 20} MiB, bound {bound >> 20} MiB")
    finally:
        for sock in held[:associations]:
            sock.close()
    try:  # once the node has seen those associations end, a sender is served again
        wait_for(lambda: _echo(node).returncode == 0, 30, "echoscu answered", interval=1)
    finally:
        for sock in held[associations:]:
            sock.close()


def test_an_instance_larger_than_memory_is_spilled_to_disk_and_stored_whole(
    node: NodeProcess,
) -> None:
    """A 2 MiB data set with instance_memory_mb = 1 is written to the spool as it arrives,
    answered Success and stored byte for byte; one cut short by an A-ABORT leaves no staged
    file behind."""
    ds = _new_ct()
    ds.add_new(0x00091010, "OB", bytes(range(256)) * (2 << 12))
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", node.dicom_port, ae_title="CURIA")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    spool = Path(node.env["CURIA_DATA_DIR"]) / "spool"
    [stored] = [p for p in spool.rglob(f"{ds.SOPInstanceUID}.dcm")]
    kept = dcmread(stored)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    assert kept[0x00091010].value == ds[0x00091010].value
    sock = _store_begun(node, 2 << 20)  # spilled, never finished
    with sock:
        sock.sendall(bytes.fromhex("07 00 00 00 00 04 00 00 00 00"))  # A-ABORT
    wait_for(lambda: not list((spool / ".incoming").glob("*")), 10, "the staged file removed")


def test_a_tls_handshake_trickled_byte_by_byte_ends_at_the_deadline(tmp_path: Path) -> None:
    """On a TLS listener, a client that sends a TLS record header and then one byte every
    0.3 s never completes its handshake: the node closes it within acse_timeout (plus a
    second's grace), though every read sees a byte in time (the handshake's timeout is a
    deadline for the whole handshake, and the gate expires unassociated connections too)."""
    from tests.support.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    env = {
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_DICOM__MIN_FREE_MB": "0",
        "CURIA_DICOM__ACSE_TIMEOUT": "2",
        "CURIA_DICOM__TLS__ENABLED": "true",
        "CURIA_DICOM__TLS__CERT_FILE": str(pki.server_cert),
        "CURIA_DICOM__TLS__KEY_FILE": str(pki.server_key),
        "CURIA_ARCHIVE__ENABLED": "false",
        "CURIA_PIPELINE__EMBEDDED_WORKER": "false",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{os.getpid()}-{free_port()}",
    }
    tls_node = NodeProcess(env, tmp_path)
    tls_node.start()
    try:
        with _connect(tls_node) as sock:
            started = time.monotonic()
            sock.sendall(bytes.fromhex("16 03 01 02 00"))  # a 512-byte handshake record
            closed = False
            while time.monotonic() - started < 10 and not closed:
                time.sleep(0.3)
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    closed = True
            elapsed = time.monotonic() - started
        assert closed and elapsed < 2 + 1 + 3, f"closed: {closed} after {elapsed:.1f} s"
    finally:
        tls_node.stop()


def test_a_pdu_trickled_byte_by_byte_after_association_ends_at_its_deadline(
    tmp_path: Path,
) -> None:
    """An allowed sender, associated, begins a P-DATA-TF and then sends one byte every 0.5 s,
    well within network_timeout each: the node aborts the association network_timeout
    after the PDU's first byte (a PDU once begun must arrive whole in that time), logs why,
    and serves echoscu after it."""
    network_timeout = 2.0
    env = {
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_DICOM__MIN_FREE_MB": "0",
        "CURIA_DICOM__NETWORK_TIMEOUT": str(network_timeout),
        "CURIA_ARCHIVE__ENABLED": "false",
        "CURIA_PIPELINE__EMBEDDED_WORKER": "false",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{os.getpid()}-{free_port()}",
    }
    slow_node = NodeProcess(env, tmp_path)
    slow_node.allow_source("storescu", "STORESCU")
    slow_node.start()
    try:
        with _associate(slow_node) as sock:
            pdv = struct.pack(">LBB", 66, 1, 0x03) + b"\x00" * 64  # a command PDV, never sent
            pdu = struct.pack(">BxL", 0x04, len(pdv)) + pdv
            started = time.monotonic()
            answer = b""
            for byte in pdu:
                try:
                    sock.sendall(bytes([byte]))
                    sock.settimeout(0.5)
                    answer = sock.recv(10)
                except TimeoutError:
                    continue
                except OSError:
                    pass
                break
            elapsed = time.monotonic() - started
            assert answer[:1] == b"\x07", f"no A-ABORT after {elapsed:.1f} s: {answer!r}"
            assert elapsed < network_timeout + 2.0, f"aborted after {elapsed:.1f} s"
            assert _echo(slow_node).returncode == 0
        wait_for(
            lambda: (
                "aborted: 0 stored, 0 failed" in slow_node.log()
                and "timed out waiting for the peer" in slow_node.log()
            ),
            10,
            "the abort and its reason in the log",
        )
    finally:
        slow_node.stop()
