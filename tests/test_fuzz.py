"""Bad input over DIMSE and STOW-RS: a real node process takes thousands of mutated
instances (:mod:`tests.support.fuzzing`) and must stay up, answer each with the status it deserves,
and store nothing under a name that is not a valid UID.

``CURIA_FUZZ_COUNT`` (default 10,000) is the number of instances of a run, split between
DIMSE (60 %) and STOW-RS; real, unchanged instances are mixed in as controls.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from node.core.uids import is_valid_uid
from node.delivery.responses import keep_responses
from node.store.journal import JOURNAL_DIR
from node.store.spool import STAGING_DIR
from tests.support.env import node_env
from tests.support.fuzzing import SUCCESS, Base, Mutant, Mutator, make_bases
from tests.support.peers import NodeProcess, Orthanc, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore"),  # pydicom warns about every bad value it meets
]

FUZZ_COUNT = int(os.environ.get("CURIA_FUZZ_COUNT", "10000"))
DIMSE_SHARE = 0.6
PER_ASSOCIATION = 500
PARTS_PER_REQUEST = 10
FUZZER_AE = "FUZZER"
CONTEXT_SYNTAXES = [
    JPEG2000Lossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
NO_ANSWER = -1


@dataclass
class FuzzNode:
    node: NodeProcess
    root: Path
    mutator: Mutator
    token: str
    answers: dict[str, list[tuple[Mutant, int]]] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return Path(self.node.env["CURIA_DATA_DIR"])

    def alive(self) -> None:
        assert self.node.node is not None and self.node.node.poll() is None, "the node died"


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    root = tmp_path_factory.mktemp("fuzz")
    archive = Orthanc(root, free_port(), free_port())  # never started: nothing is analysed
    env = node_env(root, archive, CURIA_COMPLETION__SERIES_QUIET_SECONDS="86400")
    node = NodeProcess(env, root)
    node.allow_source("fuzzer", FUZZER_AE)
    node.start()
    try:
        bases: list[Base] = make_bases(root / "bases", f"fuzz-{uuid.uuid4()}")
        token = (Path(env["CURIA_DATA_DIR"]) / "api-token").read_text().strip()
        yield FuzzNode(node, root, Mutator(bases), token)
    finally:
        node.stop()
    # A passing run leaves a gigabyte of refused instances: keep them only for a failure.
    shutil.rmtree(Path(env["CURIA_DATA_DIR"]) / "quarantine", ignore_errors=True)
    shutil.rmtree(root / "bases", ignore_errors=True)


def dimse_count() -> int:
    return round(FUZZ_COUNT * DIMSE_SHARE)


def stow_count() -> int:
    return FUZZ_COUNT - dimse_count()


def associate(port: int) -> object:
    ae = AE(ae_title=FUZZER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Verification)
    for syntax in CONTEXT_SYNTAXES:  # one context each: the node accepts them all
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established, "the listener accepts a new association"
    keep_responses(assoc)  # thousands of C-STOREs: none may lose its answer to the reactor
    # pynetdicom leaves Nagle on: each C-STORE would wait out a delayed ACK (~40 ms).
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    echo = assoc.send_c_echo()
    assert echo.Status == 0x0000, "and answers C-ECHO on it"
    return assoc


def report(transport: str, answers: list[tuple[Mutant, int]], seconds: float) -> str:
    kinds = Counter(mutant.kind for mutant, _ in answers)
    statuses = Counter(
        f"0x{status:04X}" if status != NO_ANSWER else "none" for _, status in answers
    )
    by_kind: dict[str, Counter[str]] = {}
    for mutant, status in answers:
        by_kind.setdefault(mutant.kind, Counter())[f"0x{status:04X}"] += 1
    lines = [f"{transport}: {len(answers)} instances in {seconds:.0f} s"]
    lines += [f"  {kind:17} {kinds[kind]:5}  {dict(by_kind[kind])}" for kind in sorted(kinds)]
    lines.append(f"  statuses: {dict(sorted(statuses.items()))}")
    return "\n".join(lines)


def unexpected(answers: list[tuple[Mutant, int]]) -> list[str]:
    return [
        f"#{m.index} {m.kind} ({m.base}: {m.detail}): got "
        + ("no answer" if status == NO_ANSWER else f"0x{status:04X}")
        + f", expected {sorted(hex(s) for s in m.expected)}"
        for m, status in answers
        if status not in m.expected
    ]


def test_dimse_listener_survives_and_refuses_bad_instances(
    fuzz_node: FuzzNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Send each file's data set as it is, without decoding it: a mutant is no data set
    # pydicom could encode, and the node must see the bytes the mutator made.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    file = tmp_path / "mutant.dcm"
    answers: list[tuple[Mutant, int]] = []
    started = time.monotonic()
    mutants = list(fuzz_node.mutator.mutants(dimse_count(), dimse=True))
    for offset in range(0, len(mutants), PER_ASSOCIATION):
        fuzz_node.alive()
        assoc = associate(fuzz_node.node.dicom_port)
        for mutant in mutants[offset : offset + PER_ASSOCIATION]:
            file.write_bytes(mutant.part10)
            if not assoc.is_established:  # a lost association is recorded, then replaced
                assoc = associate(fuzz_node.node.dicom_port)
            answer = assoc.send_c_store(file)
            answers.append((mutant, int(answer.Status) if "Status" in answer else NO_ANSWER))
        assoc.release()
    fuzz_node.alive()
    associate(fuzz_node.node.dicom_port).release()
    fuzz_node.answers["DIMSE"] = answers
    with capsys.disabled():
        print("\n" + report("DIMSE", answers, time.monotonic() - started))

    wrong = unexpected(answers)
    assert not wrong, f"{len(wrong)} unexpected answers:\n" + "\n".join(wrong[:30])
    assert_spool_is_sound(fuzz_node)


def multipart(parts: list[bytes], boundary: str) -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def requests(mutants: list[Mutant]) -> Iterator[list[Mutant]]:
    """Requests of up to :data:`PARTS_PER_REQUEST` parts, at most one of them a mutant
    that may or may not be stored: the answer's two sequences then tell every part's fate."""
    batch: list[Mutant] = []
    for mutant in mutants:
        open_ended = len(mutant.expected) > 1
        if len(batch) == PARTS_PER_REQUEST or (
            open_ended and any(len(m.expected) > 1 for m in batch)
        ):
            yield batch
            batch = []
        batch.append(mutant)
    if batch:
        yield batch


def sequence(answer: dict, tag: str) -> list[dict]:
    return answer.get(tag, {}).get("Value", [])


def uid_of(item: dict) -> str | None:
    values = item.get("00081155", {}).get("Value")
    return values[0] if values else None


def part_statuses(parts: list[Mutant], response: httpx.Response) -> list[int] | str:
    """Each part's status as the answer gives it, or why the answer does not add up."""
    if response.status_code not in (200, 202, 409):
        return f"HTTP {response.status_code}: {response.text[:200]}"
    answer = response.json()
    stored, failed = sequence(answer, "00081199"), sequence(answer, "00081198")
    if len(stored) + len(failed) != len(parts):
        return f"{len(stored)} stored + {len(failed)} failed for {len(parts)} parts"
    must_store = sum(m.expected == {SUCCESS} for m in parts)
    open_stored = len(stored) - must_store
    if open_stored not in (0, 1):
        return f"{len(stored)} stored where {must_store} must be"
    expected_code = 200 if not failed else 202 if stored else 409
    if response.status_code != expected_code:
        return f"HTTP {response.status_code} for {len(stored)} stored, {len(failed)} failed"
    for item in stored + failed:
        uid = uid_of(item)
        if uid is not None and not is_valid_uid(uid):
            return f"the answer names an invalid UID {uid!r}"
    statuses: list[int] = []
    stored_items, failed_items = iter(stored), iter(failed)
    for mutant in parts:
        if mutant.expected == {SUCCESS} or (len(mutant.expected) > 1 and open_stored):
            item = next(stored_items)
            named = mutant.dataset_sop_instance_uid
            if named is not None and uid_of(item) != named:
                return f"#{mutant.index} stored as {uid_of(item)}, sent as {named}"
            statuses.append(SUCCESS)
        else:
            statuses.append(next(failed_items)["00081197"]["Value"][0])
    return statuses


