"""Receive -> store -> catalogue, without a network: durability, refusals, duplicates."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy import func, select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import AuditEvent, Instance, Series, Study
from node.core.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from node.core.uids import InvalidUID, is_valid_uid, validate_uid
from node.store.disk import DiskGuard
from node.store.header import InstanceHeader, RejectedInstance, header_from, parse_header
from node.store.ingest import MAX_NESTING, Ingestor, IngestOutcome
from node.store.spool import STAGING_DIR, Spool, StagedFile, StoredFile
from tests.support.fuzzing import Element, dataset_offset, element_map, file_meta
from tests.support.peers import free_port


def make_ingestor(root: Path, duplicate_policy: str = "keep_first") -> Ingestor:
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'catalogue.sqlite'}"
    upgrade(url)
    spool = Spool(root / "spool", root / "quarantine")
    return Ingestor(spool, Catalogue(url), duplicate_policy=duplicate_policy)


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    return make_ingestor(tmp_path)


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
    """The quarantine's records: one line each in its days' indexes."""
    indexes = sorted((root / "quarantine").rglob("index.jsonl"))
    return [json.loads(line) for p in indexes for line in p.read_text().splitlines()]


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


# --- a batch of staged instances (STOW-RS) -------------------------------------------------


def staged(spool: Spool, data: bytes) -> tuple[StagedFile, InstanceHeader | RejectedInstance]:
    """``data`` staged and synced as STOW-RS stages a part, with its header or refusal."""
    file = spool.stage()
    file.write(data)
    file.sync()
    try:
        return file, header_from(parse_header(data))
    except RejectedInstance as exc:
        return file, exc


def catalogue_rows(ingestor: Ingestor) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """What the catalogue holds, without ids and timestamps."""
    with ingestor.catalogue.session() as session:
        studies = [
            (s.study_instance_uid, s.patient_id, s.study_date, s.accession_number)
            for s in session.scalars(select(Study))
        ]
        series = [
            (
                s.series_instance_uid,
                s.modality,
                s.series_description,
                s.body_part_examined,
                s.calling_ae_title,
                s.instance_count,
                s.state,
                s.last_received_at is not None,
            )
            for s in session.scalars(select(Series))
        ]
        instances = sorted(
            (
                i.sop_instance_uid,
                i.series.series_instance_uid,
                i.sop_class_uid,
                i.transfer_syntax_uid,
                i.instance_number,
                i.path,
                i.size,
                i.sha256,
                i.received_at is not None,
            )
            for i in session.scalars(select(Instance))
        )
    return studies, series, instances


def test_a_staged_batch_catalogues_what_single_ingests_do(tmp_path: Path) -> None:
    datas = [
        ct_bytes(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.{i}", InstanceNumber=str(i))
        for i in range(1, 6)
    ]
    single = make_ingestor(tmp_path / "single")
    for data in datas:
        assert single.ingest(data, "STOW-RS").status == SUCCESS
    batch = make_ingestor(tmp_path / "batch")
    outcomes = batch.ingest_staged([staged(batch.spool, data) for data in datas], "STOW-RS")
    assert [o.status for o in outcomes] == [SUCCESS] * 5
    assert not any(o.duplicate for o in outcomes)
    assert catalogue_rows(batch) == catalogue_rows(single)
    with batch.catalogue.session() as session:
        for row in session.scalars(select(Instance)):
            assert batch.spool.absolute(row.path).read_bytes() in datas
    assert not list((batch.spool.root / STAGING_DIR).iterdir()), "every staged file was placed"


def test_a_staged_batch_handles_duplicates_like_single_ingests(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path)
    first, other = ct_bytes(), ct_bytes(PatientName="OTHER^NAME")
    assert ingestor.ingest(first, "A").status == SUCCESS
    again = [staged(ingestor.spool, data) for data in (first, other, other)]
    outcomes = ingestor.ingest_staged(again, "B")
    assert [(o.status, o.duplicate) for o in outcomes] == [(SUCCESS, True)] * 3
    assert count(ingestor, Instance) == 1
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance)).one()
        assert ingestor.spool.absolute(row.path).read_bytes() == first
        assert session.scalars(select(Series)).one().instance_count == 1
        events = session.scalars(select(AuditEvent)).all()
        assert [e.action for e in events] == ["duplicate-differs-kept-first"] * 2


def test_a_uid_twice_in_one_batch_is_stored_once(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path, duplicate_policy="replace")
    first, second = ct_bytes(), ct_bytes(PatientName="OTHER^NAME")
    batch = [staged(ingestor.spool, data) for data in (first, first, second)]
    outcomes = ingestor.ingest_staged(batch, "B")
    assert [(o.status, o.duplicate) for o in outcomes] == [
        (SUCCESS, False),
        (SUCCESS, True),
        (SUCCESS, True),
    ]
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance)).one()
        assert ingestor.spool.absolute(row.path).read_bytes() == second, "replaced"
        assert session.scalars(select(Series)).one().instance_count == 1
        [event] = session.scalars(select(AuditEvent)).all()
        assert event.action == "duplicate-differs-replaced"


def test_a_staged_batch_quarantines_refusals_and_stores_the_rest(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path)
    good = ct_bytes()
    batch = [
        staged(ingestor.spool, ct_bytes(StudyInstanceUID="1.2..3")),
        staged(ingestor.spool, b"not DICOM at all"),
        staged(ingestor.spool, good),
    ]
    outcomes = ingestor.ingest_staged(batch, "STOW-RS")
    assert [o.status for o in outcomes] == [
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        CANNOT_UNDERSTAND,
        SUCCESS,
    ]
    assert count(ingestor, Instance) == 1
    records = quarantined(tmp_path)
    reasons = [meta["reason"] for meta in records]
    assert len(reasons) == 2 and any("StudyInstanceUID" in r for r in reasons)
    # Junk too short to be a file is kept in its record, not as a file of its own.
    assert len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 1
    assert [bytes.fromhex(r["head"]) for r in records if "head" in r] == [b"not DICOM at all"]
    assert not list((tmp_path / "spool").rglob(".incoming/*")), "no staged file is left"
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1


def test_a_failed_commit_stores_nothing_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = make_ingestor(tmp_path)

    def broken(*args: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(ingestor, "_add_instances", broken)
    datas = [ct_bytes(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.{i}") for i in range(1, 4)]
    outcomes = ingestor.ingest_staged([staged(ingestor.spool, d) for d in datas], "STOW-RS")
    assert {(o.status, o.reason) for o in outcomes} == {
        (OUT_OF_RESOURCES, "cannot write to the catalogue")
    }
    assert count(ingestor, Instance) == 0
    assert not list((tmp_path / "spool").rglob("*.dcm")), "placed files are removed again"


def test_a_staged_batch_below_the_watermark_is_refused(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path)
    ingestor.guard = DiskGuard(tmp_path, min_free_bytes=1 << 62)
    outcomes = ingestor.ingest_staged([staged(ingestor.spool, ct_bytes())], "STOW-RS")
    assert [o.status for o in outcomes] == [OUT_OF_RESOURCES]
    assert count(ingestor, Instance) == 0


def test_staged_files_are_placed_durably_or_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    kept, dropped = spool.stage(), spool.stage()
    for file in (kept, dropped):
        file.write(b"abc")
        file.write(memoryview(b"def"))
        file.sync()
    assert kept.size == 6 and kept.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    [stored] = spool.place([(kept, "1.2/1.3/1.4.dcm")])
    assert isinstance(stored, StoredFile) and stored.size == 6
    assert spool.absolute("1.2/1.3/1.4.dcm").read_bytes() == b"abcdef"
    for file in (kept, dropped):
        file.discard()
    assert spool.absolute("1.2/1.3/1.4.dcm").exists(), "a placed file is not discarded"
    assert not list((spool.root / STAGING_DIR).iterdir())


def test_stale_staging_files_are_swept(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / STAGING_DIR
    folder.mkdir(parents=True)
    stale, fresh = folder / "old.part", folder / "new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    Spool(tmp_path / "spool", tmp_path / "quarantine").stage().discard()
    assert sorted(p.name for p in folder.iterdir()) == ["new.part"]


def test_concurrent_batches_and_single_ingests_store_each_uid_once(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path)
    datas = [ct_bytes(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.{i}") for i in range(1, 41)]
    outcomes: list[IngestOutcome] = []
    lock = threading.Lock()

    def batch(chunk: list[bytes]) -> None:
        result = ingestor.ingest_staged([staged(ingestor.spool, d) for d in chunk], "STOW-RS")
        with lock:
            outcomes.extend(result)

    def single(chunk: list[bytes]) -> None:
        result = [ingestor.ingest(d, "MODALITY") for d in chunk]
        with lock:
            outcomes.extend(result)

    workers = [
        threading.Thread(target=batch, args=(datas,)),
        threading.Thread(target=batch, args=(datas[::-1],)),
        threading.Thread(target=single, args=(datas[10:30],)),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(worker.is_alive() for worker in workers), "no deadlock"
    assert len(outcomes) == 100 and {o.status for o in outcomes} == {SUCCESS}
    assert sum(not o.duplicate for o in outcomes) == 40, "each instance stored once"
    assert count(ingestor, Instance) == 40
    with ingestor.catalogue.session() as session:
        assert session.scalars(select(Series)).one().instance_count == 40


# --- bytes that are not a well-formed data set (found by tests/test_fuzz.py) -----------------


def unreachable_catalogue() -> Catalogue:
    """A catalogue whose database server is down: nothing listens on its port."""
    return Catalogue(f"postgresql+psycopg://curia@127.0.0.1:{free_port()}/curia")


def element(dataset: bytes, tag: int) -> Element:
    return next(e for e in element_map(dataset, implicit=False) if e.tag == tag)


def nested_sequences(depth: int) -> bytes:
    """A private sequence (0009,1099) with ``depth`` levels, each in the one before."""
    opening = b"\x09\x00\x99\x10SQ\x00\x00" + b"\xff" * 4 + b"\xfe\xff\x00\xe0" + b"\xff" * 4
    closing = b"\xfe\xff\x0d\xe0" + b"\x00" * 4 + b"\xfe\xff\xdd\xe0" + b"\x00" * 4
    return opening * depth + closing * depth


def with_nesting(depth: int) -> bytes:
    data = ct_bytes()
    offset = dataset_offset(data)
    after = next(e for e in element_map(data[offset:], False) if e.tag > 0x00091099)
    return data[: offset + after.start] + nested_sequences(depth) + data[offset + after.start :]


def malformed(defect: str) -> bytes:
    """The sample CT (explicit VR little endian) with one defect."""
    data = ct_bytes()
    offset = dataset_offset(data)
    meta, dataset = data[:offset], data[offset:]
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    identity = (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    pixels = element(dataset, 0x7FE00010)
    if defect == "cut inside the pixel data":
        return data[: offset + pixels.value_at + pixels.length // 2]
    if defect == "cut inside the Series Instance UID":
        series = element(dataset, 0x0020000E)
        return data[: offset + series.value_at + series.length // 2]
    if defect == "a length past the end":
        at = offset + pixels.length_at
        return data[:at] + (pixels.length + 2).to_bytes(4, "little") + data[at + 4 :]
    if defect == "an unknown VR":
        modality = element(dataset, 0x00080060)
        return data[: offset + modality.start + 4] + b"zz" + data[offset + modality.start + 6 :]
    if defect == "undefined length on a text value":
        modality = element(dataset, 0x00080060)
        header = dataset[modality.start : modality.start + 4] + b"UT\x00\x00" + b"\xff" * 4
        return meta + dataset[: modality.start] + header + dataset[modality.value_at :]
    if defect == "native pixel data under JPEG 2000":
        return file_meta(*identity, JPEG2000Lossless) + dataset
    if defect == "explicit VR data under implicit VR":
        return file_meta(*identity, ImplicitVRLittleEndian) + dataset
    if defect == "deflated, but not deflated":
        return file_meta(*identity, DeflatedExplicitVRLittleEndian) + dataset
    if defect == "file meta cut short":
        return data[: offset - 10]
    if defect == "sequences nested too deep":
        return with_nesting(5000)
    raise AssertionError(defect)


@pytest.mark.parametrize(
    "defect",
    [
        # what the node answered before it checked the structure:
        "cut inside the pixel data",  # Success: only the header was read
        "cut inside the Series Instance UID",  # 0xA900, or Success under the cut UID
        "a length past the end",  # Success
        "an unknown VR",  # 0xA900 or Success (the rest misread), or 0xC211 (an exception)
        "undefined length on a text value",  # 0xA900 or Success
        "native pixel data under JPEG 2000",  # Success
        "explicit VR data under implicit VR",  # Success: pydicom guesses the encoding
        "deflated, but not deflated",  # 0xC211: zlib.error escaped the handler
        "file meta cut short",  # 0xA900 or 0xC000, depending on the cut
        "sequences nested too deep",  # 0xC211: RecursionError escaped the handler
    ],
)
def test_malformed_bytes_get_cannot_understand(
    ingestor: Ingestor, tmp_path: Path, defect: str
) -> None:
    outcome = ingestor.ingest(malformed(defect), "MODALITY")
    assert (outcome.status, outcome.reason.split(":")[0]) == (
        CANNOT_UNDERSTAND,
        "not a well-formed DICOM file",
    )
    assert count(ingestor, Instance) == 0
    assert not list((tmp_path / "spool").rglob("*.dcm"))
    assert len(quarantined(tmp_path)) == 1


def test_sequences_nested_to_the_limit_are_stored(ingestor: Ingestor) -> None:
    assert ingestor.ingest(with_nesting(MAX_NESTING), "MODALITY").status == SUCCESS
    assert ingestor.ingest(with_nesting(MAX_NESTING + 1), "MODALITY").status == CANNOT_UNDERSTAND


def test_a_staged_part_is_checked_from_its_file(tmp_path: Path) -> None:
    """STOW-RS parses parts larger than one write from the staged file."""
    path = tmp_path / "part.dcm"
    path.write_bytes(malformed("cut inside the pixel data"))
    with pytest.raises(RejectedInstance) as refused:
        parse_header(path)
    assert refused.value.status == CANNOT_UNDERSTAND
    path.write_bytes(ct_bytes())
    assert str(parse_header(path).Modality) == "CT"


def test_a_value_that_cannot_be_decoded_is_refused_before_cataloguing() -> None:
    """An element pydicom cannot decode fails the instance as unreadable, not later in
    the catalogue transaction as Out of Resources."""
    ds = parse_header(ct_bytes())
    ds[0x00080060] = RawDataElement(Tag(0x00080060), "QQ", 2, b"CT", 0, False, True)
    with pytest.raises(RejectedInstance) as refused:
        header_from(ds)
    assert refused.value.status == CANNOT_UNDERSTAND


def test_a_refusal_stands_when_the_quarantine_cannot_be_written(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingestor.spool, "quarantine", disk_full)
    assert ingestor.ingest(b"not DICOM", "MODALITY").status == CANNOT_UNDERSTAND


def test_an_unreachable_catalogue_gets_out_of_resources_and_one_log_line(
    ingestor: Ingestor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ingestor.catalogue = unreachable_catalogue()
    with caplog.at_level(logging.ERROR, logger="node.store.ingest"):
        single = ingestor.ingest(ct_bytes(), "MODALITY")
        batch = ingestor.ingest_staged([staged(ingestor.spool, ct_bytes())], "STOW-RS")
    assert [(o.status, o.reason) for o in [single, *batch]] == [
        (OUT_OF_RESOURCES, "cannot read the catalogue")
    ] * 2
    records = [r for r in caplog.records if r.name == "node.store.ingest"]
    assert len(records) == 2
    for record in records:
        assert record.exc_info is None and "\n" not in record.getMessage()
        assert "OperationalError" in record.getMessage()
    assert not list((tmp_path / "spool").rglob("*.dcm")), "nothing is written"
