"""The DIMSE listener against DCMTK's echoscu/storescu: statuses a sender relies on."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance
from node.core.settings import DicomSettings
from node.dimse.allow_list import (
    PeerError,
    SourcePolicy,
    add_local_title,
    add_source,
    remove_local_title,
)
from node.dimse.listener import start_listener
from node.store.disk import DiskGuard
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.env import require_tool
from tests.support.peers import free_port, wait_for
from tests.support.testdata import repaired_ct_series, totalseg_ct_dir

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[int, Ingestor]]:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    for name in ("STORESCU", "ECHOSCU"):
        add_source(catalogue, name.lower(), name, "127.0.0.1", actor="test")
    policy = SourcePolicy(catalogue, accept_any=False, cache_seconds=0)
    port = free_port()
    server = start_listener(DicomSettings(host="127.0.0.1", port=port), ingestor, policy)
    yield port, ingestor
    server.shutdown()


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool), *args], capture_output=True, text=True, env=DCMTK_ENV, timeout=120
    )


def stored(ingestor: Ingestor) -> int:
    with ingestor.catalogue.session() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def test_echo(listener: tuple[int, Ingestor]) -> None:
    port, _ = listener
    result = dcmtk("echoscu", "-aec", "CURIA", "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr


def test_wrong_called_ae_title_is_rejected(listener: tuple[int, Ingestor]) -> None:
    port, _ = listener
    result = dcmtk("echoscu", "-aec", "NOTCURIA", "127.0.0.1", str(port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout


def test_a_local_ae_title_added_while_running_is_answered(
    listener: tuple[int, Ingestor],
) -> None:
    port, ingestor = listener
    echo = ("echoscu", "-aet", "ECHOSCU", "-aec", "CURIA-NEURO", "127.0.0.1", str(port))
    refused = dcmtk(*echo)
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    add_local_title(ingestor.catalogue, "CURIA-NEURO", actor="test")
    assert dcmtk(*echo).returncode == 0, "answered without a restart"
    assert (
        dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "CURIA", "127.0.0.1", str(port)).returncode == 0
    )
    remove_local_title(ingestor.catalogue, "CURIA-NEURO", actor="test")
    assert dcmtk(*echo).returncode != 0
    with pytest.raises(PeerError, match="AE title"):
        add_local_title(ingestor.catalogue, "WAY-TOO-LONG-AE-TITLE", actor="test")


def test_unknown_calling_ae_title_is_rejected(listener: tuple[int, Ingestor]) -> None:
    port, _ = listener
    result = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "CURIA", "127.0.0.1", str(port))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout


def test_known_ae_title_from_another_address_is_rejected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "remote", "ECHOSCU", "10.9.8.7", actor="test")
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    port = free_port()
    policy = SourcePolicy(catalogue, accept_any=False, cache_seconds=0)
    server = start_listener(DicomSettings(host="127.0.0.1", port=port), ingestor, policy)
    try:
        refused = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "CURIA", "127.0.0.1", str(port))
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
        add_source(catalogue, "local", "ECHOSCU", "127.0.0.0/8", actor="test")
        allowed = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "CURIA", "127.0.0.1", str(port))
        assert allowed.returncode == 0, "a new source applies without a restart"
    finally:
        server.shutdown()


def test_storescu_stores_compressed_and_uncompressed(
    listener: tuple[int, Ingestor], tmp_path: Path
) -> None:
    port, ingestor = listener
    jpeg2000 = [str(p) for p in repaired_ct_series(tmp_path / "ct", "dimse-test")[:3]]
    # -xv: propose JPEG 2000 lossless (storescu proposes only uncompressed by default)
    for option, files in (("-xe", [get_testdata_file("CT_small.dcm")]), ("-xv", jpeg2000)):
        result = dcmtk("storescu", "-aec", "CURIA", option, "127.0.0.1", str(port), *files)
        assert result.returncode == 0, result.stderr
    assert stored(ingestor) == 4


def test_empty_uids_get_a_failure_status_and_are_quarantined(
    listener: tuple[int, Ingestor], tmp_path: Path
) -> None:
    """The real TotalSegmentator sample has empty Study/Series UIDs: refused, kept aside.

    (Its SOP Class/Instance UIDs are filled in first: storescu will not send without them.)
    """
    port, ingestor = listener
    ds = dcmread(sorted(totalseg_ct_dir().iterdir())[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.StudyInstanceUID == "" and ds.SeriesInstanceUID == ""
    sample = tmp_path / "empty-study-uid.dcm"
    ds.save_as(sample)
    result = dcmtk("storescu", "-v", "-aec", "CURIA", "-xv", "127.0.0.1", str(port), str(sample))
    output = result.stdout + result.stderr
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
    assert stored(ingestor) == 0
    assert len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 1


def test_below_the_disk_watermark_nothing_is_accepted(tmp_path: Path) -> None:
    """New associations are refused as transient congestion; an open one gets 0xA700."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "scu", "SCU", "127.0.0.1", actor="test")
    guard = DiskGuard(tmp_path, min_free_bytes=0)
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue, guard)
    port = free_port()
    policy = SourcePolicy(catalogue, accept_any=False, cache_seconds=0)
    server = start_listener(DicomSettings(host="127.0.0.1", port=port), ingestor, policy)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
        assert assoc.is_established
        guard.min_free_bytes = guard.free_bytes() * 2  # the disk "fills up" mid-association
        status = assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm")))
        assoc.release()
        assert status.Status == 0xA700
        assert stored(ingestor) == 0

        refused = scu.associate("127.0.0.1", port, ae_title="CURIA")
        assert refused.is_rejected
        assert (
            refused.acceptor.primitive.result_source,
            refused.acceptor.primitive.diagnostic,
        ) == (
            0x03,
            0x01,
        )
    finally:
        server.shutdown()


