"""Every storage SOP class a study can hold is accepted; a mismatched data set is refused.

A PACS pushes a study whole: images, dose reports, key objects, presentation states, RT
objects. The listener negotiates every storage class of PS3.4, stores each object as it
was received and catalogues its SOP class; a private storage class only when configured.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, _config
from pynetdicom.presentation import build_context
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance
from node.core.settings import DicomSettings
from node.dimse.allow_list import SourcePolicy, add_source
from node.dimse.listener import start_listener
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.env import require_tool
from tests.support.peers import free_port
from tests.support.whole_study import KINDS, build_whole_study

PRIVATE_STORAGE = "1.3.6.1.4.1.9590.100.1.2.4711"  # a vendor's own storage class
Start = Callable[..., tuple[int, Ingestor]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    servers = []

    def run(**settings: object) -> tuple[int, Ingestor]:
        n = len(servers)
        url = f"sqlite:///{tmp_path / f'c{n}.sqlite'}"
        upgrade(url)
        catalogue = Catalogue(url)
        spool = Spool(tmp_path / f"spool{n or ''}", tmp_path / f"quarantine{n or ''}")
        ingestor = Ingestor(spool, catalogue)
        add_source(catalogue, "storescu", "STORESCU", "127.0.0.1", actor="test")
        policy = SourcePolicy(catalogue, accept_any=False, cache_seconds=0)
        port = free_port()
        dicom = DicomSettings(host="127.0.0.1", port=port, **settings)  # type: ignore[arg-type]
        servers.append(start_listener(dicom, ingestor, policy))
        return port, ingestor

    yield run
    for server in servers:
        server.shutdown()


def _catalogued(ingestor: Ingestor) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, path) of every catalogued instance."""
    with ingestor.catalogue.session() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path)
        ).all()
    return {uid: (cls, path) for uid, cls, path in rows}


def test_every_object_of_a_whole_study_is_stored_as_received(start: Start, tmp_path: Path) -> None:
    """DCMTK's storescu sends the whole study (one association): every object Success,
    stored byte for byte after its file meta, catalogued with its SOP class."""
    port, ingestor = start()
    study = build_whole_study(tmp_path / "study", "storage-classes")
    files = study.all_files
    command = [require_tool("storescu"), "-aet", "STORESCU", "-aec", "CURIA", "-xv"]
    result = subprocess.run(
        [*command, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    catalogued = _catalogued(ingestor)
    assert set(catalogued) == study.sop_instance_uids()
    spool = tmp_path / "spool"
    for path in files:
        sent = dcmread(path)
        cls, stored_path = catalogued[str(sent.SOPInstanceUID)]
        assert cls == sent.SOPClassUID
        stored = dcmread(spool / stored_path)
        assert stored.SOPClassUID == sent.SOPClassUID
        # The data set itself is kept as received (the file meta is the node's own).
        assert stored.PixelData == sent.PixelData if "PixelData" in sent else stored == sent
    assert len(KINDS) == len(study.files) == 7


def test_every_storage_class_of_ps3_4_is_negotiated_and_a_private_one_is_not(
    start: Start,
) -> None:
    port, _ = start()
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert {"1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.67"} <= set(classes)
    accepted: set[str] = set()
    for chunk in (classes[:120], [*classes[120:], PRIVATE_STORAGE]):  # 128 contexts at most
        scu = AE(ae_title="STORESCU")
        scu.requested_contexts = [build_context(uid) for uid in chunk]
        assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
        assert assoc.is_established
        accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
    assert accepted == set(classes), sorted(set(classes) - accepted)


def _private_object(tmp_path: Path) -> Path:
    source = build_whole_study(tmp_path / "study", "private")
    ds = dcmread(source.files["sc"][0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_STORAGE
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _send(port: int, path: Path, sop_class: str, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """C-STORE the file as it is (command from its file meta); None when the class was
    not accepted at negotiation."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    scu = AE(ae_title="STORESCU")
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    scu.add_requested_context(sop_class, syntax)
    scu.add_requested_context("1.2.840.10008.1.1")  # Verification: the association stands
    assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established
    try:
        if sop_class not in {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}:
            return None
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_a_private_storage_class_is_stored_only_when_allowed(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _private_object(tmp_path)
    port, ingestor = start()
    assert _send(port, path, PRIVATE_STORAGE, monkeypatch) is None, "refused by default"
    assert _catalogued(ingestor) == {}

    port, ingestor = start(accept_unknown_storage=True)
    assert _send(port, path, PRIVATE_STORAGE, monkeypatch) == 0x0000
    [(cls, _)] = _catalogued(ingestor).values()
    assert cls == PRIVATE_STORAGE
    # A known service the node does not offer stays refused (Study Root Q/R FIND).
    assert _send(port, path, "1.2.840.10008.5.1.4.1.2.2.1", monkeypatch) is None


def test_a_data_set_of_another_class_than_the_command_is_refused_0xa900(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command says CT Image Storage, the data set says it is an MR image: refused
    with 0xA900 and quarantined, nothing catalogued; the same object sent right is kept."""
    port, ingestor = start()
    study = build_whole_study(tmp_path / "study", "mismatch")
    ds = dcmread(study.files["axial"][0])
    ct = str(ds.SOPClassUID)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    wrong = tmp_path / "wrong.dcm"
    ds.save_as(wrong)  # file meta (the command) still says CT
    assert str(dcmread(wrong).file_meta.MediaStorageSOPClassUID) == ct
    assert _send(port, wrong, ct, monkeypatch) == 0xA900
    assert _catalogued(ingestor) == {}
    assert len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 1
    assert _send(port, study.files["axial"][0], ct, monkeypatch) == 0x0000
    assert len(_catalogued(ingestor)) == 1