def test_stow_rs_survives_and_refuses_bad_instances(fuzz_node: FuzzNode, capsys) -> None:
    url = f"{fuzz_node.node.api_url}/dicom-web/studies"
    auth = {"Authorization": f"Bearer {fuzz_node.token}"}
    answers: list[tuple[Mutant, int]] = []
    broken: list[str] = []
    started = time.monotonic()
    mutants = list(fuzz_node.mutator.mutants(stow_count(), dimse=False))
    with httpx.Client(timeout=120) as client:
        for number, parts in enumerate(requests(mutants)):
            boundary = uuid.uuid4().hex
            response = client.post(
                url,
                content=multipart([m.part10 for m in parts], boundary),
                headers={
                    **auth,
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                    f"boundary={boundary}",
                },
            )
            statuses = part_statuses(parts, response)
            if isinstance(statuses, str):
                broken.append(f"request {number} ({[m.kind for m in parts]}): {statuses}")
                statuses = [NO_ANSWER] * len(parts)
            answers += zip(parts, statuses, strict=True)
            if number % 50 == 0:
                fuzz_node.alive()
                assert client.get(f"{fuzz_node.node.api_url}/healthz").status_code == 200
    fuzz_node.alive()
    associate(fuzz_node.node.dicom_port).release()  # DIMSE is still up too
    fuzz_node.answers["STOW-RS"] = answers
    with capsys.disabled():
        print("\n" + report("STOW-RS", answers, time.monotonic() - started))

    assert not broken, f"{len(broken)} answers that do not add up:\n" + "\n".join(broken[:20])
    wrong = unexpected(answers)
    assert not wrong, f"{len(wrong)} unexpected answers:\n" + "\n".join(wrong[:30])
    assert_spool_is_sound(fuzz_node)