def test_every_association_is_recorded_without_patient_data(
    listener: tuple[int, Ingestor], tmp_path: Path
) -> None:
    from node.catalogue.models import AssociationRecord, RefusedAssociations

    port, ingestor = listener
    dcmtk(
        "storescu",
        "-aec",
        "CURIA",
        "-xe",
        "127.0.0.1",
        str(port),
        get_testdata_file("CT_small.dcm"),
    )
    dcmtk("echoscu", "-aet", "STRANGER", "-aec", "CURIA", "127.0.0.1", str(port))

    def records() -> tuple[dict[str, AssociationRecord], list[RefusedAssociations]] | None:
        with ingestor.catalogue.session() as session:
            rows = {r.calling_ae_title: r for r in session.scalars(select(AssociationRecord))}
            tallies = list(session.scalars(select(RefusedAssociations)))
        return (rows, tallies) if rows and tallies else None

    rows, [refused] = wait_for(records, 10, "the association and the refusal are recorded")
    stored_row = rows["STORESCU"]
    assert "STRANGER" not in rows, "a refusal is counted, not recorded one by one"
    assert (stored_row.outcome, stored_row.stored, stored_row.failed) == ("released", 1, 0)
    assert stored_row.statuses == {"0x0000": 1} and stored_row.bytes_received > 0
    assert stored_row.address == "127.0.0.1" and stored_row.ended_at is not None
    assert (refused.calling_ae_title, refused.address) == ("STRANGER", "127.0.0.1")
    assert (refused.reason, refused.count) == ("not in allow-list", 1)


def _tls_listener(tmp_path: Path, require_client_cert: bool):
    from node.core.settings import TlsSettings
    from tests.support.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "echo", "ECHOSCU", "127.0.0.1", actor="test")
    add_source(catalogue, "store", "STORESCU", "127.0.0.1", actor="test")
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    tls = TlsSettings(
        enabled=True,
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        ca_file=pki.ca_cert,
        require_client_cert=require_client_cert,
    )
    port = free_port()
    settings = DicomSettings(host="127.0.0.1", port=port, tls=tls)
    server = start_listener(settings, ingestor, SourcePolicy(catalogue, False, 0))
    return pki, port, ingestor, server


@pytest.mark.slow
def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """DCMTK's TLS-enabled storescu: a trusted client stores; one without a cert is refused."""
    pki, port, ingestor, server = _tls_listener(tmp_path, require_client_cert=True)
    try:
        with_cert = dcmtk(
            "storescu",
            "+tls",
            str(pki.client_key),
            str(pki.client_cert),
            "+cf",
            str(pki.ca_cert),
            "-aec",
            "CURIA",
            "-xe",
            "127.0.0.1",
            str(port),
            get_testdata_file("CT_small.dcm"),
        )
        assert with_cert.returncode == 0, with_cert.stderr
        assert stored(ingestor) == 1
        anonymous = dcmtk("echoscu", "+tla", "-ic", "-aec", "CURIA", "127.0.0.1", str(port))
        assert anonymous.returncode != 0, "a client without a certificate is refused"
        plain = dcmtk("echoscu", "-aec", "CURIA", "127.0.0.1", str(port))
        assert plain.returncode != 0, "plain TCP is refused on a TLS port"
    finally:
        server.shutdown()


