"""DICOMweb against real peers: Orthanc pushes a study by STOW-RS, dicomweb-client queries
and retrieves it, and malformed or unwelcome requests get the PS3.18 answers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from xml.etree.ElementTree import fromstring

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance, PipelineRun, Result, Series
from node.core.settings import Settings
from node.dicomweb import create_dicomweb_router
from node.dicomweb.multipart import MultipartError, MultipartReader
from node.dicomweb.rendering import json_to_xml
from node.dicomweb.stow import WRITE_CHUNK, PartOutcome, StowUpload, stow_answer
from node.store.ingest import RejectedInstance
from node.store.spool import STAGING_DIR, Spool
from tests.support.api_server import STOW_TYPE, RunningNode, multipart_body, running_node
from tests.support.peers import Orthanc
from tests.support.testdata import BASIC_TEXT_SR, TEST_PATIENT_ID, make_sr


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("node")) as running:
        yield running


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def failure_reasons(answer: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


def referenced(answer: dict) -> list[str]:
    items = answer.get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- STOW-RS from a real Orthanc -----------------------------------------------------------


@pytest.mark.e2e
def test_orthanc_pushes_a_study_with_its_dicomweb_client(
    orthanc: Orthanc, node: RunningNode, ct_series: list[Path]
) -> None:
    # The DICOMweb server entry Orthanc would read from "DicomWeb": {"Servers": ...},
    # registered through Orthanc's REST API so the shared Orthanc serves every test.
    name = f"node-{uuid.uuid4().hex[:8]}"
    orthanc.put(
        f"/dicom-web/servers/{name}",
        {"Url": f"{node.dicomweb}/", "HttpHeaders": {"Authorization": f"Bearer {node.token}"}},
    )
    study = orthanc.upload(ct_series)
    orthanc.post(f"/dicom-web/servers/{name}/stow", json={"Resources": [study]})

    stored = node.catalogued([sop_uid(path) for path in ct_series])
    assert len(stored) == 20, "every instance Orthanc sent is catalogued"
    for path in ct_series:
        row = stored[sop_uid(path)]
        assert row.sha256 == sha256(path), "stored exactly as sent"
        assert (node.settings.spool_dir / row.path).read_bytes() == path.read_bytes()
    with node.catalogue.session() as session:
        series = session.get(Series, next(iter(stored.values())).series_id)
        assert series.instance_count == 20
        assert series.calling_ae_title == "STOW-RS"
        assert series.last_received_at is not None, "the completion watcher will see it"


# --- QIDO-RS and WADO-RS with dicomweb-client ----------------------------------------------


@pytest.mark.slow
def test_search_and_retrieve_with_dicomweb_client(node: RunningNode, ct_series: list[Path]) -> None:
    client = node.client()
    answer = client.store_instances([dcmread(path) for path in ct_series])
    assert len(answer.ReferencedSOPSequence) == 20
    first = dcmread(ct_series[0])
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID

    found = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(found) == 1
    item = Dataset.from_json(found[0])
    assert item.NumberOfStudyRelatedInstances == 20 and item.NumberOfStudyRelatedSeries == 1
    assert item.ModalitiesInStudy == "CT" and item.PatientID == TEST_PATIENT_ID
    assert item.RetrieveURL.endswith(f"/dicom-web/studies/{study}")
    by_patient = client.search_for_studies(
        search_filters={"PatientID": TEST_PATIENT_ID, "StudyDate": f"{first.StudyDate}-"}
    )
    assert study in {Dataset.from_json(s).StudyInstanceUID for s in by_patient}
    assert not client.search_for_studies(
        search_filters={"StudyInstanceUID": study, "StudyDate": "19990101-19991231"}
    )
    assert not client.search_for_studies(search_filters={"PatientID": "CURIA-TEST-47?"})
    assert client.search_for_studies(
        search_filters={"StudyInstanceUID": study, "PatientID": "CURIA-TEST-47??"}
    )

    series_found = client.search_for_series(
        study, search_filters={"Modality": "CT", "SeriesDescription": "CT*3.0"}
    )
    assert [Dataset.from_json(s).SeriesInstanceUID for s in series_found] == [series]
    assert Dataset.from_json(series_found[0]).NumberOfSeriesRelatedInstances == 20
    assert not client.search_for_series(study, search_filters={"SeriesDescription": "ct*"})

    pages = [
        client.search_for_instances(study, series, limit=8, offset=offset) for offset in (0, 8, 16)
    ]
    assert [len(page) for page in pages] == [8, 8, 4]
    uids = {Dataset.from_json(item).SOPInstanceUID for page in pages for item in page}
    assert uids == {sop_uid(path) for path in ct_series}
    one = Dataset.from_json(pages[0][0])
    assert one.Rows == 512 and one.SOPClassUID == first.SOPClassUID

    instance = client.retrieve_instance(study, series, first.SOPInstanceUID)
    assert instance.PixelData == first.PixelData
    assert instance.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID
    meta = client.retrieve_instance_metadata(study, series, first.SOPInstanceUID)
    assert "7FE00010" not in meta, "metadata leaves the pixel data out"
    assert Dataset.from_json(meta).SOPInstanceUID == first.SOPInstanceUID
    assert len(client.retrieve_series(study, series)) == 20
    assert len(client.retrieve_study_metadata(study)) == 20


def test_retrieve_gives_the_stored_bytes(node: RunningNode, ct_series: list[Path]) -> None:
    assert node.stow([path.read_bytes() for path in ct_series[:3]]).status_code == 200
    first = dcmread(ct_series[0], stop_before_pixels=True)
    url = (
        f"{node.dicomweb}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        f"/instances/{first.SOPInstanceUID}"
    )
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    response = httpx.get(url, headers={**node.auth, "Accept": accept}, timeout=30)
    assert response.status_code == 200
    boundary = response.headers["content-type"].rsplit("boundary=", 1)[1]
    reader = MultipartReader(
        boundary, max_part_bytes=1 << 30, memory_budget=1 << 30, tmp_dir=node.settings.data_path
    )
    reader.feed(response.content)
    (part,) = reader.finish()
    assert part.read() == ct_series[0].read_bytes()
    assert part.content_type.params["transfer-syntax"] == first.file_meta.TransferSyntaxUID

    explicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    refused = httpx.get(url, headers={**node.auth, "Accept": explicit}, timeout=30)
    assert refused.status_code == 406, "stored JPEG 2000 is not transcoded"
    missing = url.rsplit("/", 1)[0] + "/" + generate_uid()
    assert httpx.get(missing, headers=node.auth).status_code == 404


def test_includefield_and_fuzzymatching(node: RunningNode, ct_series: list[Path]) -> None:
    assert node.stow([path.read_bytes() for path in ct_series[:2]]).status_code == 200
    ct = dcmread(ct_series[0], stop_before_pixels=True)
    studies = f"{node.dicomweb}/studies"
    query = {"StudyInstanceUID": ct.StudyInstanceUID, "includefield": "00080070,PatientAge"}
    (study,) = httpx.get(studies, params=query, headers=node.auth).json()
    assert study["00080070"]["Value"] == [ct.Manufacturer], "extra attributes from the header"
    url = f"{studies}/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances"
    everything = httpx.get(url, params={"includefield": "all"}, headers=node.auth).json()
    assert len(everything) == 2
    assert "00180050" in everything[0], "includefield=all: the whole header"
    assert "7FE00010" not in everything[0], "never the pixel data"
    fuzzy = httpx.get(studies, params={**query, "fuzzymatching": "true"}, headers=node.auth)
    assert fuzzy.status_code == 200 and "fuzzy" in fuzzy.headers["warning"]


def test_results_are_listed_with_their_study(node: RunningNode, ct_series: list[Path]) -> None:
    assert node.stow([path.read_bytes() for path in ct_series]).status_code == 200
    ct = dcmread(ct_series[0], stop_before_pixels=True)
    study = ct.StudyInstanceUID
    relative = f"{study}/{uuid.uuid4().hex}/sr.dcm"
    sr = make_sr(study, node.settings.results_dir / relative)
    with node.catalogue.session() as session:
        series = session.scalar(
            select(Series).where(Series.series_instance_uid == ct.SeriesInstanceUID)
        )
        run = PipelineRun(series=series, run_key=f"test-{uuid.uuid4()}")
        session.add(
            Result(
                run=run,
                kind="sr",
                sop_instance_uid=sr.SOPInstanceUID,
                series_instance_uid=sr.SeriesInstanceUID,
                path=relative,
            )
        )

    client = node.client()
    item = Dataset.from_json(
        client.search_for_studies(search_filters={"StudyInstanceUID": study})[0]
    )
    assert list(item.ModalitiesInStudy) == ["CT", "SR"]
    assert item.NumberOfStudyRelatedSeries == 2 and item.NumberOfStudyRelatedInstances == 21
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study, "Modality": "SR"})

    found = client.search_for_series(study, search_filters={"Modality": "SR"})
    assert len(found) == 1
    series_item = Dataset.from_json(found[0])
    assert series_item.SeriesInstanceUID == sr.SeriesInstanceUID
    assert series_item.SeriesDescription == "Curia AI results"
    assert series_item.NumberOfSeriesRelatedInstances == 1
    assert len(client.search_for_series(study)) == 2
    assert not client.search_for_series(study, search_filters={"SeriesDescription": "Other*"})

    (instance,) = client.search_for_instances(study, sr.SeriesInstanceUID)
    assert Dataset.from_json(instance).SOPClassUID == BASIC_TEXT_SR
    assert len(client.search_for_instances(study)) == 21
    retrieved = client.retrieve_instance(study, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert retrieved.SeriesDescription == "Curia AI results"
    assert len(client.retrieve_study_metadata(study)) == 21


@pytest.mark.production
def test_queries_on_postgresql(tmp_path: Path, postgres_url: str, ct_series: list[Path]) -> None:
    """Wildcards, date ranges and paging also hold on PostgreSQL (LIKE, not SQLite's GLOB)."""
    with running_node(tmp_path / "pg", postgres_url) as pg:
        assert pg.stow([path.read_bytes() for path in ct_series]).status_code == 200
        client = pg.client()
        ct = dcmread(ct_series[0], stop_before_pixels=True)
        study = ct.StudyInstanceUID
        filters = {"PatientID": "CURIA-TEST-47?1", "StudyDate": f"-{ct.StudyDate}"}
        assert len(client.search_for_studies(search_filters=filters)) == 1
        assert not client.search_for_studies(search_filters={"PatientID": "curia*"})
        found = client.search_for_series(study, search_filters={"SeriesDescription": "CT_Body*"})
        assert not found, "_ is literal, not a one-character wildcard"
        assert client.search_for_series(study, search_filters={"SeriesDescription": "CT?Body*"})
        page = client.search_for_instances(study, limit=15, offset=10)
        assert len(page) == 10


# --- what STOW-RS refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/form-data; boundary=x",
    ],
)
def test_other_media_types_are_415(node: RunningNode, content_type: str) -> None:
    response = httpx.post(
        f"{node.dicomweb}/studies",
        content=b"--x\r\n\r\nabc\r\n--x--\r\n",
        headers={**node.auth, "Content-Type": content_type},
    )
    assert response.status_code == 415