def assert_spool_is_sound(fuzz: FuzzNode) -> None:
    """Only valid UID paths in the spool, each catalogued instance readable under its own
    UID, refused instances only in the quarantine, one for each refusal."""
    spool, quarantine = fuzz.data / "spool", fuzz.data / "quarantine"
    for path in spool.rglob("*"):
        relative = path.relative_to(spool)
        if relative.parts[0] == STAGING_DIR:
            assert path.is_dir() and len(relative.parts) == 1, f"left staged: {relative}"
            continue
        if relative.parts[0] == JOURNAL_DIR:  # the ingest journal: its folder, segments, spares
            assert len(relative.parts) == 1 or (
                len(relative.parts) == 2
                and path.is_file()
                and path.suffix in (".journal", ".spare")
            ), f"stray journal entry {relative}"
            continue
        names = list(relative.parts)
        if path.is_file():
            assert len(names) == 3 and names[2].endswith(".dcm"), f"stray file {relative}"
            names[2] = names[2].removesuffix(".dcm")
        else:
            assert len(names) <= 2, f"stray folder {relative}"
        bad = [name for name in names if not is_valid_uid(name)]
        assert not bad, f"{relative} is not named by valid UIDs"

    with sqlite3.connect(fuzz.data / "catalogue.sqlite") as db:
        rows = db.execute(
            "SELECT i.sop_instance_uid, i.path, i.sha256, s.series_instance_uid, "
            "st.study_instance_uid FROM instances i JOIN series s ON i.series_id = s.id "
            "JOIN studies st ON s.study_id = st.id"
        ).fetchall()
    answers = [answer for transport in fuzz.answers.values() for answer in transport]
    sent: dict[str, list[bytes]] = {}
    for m, status in answers:
        if status == SUCCESS:
            sent.setdefault(m.sop_instance_uid, []).append(m.dataset)
    catalogued = set()
    for sop, relative, digest, series, study in rows:
        assert relative == f"{study}/{series}/{sop}.dcm"
        data = (spool / relative).read_bytes()
        if digest is None:  # filed from the ingest journal: compared with what was sent
            assert any(data.endswith(dataset) for dataset in sent.get(sop, []))
        else:
            assert hashlib.sha256(data).hexdigest() == digest
        assert dcmread(spool / relative, stop_before_pixels=True).SOPInstanceUID == sop
        catalogued.add(sop)
    assert len(list(spool.rglob("*.dcm"))) == len(rows), "every stored file is catalogued"

    successes = sum(status == SUCCESS for _, status in answers)
    controls = {m.sop_instance_uid for m, _ in answers if m.kind == "control"}
    refused = {m.sop_instance_uid for m, status in answers if m.must_fail}
    assert controls <= catalogued, "every control is stored"
    assert not refused & catalogued, "nothing refused is catalogued"
    assert len(catalogued) <= successes

    kept = [path for path in quarantine.rglob("*") if path.is_file()]
    assert all(path.suffix == ".dcm" or path.name == "index.jsonl" for path in kept)
    failures = sum(status != SUCCESS for _, status in answers)
    records = sum(len(path.read_text().splitlines()) for path in quarantine.rglob("index.jsonl"))
    assert records == failures, "one quarantine record per refusal"
