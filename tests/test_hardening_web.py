"""The HTTP side of a node a stranger cannot exhaust: STOW-RS limits and free space, junk
parts, QIDO paging, the API description and security headers, against a real
`curia-node run` process on loopback. Each attack is bounded in count and bytes."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.api_server import multipart_body
from tests.support.peers import NodeProcess, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_PARTS = 200
MAX_BODY_MB = 8
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'


def _start(root: Path, **extra: str) -> NodeProcess:
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_DICOM__MIN_FREE_MB": "0",
        "CURIA_ARCHIVE__ENABLED": "false",
        "CURIA_PIPELINE__EMBEDDED_WORKER": "false",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{os.getpid()}-{free_port()}",
        **extra,
    }
    process = NodeProcess(env, root)
    process.start()
    return process


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    process = _start(
        tmp_path_factory.mktemp("web"),
        CURIA_API__STOW_MAX_PARTS=str(MAX_PARTS),
        CURIA_API__STOW_MAX_BODY_MB=str(MAX_BODY_MB),
    )
    yield process
    process.stop()


def _token(node: NodeProcess) -> dict[str, str]:
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _stow(node: NodeProcess, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{node.api_url}/dicom-web/studies",
        content=body,
        headers={"Content-Type": STOW_TYPE, **_token(node), **headers},
        timeout=60,
    )


def _quarantine(node: NodeProcess) -> tuple[int, int]:
    """(records, files other than the indexes) in the node's quarantine."""
    root = Path(node.env["CURIA_DATA_DIR"]) / "quarantine"
    lines = sum(len(p.read_text().splitlines()) for p in root.rglob("index.jsonl"))
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "index.jsonl"]
    return lines, len(files)


def _staged(node: NodeProcess) -> list[Path]:
    return list((Path(node.env["CURIA_DATA_DIR"]) / "spool" / ".incoming").glob("*"))


def test_junk_parts_cost_one_quarantine_record_each_and_no_file(node: NodeProcess) -> None:
    before = _quarantine(node)
    answer = _stow(node, multipart_body([b"x"] * 150, "b"))
    assert answer.status_code == 409
    records, files = _quarantine(node)
    assert (records - before[0], files - before[1]) == (150, 0)
    assert _staged(node) == []


def test_too_many_parts_get_413_and_nothing_is_kept(node: NodeProcess) -> None:
    before = _quarantine(node)
    answer = _stow(node, multipart_body([b"x"] * (MAX_PARTS + 1), "b"))
    assert answer.status_code == 413
    assert f"more than {MAX_PARTS} parts" in answer.json()["detail"]
    assert _quarantine(node) == before
    assert _staged(node) == []


def test_a_body_over_the_limit_gets_413_declared_or_streamed(node: NodeProcess) -> None:
    body = multipart_body([b"\0" * ((MAX_BODY_MB << 20) + 1)], "b")
    declared = _stow(node, body)
    assert declared.status_code == 413 and "over the limit" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    streamed = httpx.post(
        f"{node.api_url}/dicom-web/studies",
        content=chunks(),  # chunked: no Content-Length to judge by
        headers={"Content-Type": STOW_TYPE, **_token(node)},
        timeout=60,
    )
    assert streamed.status_code == 413
    assert "request body larger than" in streamed.json()["detail"]
    assert _staged(node) == []


@pytest.mark.parametrize(
    "query",
    ["offset=9223372036854775808", "limit=99999999999999999999", "offset=-1", "offset=%C2%B2"],
)
def test_qido_paging_out_of_range_is_a_bad_request(node: NodeProcess, query: str) -> None:
    answer = httpx.get(f"{node.api_url}/dicom-web/studies?{query}", headers=_token(node))
    assert answer.status_code == 400, answer.text


def test_the_api_description_needs_a_token(node: NodeProcess) -> None:
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(node.api_url + path).status_code == 401
        assert httpx.get(node.api_url + path, headers=_token(node)).status_code == 200
    assert (
        "/dicom-web/studies"
        in httpx.get(node.api_url + "/openapi.json", headers=_token(node)).json()["paths"]
    )


def test_every_response_carries_nosniff_and_a_content_security_policy(node: NodeProcess) -> None:
    answers = [
        httpx.get(node.api_url + "/healthz"),
        httpx.get(node.api_url + "/api/v1/studies"),  # 401
        httpx.get(node.api_url + "/api/v1/studies", headers=_token(node)),
        httpx.get(node.api_url + "/dicom-web/studies", headers=_token(node)),
        httpx.get(node.api_url + "/dicom-web/studies/1.2.3", headers=_token(node)),  # 404
        httpx.get(node.api_url + "/dashboard/", follow_redirects=True),
    ]
    for answer in answers:
        assert answer.headers.get("x-content-type-options") == "nosniff", answer.url
        policy = answer.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "frame-ancestors" in policy, answer.url