def test_truncated_body_is_400_and_stores_nothing(node: RunningNode, ct_series: list[Path]) -> None:
    parts = [path.read_bytes() for path in ct_series[:3]]
    body = multipart_body(parts, "cut")
    response = httpx.post(
        f"{node.dicomweb}/studies",
        content=body[: len(body) - len(parts[2]) // 2],
        headers={
            **node.auth,
            "Content-Type": "multipart/related; type=application/dicom; boundary=cut",
        },
    )
    assert response.status_code == 400
    assert not node.catalogued([sop_uid(path) for path in ct_series[:3]]), "nothing stored"
    assert not staged_files(node), "no staged part is left behind"


def staged_files(node: RunningNode) -> list[Path]:
    folder = node.settings.spool_dir / STAGING_DIR
    return [path for path in folder.iterdir()] if folder.is_dir() else []


def test_an_instance_twice_in_one_request_is_stored_once(
    node: RunningNode, ct_series: list[Path]
) -> None:
    first, second = ct_series[0].read_bytes(), ct_series[1].read_bytes()
    uids = [sop_uid(ct_series[0]), sop_uid(ct_series[1])]
    response = node.stow([first, second, first])
    assert response.status_code == 200
    assert referenced(response.json()) == [*uids, uids[0]]
    stored = node.catalogued(uids)
    assert len(stored) == 2
    assert (node.settings.spool_dir / stored[uids[0]].path).read_bytes() == first
    with node.catalogue.session() as session:
        assert session.get(Series, stored[uids[0]].series_id).instance_count == 2
    assert not staged_files(node)


def test_non_dicom_part_fails_and_the_others_are_stored(
    node: RunningNode, ct_series: list[Path]
) -> None:
    parts = [ct_series[0].read_bytes(), b"this is not DICOM", ct_series[1].read_bytes()]
    response = node.stow(parts)
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    assert failure_reasons(answer) == [0xC000]
    wanted = [sop_uid(ct_series[0]), sop_uid(ct_series[1])]
    assert referenced(answer) == wanted
    assert set(node.catalogued(wanted)) == set(wanted)


def test_instance_of_another_study_than_the_url_is_refused(
    node: RunningNode, ct_series: list[Path]
) -> None:
    other = generate_uid()
    response = node.stow([ct_series[0].read_bytes()], path=f"/studies/{other}")
    assert response.status_code == 409
    answer = response.json()
    assert failure_reasons(answer) == [0xA900]
    failed = answer["00081198"]["Value"][0]
    assert failed["00081155"]["Value"] == [sop_uid(ct_series[0])]
    assert not node.catalogued([sop_uid(ct_series[0])])

    study = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
    response = node.stow([ct_series[1].read_bytes()], path=f"/studies/{study}")
    assert response.status_code == 200
    assert response.json()["00081190"]["Value"][0].endswith(f"/studies/{study}")


def test_answer_in_xml_when_asked(node: RunningNode, ct_series: list[Path]) -> None:
    response = node.stow([ct_series[0].read_bytes(), b"garbage"], Accept="application/dicom+xml")
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/dicom+xml"
    root = fromstring(response.content)
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    reason = root.find(
        "d:DicomAttribute[@tag='00081198']/d:Item/d:DicomAttribute[@tag='00081197']/d:Value", ns
    )
    assert reason is not None and reason.text == str(0xC000)
    stored = root.find("d:DicomAttribute[@keyword='ReferencedSOPSequence']", ns)
    assert stored is not None and len(stored.findall("d:Item", ns)) == 1


def test_parts_larger_than_one_write_are_stored_exactly(node: RunningNode, tmp_path: Path) -> None:
    study = generate_uid()
    datas = []
    for number in (1, 2):
        ds = make_sr(study, tmp_path / f"big{number}.dcm")
        ds.InstanceNumber = number
        ds.add_new(0x00091010, "OB", os.urandom(3 * WRITE_CHUNK // 2))  # private bulk data
        ds.save_as(tmp_path / f"big{number}.dcm", enforce_file_format=True)
        datas.append((tmp_path / f"big{number}.dcm").read_bytes())
    assert all(len(data) > WRITE_CHUNK for data in datas)
    response = node.stow(datas, path=f"/studies/{study}")
    assert response.status_code == 200
    uids = [str(dcmread(BytesIO(data)).SOPInstanceUID) for data in datas]
    assert referenced(response.json()) == uids
    stored = node.catalogued(uids)
    for uid, data in zip(uids, datas, strict=True):
        assert (node.settings.spool_dir / stored[uid].path).read_bytes() == data
        assert stored[uid].sha256 == hashlib.sha256(data).hexdigest()
    assert [stored[uid].instance_number for uid in uids] == [1, 2]
    assert not staged_files(node)


def test_a_part_that_is_not_dicom_is_refused_unread(
    node: RunningNode, ct_series: list[Path]
) -> None:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n".encode()
        + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + ct_series[0].read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = httpx.post(
        f"{node.dicomweb}/studies",
        content=body,
        headers={"Content-Type": STOW_TYPE.format(boundary), **node.auth},
    )
    assert response.status_code == 202
    assert failure_reasons(response.json()) == [0xC000]
    assert referenced(response.json()) == [sop_uid(ct_series[0])]
    assert not staged_files(node)


def test_oversized_part_fails_and_nothing_of_it_is_stored(
    tmp_path: Path, ct_series: list[Path]
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    app = FastAPI()
    app.include_router(create_dicomweb_router(settings, catalogue, max_part_bytes=20_000))
    small = make_sr(generate_uid(), tmp_path / "sr.dcm")
    big = ct_series[0].read_bytes()
    assert len(big) > 20_000
    boundary = "limit"
    response = TestClient(app).post(
        "/dicom-web/studies",
        content=multipart_body([big, (tmp_path / "sr.dcm").read_bytes()], boundary),
        headers={"Content-Type": STOW_TYPE.format(boundary)},
    )
    assert response.status_code == 202
    answer = response.json()
    assert failure_reasons(answer) == [0xA700]
    assert answer["00081198"]["Value"][0]["00081155"]["Value"] == [sop_uid(ct_series[0])]
    assert referenced(answer) == [small.SOPInstanceUID]
    with catalogue.session() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [small.SOPInstanceUID]
    spooled = [path.name for path in settings.spool_dir.rglob("*") if path.is_file()]
    assert spooled == [f"{small.SOPInstanceUID}.dcm"], "no partial file of the big part"
    catalogue.dispose()


# --- access and identifiers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/studies"),
        ("GET", "/studies"),
        ("GET", "/series"),
        ("GET", "/instances"),
        ("GET", "/studies/1.2.3/series/1.2.4/instances/1.2.5"),
        ("GET", "/studies/1.2.3/metadata"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong"])
def test_every_route_needs_the_token(
    node: RunningNode, method: str, path: str, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.request(method, node.dicomweb + path, headers=headers)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.abc/series/1.2.3/instances/1.2.4",
        "/studies/1.2.3/series/01.2/instances/1.2.4",
        "/studies/1.2.3/series/1.2.3/instances/%2E%2E",
        "/studies/1.2.3./metadata",
        "/studies/1.2.3/series/x/metadata",
        "/studies?StudyInstanceUID=1.2.x",
        "/studies/1.2.3/series?SeriesInstanceUID=a",
        "/studies?StudyDate=2024",
        "/studies?limit=-1",
        "/studies?NotAnAttribute=1",
    ],
)
def test_bad_identifiers_are_400(node: RunningNode, path: str) -> None:
    response = httpx.get(node.dicomweb + path, headers=node.auth)
    assert response.status_code == 400


def test_stow_to_a_bad_study_uid_is_400(node: RunningNode, ct_series: list[Path]) -> None:
    assert node.stow([ct_series[0].read_bytes()], path="/studies/1.2.x").status_code == 400


def test_unsupported_matching_key_is_ignored_with_a_warning(node: RunningNode) -> None:
    response = httpx.get(f"{node.dicomweb}/studies?PatientName=NOBODY", headers=node.auth)
    assert response.status_code == 200
    assert "PatientName" in response.headers["warning"]


# --- the STOW-RS upload, without a server ---------------------------------------------------


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(body), size):
        yield body[offset : offset + size]


def test_a_large_part_is_never_held_in_memory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    content = os.urandom(1 << 20) * 24
    body = multipart_body([content], "big")
    budget = 4 << 20
    upload = StowUpload(spool, max_part_bytes=1 << 30, memory_budget=budget)
    tracemalloc.start()
    try:
        (part,) = asyncio.run(upload.receive(chunks(body, 64 * 1024), "big"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert peak < budget + 4 * WRITE_CHUNK, f"{peak} bytes held for a 24 MiB part"
        assert part.staged is not None and part.error is None
        assert part.staged.path.read_bytes() == content
        assert part.staged.sha256 == hashlib.sha256(content).hexdigest()
        assert isinstance(part.header, RejectedInstance), "random bytes are not DICOM"
    finally:
        upload.close()
    assert not list((spool.root / STAGING_DIR).iterdir()), "closing discards what is staged"


def test_a_truncated_upload_leaves_nothing_staged(tmp_path: Path, ct_series: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    body = multipart_body([path.read_bytes() for path in ct_series[:3]], "cut", close=False)
    upload = StowUpload(spool, max_part_bytes=1 << 30, memory_budget=1 << 20)
    with pytest.raises(MultipartError):
        asyncio.run(upload.receive(chunks(body, 10_000), "cut"))
    upload.close()
    assert not list((spool.root / STAGING_DIR).iterdir())


def test_the_stow_answer_is_what_pydicom_renders() -> None:
    outcomes = [
        PartOutcome(0, "", BASIC_TEXT_SR, "1.2.3", "1.2", "1.2.4"),
        PartOutcome(0xC000, "a part of type text/plain"),
        PartOutcome(0xA700, "too large", BASIC_TEXT_SR, "1.2.5"),
    ]
    for study in (None, "1.2"):
        for some in (outcomes, outcomes[:1], outcomes[1:]):
            expected = Dataset()
            referenced_items, failed_items = [], []
            for outcome in some:
                item = Dataset()
                item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
                item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
                if outcome.status == 0:
                    item.RetrieveURL = (
                        f"http://n/studies/{outcome.study_uid}/series/{outcome.series_uid}"
                        f"/instances/{outcome.sop_instance_uid}"
                    )
                    referenced_items.append(item)
                else:
                    item.FailureReason = outcome.status
                    failed_items.append(item)
            stored = {o.study_uid for o in some if o.status == 0}
            url_study = study or (stored.pop() if len(stored) == 1 else None)
            if url_study:
                expected.RetrieveURL = f"http://n/studies/{url_study}"
            if referenced_items:
                expected.ReferencedSOPSequence = referenced_items
            if failed_items:
                expected.FailedSOPSequence = failed_items
            answer = stow_answer(some, "http://n/studies", study)
            assert answer == expected.to_json_dict(suppress_invalid_tags=True)
            assert json_to_xml(answer) == json_to_xml(expected.to_json_dict())


# --- the streamed multipart reader ---------------------------------------------------------


def test_reader_takes_any_chunking_padding_and_preamble(tmp_path: Path) -> None:
    body = (
        b"preamble\r\n--sep  \r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--sep\r\n"
        b"\r\nsecond\r\nwith CRLF\r\n--sep--\r\nepilogue"
    )
    reader = MultipartReader("sep", max_part_bytes=100, memory_budget=100, tmp_dir=tmp_path)
    for i in range(len(body)):
        reader.feed(body[i : i + 1])
    first, second = reader.finish()
    assert first.read() == b"first" and first.content_type.type == "application/dicom"
    assert second.read() == b"second\r\nwith CRLF" and second.content_type is None


def test_reader_spills_to_disk_past_its_memory_budget(tmp_path: Path) -> None:
    parts = [bytes([i]) * 5000 for i in range(4)]
    reader = MultipartReader("b", max_part_bytes=4000, memory_budget=6000, tmp_dir=tmp_path)
    reader.feed(multipart_body(parts, "b"))
    found = reader.finish()
    assert [part.oversized for part in found] == [True] * 4
    assert [part.read() for part in found] == [part[:4000] for part in parts]
    reader = MultipartReader("b", max_part_bytes=10_000, memory_budget=6000, tmp_dir=tmp_path)
    stream = BytesIO(multipart_body(parts, "b"))
    while chunk := stream.read(777):
        reader.feed(chunk)
    assert [part.read() for part in reader.finish()] == parts


@pytest.mark.parametrize(
    "body",
    [b"", b"--b\r\n\r\nno end", b"--b--\r\n", b"--b\r\nbroken header\r\n\r\nx\r\n--b--"],
)
def test_reader_refuses_malformed_bodies(tmp_path: Path, body: bytes) -> None:
    reader = MultipartReader("b", max_part_bytes=100, memory_budget=100, tmp_dir=tmp_path)
    with pytest.raises(MultipartError):
        reader.feed(body)
        reader.finish()


# --- every storage class over STOW-RS --------------------------------------------------------


def test_stow_stores_every_object_of_a_whole_study(node: RunningNode, tmp_path: Path) -> None:
    """STOW-RS restricts no storage class: the dose report, key objects, presentation state,
    RT structure set, secondary capture and localizer of a study are stored with its images,
    catalogued with their SOP classes and served back by QIDO-RS."""
    from tests.support.whole_study import build_whole_study

    study = build_whole_study(tmp_path / "study", f"stow-whole-{uuid.uuid4()}")
    files = study.all_files
    response = node.stow([path.read_bytes() for path in files])
    assert response.status_code == 200, response.text
    assert set(referenced(response.json())) == study.sop_instance_uids()
    with node.catalogue.session() as session:
        classes = dict(
            session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid).where(
                    Instance.sop_instance_uid.in_(study.sop_instance_uids())
                )
            ).all()
        )
    for path in files:
        sent = dcmread(path, stop_before_pixels=True)
        assert classes[str(sent.SOPInstanceUID)] == sent.SOPClassUID
    listed = httpx.get(
        f"{node.dicomweb}/studies/{study.study_instance_uid}/instances",
        headers={**node.auth, "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert {item["00080018"]["Value"][0] for item in listed.json()} == study.sop_instance_uids()