@pytest.mark.slow
def test_tls_server_certificate_only(tmp_path: Path) -> None:
    pki, port, _, server = _tls_listener(tmp_path, require_client_cert=False)
    try:
        result = dcmtk(
            "echoscu", "+tla", "+cf", str(pki.ca_cert), "-aec", "CURIA", "127.0.0.1", str(port)
        )
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()


# --- bad input and a catalogue that is down -------------------------------------------------


def _store_bytes(port: int, path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """C-STORE the data set of the file at ``path`` as it is, in a context for ``syntax``."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # no decoding on the way
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, syntax)
    assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize(
    "defect",
    [
        "deflated",  # zlib.error escaped the handler: 0xC211
        "cut",  # the header alone was read: stored with Success
        "trailing",  # bytes after the pixel data that are no element
    ],
)
def test_bytes_that_are_no_data_set_get_cannot_understand(
    listener: tuple[int, Ingestor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    defect: str,
) -> None:
    from tests.support.fuzzing import dataset_offset, file_meta

    port, ingestor = listener
    [source] = repaired_ct_series(tmp_path / "ct", "dimse-bad-bytes")[:1]
    data = source.read_bytes()
    ds = dcmread(source, stop_before_pixels=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if defect == "deflated":
        syntax = "1.2.840.10008.1.2.1.99"
        data = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, syntax) + data[dataset_offset(data) :]
    elif defect == "cut":
        data = data[: len(data) - 1000]
    else:
        data += b"\xfc\xff\xfc"
    sent = tmp_path / "sent.dcm"
    sent.write_bytes(data)
    assert _store_bytes(port, sent, syntax, monkeypatch) == 0xC000
    assert stored(ingestor) == 0
    assert len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 1


def test_elements_after_the_pixel_data_are_received_and_stored(
    listener: tuple[int, Ingestor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header is read from a data set's first fragment, which says where its pixel data
    ends; CT_small goes on past that (an element after its pixels): read whole, stored whole."""
    port, ingestor = listener
    source = Path(get_testdata_file("CT_small.dcm"))
    syntax = str(dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert _store_bytes(port, source, syntax, monkeypatch) == 0x0000
    [path] = (tmp_path / "spool").rglob("*.dcm")
    assert dcmread(path)[0xFFFCFFFC].value == dcmread(source)[0xFFFCFFFC].value
    assert stored(ingestor) == 1


def _unreachable() -> Catalogue:
    return Catalogue(f"postgresql+psycopg://curia@127.0.0.1:{free_port()}/curia")


def test_a_c_store_while_the_catalogue_is_down_gets_out_of_resources(
    listener: tuple[int, Ingestor], caplog: pytest.LogCaptureFixture
) -> None:
    """Not pynetdicom's 0xC211 and a traceback: 0xA700 (the sender keeps the instance and
    retries) and one line in the log."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    port, ingestor = listener
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage)
    assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established
    working, ingestor.catalogue = ingestor.catalogue, _unreachable()
    try:
        with caplog.at_level(logging.ERROR):
            status = assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm")))
            assoc.release()
    finally:
        ingestor.catalogue = working
    assert status.Status == 0xA700
    assert stored(ingestor) == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(r.exc_info is None for r in errors), "no traceback"
    assert any(r.name == "node.store.ingest" for r in errors)


def test_senders_are_refused_while_the_allow_list_cannot_be_read(tmp_path: Path) -> None:
    """pynetdicom would log the handler's exception and accept the association: an
    unchecked sender is refused instead, as transient congestion."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "scu", "SCU", "127.0.0.1", actor="test")
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    policy = SourcePolicy(catalogue, accept_any=False, cache_seconds=0)
    port = free_port()
    server = start_listener(DicomSettings(host="127.0.0.1", port=port), ingestor, policy)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    try:
        policy.catalogue = _unreachable()
        refused = scu.associate("127.0.0.1", port, ae_title="CURIA")
        assert refused.is_rejected
        answer = refused.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x01)
        policy.catalogue = catalogue
        accepted = scu.associate("127.0.0.1", port, ae_title="CURIA")
        assert accepted.is_established, "accepted again once the catalogue answers"
        accepted.release()
    finally:
        server.shutdown()