def test_stow_is_refused_before_and_while_staging_below_the_free_space_watermark(
    tmp_path: Path,
) -> None:
    """With the watermark 48 MiB below today's free space: a body that declares 100 MiB gets
    507 before a byte is staged; a chunked 128 MiB body gets 507 once staging reaches the
    watermark (checked every 16 MiB), and its staged bytes are removed."""
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    node = _start(tmp_path, CURIA_DICOM__MIN_FREE_MB=str(free_mb - 48))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(node.env["CURIA_API__PORT"]))
        connection.putrequest("POST", "/dicom-web/studies")
        for name, value in {"Content-Type": STOW_TYPE, **_token(node)}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(100 << 20))
        connection.endheaders()
        declared = connection.getresponse()
        assert declared.status == 507
        connection.close()

        def chunks() -> Iterator[bytes]:
            yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            for _ in range(128):
                yield b"\0" * (1 << 20)
            yield b"\r\n--b--\r\n"

        streamed = httpx.post(
            f"{node.api_url}/dicom-web/studies",
            content=chunks(),
            headers={"Content-Type": STOW_TYPE, **_token(node)},
            timeout=120,
        )
        assert streamed.status_code == 507, streamed.text
        assert "free space" in streamed.json()["detail"]
        assert _staged(node) == []
    finally:
        node.stop()


def test_ready_means_the_api_answers_and_a_taken_api_port_stops_the_start(
    tmp_path: Path,
) -> None:
    """The line "Curia Node ready" is logged only once the API accepts connections; an API
    port that is already taken ends `curia-node run` with a message naming it, instead of a
    node that says ready and refuses every request."""
    for name in ("free", "taken"):
        (tmp_path / name).mkdir()
    node = _start(tmp_path / "free")
    try:
        ready_at = node.log().index("Curia Node ready")
        connection = socket.create_connection(("127.0.0.1", int(node.env["CURIA_API__PORT"])))
        connection.close()
        assert ready_at > 0
    finally:
        node.stop()

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(AssertionError, match="exited early") as refused:
            _start(tmp_path / "taken", CURIA_API__PORT=str(taken.getsockname()[1]))
        assert f"could not listen on 127.0.0.1:{taken.getsockname()[1]}" in str(refused.value)
        assert "Curia Node ready" not in str(refused.value)
    finally:
        taken.close()


def test_a_destination_url_password_is_masked_in_the_api_and_audit(node: NodeProcess) -> None:
    """A destination URL with ``user:password@`` is shown masked by the API and in the audit
    trail; sent back masked (as the dashboard does), it keeps the real password."""
    body = {
        "name": "masked-pacs",
        "protocol": "orthanc-rest",
        "url": "http://alice:p@ss@pacs.example:8042",
        "results": False,
    }
    api = f"{node.api_url}/api/v1"
    created = httpx.post(f"{api}/destinations", json=body, headers=_token(node))
    assert created.status_code == 201, created.text
    assert created.json()["url"] == "http://alice:**********@pacs.example:8042"
    edited = httpx.patch(
        f"{api}/destinations/masked-pacs",
        json={**created.json(), "results": True},
        headers=_token(node),
    )
    assert edited.status_code == 200, edited.text
    audit = httpx.get(f"{api}/audit", headers=_token(node)).text
    listed = httpx.get(f"{api}/destinations", headers=_token(node)).text
    assert "p@ss" not in audit and "p@ss" not in listed
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{node.env['CURIA_DATA_DIR']}/catalogue.sqlite")
    with engine.connect() as connection:
        kept = connection.execute(
            sa.text("SELECT url FROM peers WHERE name = 'masked-pacs'")
        ).scalar()
    engine.dispose()
    assert "alice:p@ss@pacs.example" in str(kept), "the real URL is kept"


def test_the_http_servers_own_log_lines_are_the_nodes_and_escaped(node: NodeProcess) -> None:
    """A request line with an escape sequence and a non-ASCII byte: uvicorn refuses it (400)
    and logs it through the node's formatter (level, logger name), not its own; no raw
    control or non-ASCII byte reaches the log."""
    host, port = node.api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /\x1b[2J\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    wait_for(
        lambda: " WARNING uvicorn.error: Invalid HTTP request received." in node.log(),
        10,
        "uvicorn's line in the node's format",
    )
    raw = (node.root / "node.log").read_bytes()
    assert b"\x1b" not in raw
    assert not any(byte > 0x7E for byte in raw)
