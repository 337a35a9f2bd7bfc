"""pydicom's per-file warnings reach the node log summarised, not once per file; the HTTP
server's own lines are escaped like the node's."""

from __future__ import annotations

import logging
import logging.config
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from node.core.logs import (
    RepeatedWarnings,
    configure_logging,
    summarise_library_warnings,
    warnings_summarised,
)
from node.service import api_server
from tests.support.peers import free_port


def _mislabelled(n: int) -> list[bytes]:
    """Explicit VR files whose file meta says implicit VR, as one scanner writes them."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    explicit = str(ds.file_meta.TransferSyntaxUID).encode()
    implicit = str(ImplicitVRLittleEndian).encode()
    patched = data.replace(
        explicit + b"\0" * (len(explicit) % 2),
        implicit.ljust(len(explicit) + len(explicit) % 2, b"\0"),
        1,
    )
    return [patched] * n


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_series_of_mislabelled_files_logs_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    summarise_library_warnings()
    files = _mislabelled(5)
    with caplog.at_level(logging.WARNING, logger="pydicom"), warnings_summarised("series 7"):
        for data in files:
            dcmread(BytesIO(data))
    lines = [r.getMessage() for r in caplog.records if r.name == "pydicom"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("series 7: Expected") and "(5 file(s))" in lines[0]


def test_outside_a_series_a_repeated_warning_is_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("curia.test.repeated")
    logger.addFilter(summary := RepeatedWarnings(interval=0.05))
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            for _ in range(4):
                logger.warning("Expected implicit VR, but found explicit VR")
            summary.interval = 0.0
            logger.warning("Expected implicit VR, but found explicit VR")
    finally:
        logger.removeFilter(summary)
    lines = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert lines == [
        "Expected implicit VR, but found explicit VR",
        "Expected implicit VR, but found explicit VR (and 3 time(s) more before)",
    ]


@pytest.fixture
def node_logging() -> Iterator[None]:
    """The node's logging for one test; pytest's own handlers are put back after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_http_servers_request_lines_and_tracebacks_are_escaped(
    node_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real uvicorn, set up as the node sets it up (its access log on here, so that a
    request line is logged), serves a path holding an escape sequence, a line break and a
    non-ASCII character to an application that fails with the (decoded) path in its
    message: uvicorn's error and access lines are written by the node's formatter, and the
    exception's message is escaped whole, so it neither reaches the terminal raw nor starts
    a line of its own."""
    import httpx
    import uvicorn

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # uvicorn's own, as it installs it
    configure_logging("INFO")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError(f"cannot serve {scope['path']}")

    port = free_port()
    server = api_server(app, "127.0.0.1", port, access_log=True)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = httpx.get(f"http://127.0.0.1:{port}/x%1b%5b2J%0aFAKE%20LINE%c3%a9", timeout=10)
        assert answer.status_code == 500
    finally:
        server.should_exit = True
        thread.join(10)
    err = capsys.readouterr().err
    assert "ERROR uvicorn.error: Exception in ASGI application" in err, err
    assert "RuntimeError: cannot serve /x\\x1b[2J\\x0aFAKE LINE\\xe9" in err, err
    # uvicorn writes the request line with the path as sent (percent-encoded): through the
    # node's formatter, not uvicorn's.
    access = [line for line in err.splitlines() if " INFO uvicorn.access: " in line]
    assert len(access) == 1 and '"GET /x%1b%5b2J%0aFAKE%20LINE%c3%a9 HTTP/1.1" 500' in access[0]
    assert "\x1b" not in err and "\xe9" not in err
    assert not any(line.startswith("FAKE LINE") for line in err.splitlines())


def test_a_json_log_escapes_a_traceback_too(
    node_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    try:
        raise ValueError("bad byte \x1b[31m\xc3")
    except ValueError:
        logging.getLogger("curia.test.json").exception("failed on \x1b")
    line = capsys.readouterr().err.strip()
    assert "\n" not in line
    assert '"message": "failed on \\\\x1b"' in line, line
    assert "ValueError: bad byte \\\\x1b[31m\\\\xc3" in line, line
