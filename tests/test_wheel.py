"""The node installs and runs from its wheel, without the source tree.

The wheel is built from a copy of the sources and installed into a fresh virtual environment
that never sees this checkout. Its dependencies are not installed again (PyTorch alone is
gigabytes): a ``.pth`` line makes the test environment's site-packages importable, as a plain
folder, so the editable install's import hook there is never loaded and ``node`` can only come
from the wheel. The node then runs from a temporary folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.peers import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the package configuration and the importable folders.
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "node", "pipelines")
DATA_PACKAGES = ("migrations", "sr_templates")

# Run inside the installed environment: where everything was imported from, and the templates.
PROBE = """
import json, migrations, node, pipelines, sr_templates
from node.core.settings import Settings
from pipelines.reporting.templates import load_templates
settings = Settings()
print(json.dumps({
    "modules": [m.__file__ for m in (node, pipelines, migrations, sr_templates)],
    "templates_dir": str(settings.templates_dir),
    "templates": sorted(load_templates(settings.templates_dir)),
}))
"""


@dataclass
class Installed:
    """The wheel, the sources it was built from, and the environment it is installed in."""

    wheel: Path
    sources: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout's configuration or import path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CURIA_", "PYTHON", "VIRTUAL_ENV"))
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    sources = root / "src"
    sources.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")  # the wheel builds its own
    for name in (*SOURCES, *DATA_PACKAGES):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, sources / name, ignore=ignore)
        else:
            shutil.copy2(source, sources / name)

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    wheels = root / "dist"
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(wheels)]
    subprocess.run([*pip, *build, str(sources)], check=True, cwd=root)
    (wheel,) = wheels.glob("curia_node-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = ["--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run([*pip, *install], check=True, cwd=root)
    # A plain path line: the folder is importable, but its own .pth files (the editable
    # install's hook among them) are not run.
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site_packages / "test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return Installed(wheel=wheel, sources=sources, venv=venv)


def test_wheel_carries_the_migrations_templates_and_dashboard(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    revisions = {p.name for p in (installed.sources / "migrations" / "versions").glob("*.py")}
    assert {"migrations/env.py", "migrations/script.py.mako"} <= names
    assert {f"migrations/versions/{name}" for name in revisions} <= names
    templates = {p.name for p in (installed.sources / "sr_templates").glob("*.yaml")}
    assert templates and {f"sr_templates/{name}" for name in templates} <= names
    assert "node/web/static/dashboard/index.html" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    if shutil.which("cc"):  # the listener's compiled receiver, built with the wheel
        assert any(n.startswith("node/dimse/_receive.") and n.endswith(".so") for n in names)


def test_installed_node_imports_from_the_wheel_and_loads_its_templates(
    installed: Installed, tmp_path: Path
) -> None:
    probe = subprocess.run(
        [str(installed.bin / "python"), "-c", PROBE],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    found = json.loads(probe.stdout)
    for module in found["modules"]:
        assert Path(module).is_relative_to(installed.venv), module
        assert not Path(module).is_relative_to(ROOT), module
    assert Path(found["templates_dir"]).is_relative_to(installed.venv)
    assert found["templates"] == ["body-region", "demo-region-mask"]


@pytest.fixture
def running(installed: Installed, tmp_path: Path) -> Iterator[dict[str, str]]:
    """``curia-node run`` from the wheel, in embedded mode, in a folder outside the checkout."""
    env = {
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_DICOM__ACCEPT_ANY_SOURCE": "true",
        "CURIA_API__PORT": str(free_port()),
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-wheel-{uuid.uuid4().hex[:8]}",
    }
    log_path = tmp_path / "node.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(installed.bin / "curia-node"), "run"],
            env=clean_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )

    def ready() -> bool:
        text = log_path.read_text(errors="replace")
        if process.poll() is not None:
            raise AssertionError(f"curia-node exited early:\n{text}")
        return "Curia Node ready" in text

    try:
        wait_for(ready, 180, "curia-node from the wheel did not become ready")
        yield env
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_node_from_the_wheel_answers_upgrades_and_serves_the_dashboard(
    installed: Installed, running: dict[str, str]
) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", int(running["CURIA_DICOM__PORT"]), ae_title="CURIA")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000

    heads = set(ScriptDirectory(str(installed.sources / "migrations")).get_heads())
    catalogue = Path(running["CURIA_DATA_DIR"]) / "catalogue.sqlite"
    with sqlite3.connect(catalogue) as db:
        versions = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
    assert versions == heads

    api = f"http://127.0.0.1:{running['CURIA_API__PORT']}"
    static = installed.sources / "node" / "web" / "static" / "dashboard"
    page = httpx.get(f"{api}/dashboard/", timeout=10)
    assert page.status_code == 200
    assert page.content == (static / "index.html").read_bytes()
    script = httpx.get(f"{api}/dashboard/app.js", timeout=10)
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.content == (static / "app.js").read_bytes()
