"""Shared fixtures: real Orthanc, real sample CT, node processes in both modes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import NodeProcess, Orthanc, free_port
from tests.testdata import repaired_ct_series

POSTGRES_ADMIN_URL = os.environ.get(
    "CURIA_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
RABBITMQ_URL = os.environ.get("CURIA_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command (it installs it)")
    return path


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


def node_env(root: Path, orthanc: Orthanc, **extra: str) -> dict[str, str]:
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_ARCHIVE__AE_TITLE": orthanc.aet,
        "CURIA_ARCHIVE__PORT": str(orthanc.dicom_port),
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": "2",
        "CURIA_COMPLETION__POLL_SECONDS": "0.2",
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-test-{uuid.uuid4().hex[:8]}",
    }
    env.update(extra)
    return env


def production_env(root: Path, orthanc: Orthanc, postgres_url: str, **extra: str) -> dict[str, str]:
    """Production mode: PostgreSQL catalogue, RabbitMQ broker, workers as separate processes."""
    return node_env(
        root,
        orthanc,
        CURIA_DATABASE_URL=postgres_url,
        CURIA_PIPELINE__BROKER_URL=RABBITMQ_URL,
        CURIA_PIPELINE__EMBEDDED_WORKER="false",
        **extra,
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

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
