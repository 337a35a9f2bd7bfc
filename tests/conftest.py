"""Shared fixtures: real Orthanc, real sample CT, node processes in both modes."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from pynetdicom.ae import ApplicationEntity

from node.delivery.responses import keep_responses
from node.dimse.pdu import Connection
from tests.support.env import POSTGRES_ADMIN_URL, require_tool
from tests.support.peers import NodeProcess, Orthanc, free_port
from tests.support.testdata import repaired_ct_series


@pytest.fixture(autouse=True, scope="session")
def _answers_reach_their_calls() -> Iterator[None]:
    """Every association a test requests with pynetdicom delivers each answer to the call
    that waits for it (:func:`node.delivery.responses.keep_responses`): without it, its
    reactor can take an answer first and the test waits out ``dimse_timeout`` and fails,
    whatever the node did."""
    original = ApplicationEntity.associate

    def associate(self: ApplicationEntity, *args: object, **kwargs: object) -> object:
        assoc = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if assoc.is_established:
            keep_responses(assoc)
        return assoc

    ApplicationEntity.associate = associate  # type: ignore[method-assign,assignment]
    yield
    ApplicationEntity.associate = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require_tool("Orthanc")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ct_series(tmp_path: Path, request: pytest.FixtureRequest) -> list[Path]:
    """The real sample CT with repaired UIDs unique to this test."""
    return repaired_ct_series(tmp_path / "ct", f"{request.node.nodeid}-{uuid.uuid4()}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"curia_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[callable]:
    started: list[NodeProcess] = []

    def start(
        env: dict[str, str], separate_worker: bool = False, node: NodeProcess | None = None
    ) -> NodeProcess:
        """Start a node that accepts the tests' senders: Orthanc and DCMTK/pynetdicom."""
        if node is None:
            node = NodeProcess(env, tmp_path)
        node.allow_source("orthanc", "ORTHANC")
        node.allow_source("storescu", "STORESCU")
        started.append(node)
        node.start(separate_worker=separate_worker)
        return node

    yield start
    for node in started:
        node.stop()


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright (dashboard and viewer tests).

    Per module: Playwright's sync API keeps an event loop running in the main thread while
    it is open, and later tests that call ``asyncio.run`` must not find one.
    """
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps.sh (chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader"],
        )
        yield browser
        browser.close()


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A connection the node reads PDUs from, and the peer's end of it (a socket pair)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    connection = Connection(ours)
    try:
        yield connection, theirs
    finally:
        connection.close()
        theirs.close()
