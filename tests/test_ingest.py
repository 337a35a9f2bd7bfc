"""Receive -> store -> catalogue, without a network: durability, refusals, duplicates."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import AuditEvent, Instance, Series
from node.ingest import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS, Ingestor
from node.storage import Spool
from node.uids import InvalidUID, is_valid_uid, validate_uid


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    url = f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    upgrade(url)
    return Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), Catalogue(url))


def ct_bytes(**changes: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for name, value in changes.items():
        setattr(ds, name, value)
        if name == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def count(ingestor: Ingestor, model: type) -> int:
    with ingestor.catalogue.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def quarantined(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "quarantine").rglob("*.json"))]


def test_success_means_file_on_disk_and_row_committed(ingestor: Ingestor) -> None:
    data = ct_bytes()
    outcome = ingestor.ingest(data, "MODALITY")
    assert outcome.status == SUCCESS
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance)).one()
        series = session.scalars(select(Series)).one()
        assert ingestor.spool.absolute(row.path).read_bytes() == data
        assert series.instance_count == 1
        assert series.calling_ae_title == "MODALITY"
    leftovers = list(ingestor.spool.root.rglob("*.tmp"))
    assert leftovers == [], "no temporary file is left behind"


@pytest.mark.parametrize(
    ("field", "value"),
    [("StudyInstanceUID", ""), ("SeriesInstanceUID", "1.2.3..4"), ("SOPInstanceUID", "../../etc")],
)
def test_missing_or_bad_uid_is_refused_and_quarantined(
    ingestor: Ingestor, tmp_path: Path, field: str, value: str
) -> None:
    outcome = ingestor.ingest(ct_bytes(**{field: value}), "MODALITY")
    assert outcome.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert field in outcome.reason
    assert count(ingestor, Instance) == 0
    assert not list((tmp_path / "spool").rglob("*.dcm")), "nothing lands in the spool"
    [meta] = quarantined(tmp_path)
    assert field in meta["reason"]


def test_unreadable_bytes_get_cannot_understand(ingestor: Ingestor, tmp_path: Path) -> None:
    outcome = ingestor.ingest(b"DICM but not really" * 10, "MODALITY")
    assert outcome.status == CANNOT_UNDERSTAND
    assert len(quarantined(tmp_path)) == 1


def test_identical_duplicate_is_stored_once(ingestor: Ingestor) -> None:
    data = ct_bytes()
    assert ingestor.ingest(data, "A").status == SUCCESS
    second = ingestor.ingest(data, "A")
    assert second.status == SUCCESS and second.duplicate
    assert count(ingestor, Instance) == 1


def test_different_duplicate_keeps_first_and_is_recorded(ingestor: Ingestor) -> None:
    first = ct_bytes()
    assert ingestor.ingest(first, "A").status == SUCCESS
    assert ingestor.ingest(ct_bytes(PatientName="OTHER^NAME"), "B").status == SUCCESS
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance)).one()
        assert ingestor.spool.absolute(row.path).read_bytes() == first
        [event] = session.scalars(select(AuditEvent)).all()
        assert event.action == "duplicate-differs-kept-first"


@pytest.mark.parametrize(
    "uid", ["", "1.2.", ".1.2", "1..2", "1.02", "1.2.a", "1" * 65, "../1", "1.2/3"]
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID):
        validate_uid(uid)


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.1.2", "1.0.3", "9" * 64])
def test_valid_uids(uid: str) -> None:
    assert validate_uid(uid) == uid


def test_replace_policy_swaps_the_file_and_records_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    upgrade(url)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    ingestor = Ingestor(spool, Catalogue(url), duplicate_policy="replace")
    assert ingestor.ingest(ct_bytes(), "A").status == SUCCESS
    second = ct_bytes(PatientName="OTHER^NAME")
    assert ingestor.ingest(second, "B").status == SUCCESS
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance)).one()
        assert spool.absolute(row.path).read_bytes() == second
        [event] = session.scalars(select(AuditEvent)).all()
        assert event.action == "duplicate-differs-replaced"
