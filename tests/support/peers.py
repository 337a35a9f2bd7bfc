"""Real peers for tests: free ports, an Orthanc on loopback, node processes, polling."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from pipelines.jobs.celery_app import STAGES

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()


def _ephemeral_ports() -> range:
    """The kernel's range for the local end of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A port no one holds, for a peer that will listen on it.

    Chosen outside the kernel's ephemeral range: a port from ``bind(0)`` lies inside it, so
    any outgoing connection (to PostgreSQL, RabbitMQ, a peer) could take it as its local end
    between this call and the peer's own bind, and the peer would fail to start. The check
    binds to every address without ``SO_REUSEADDR``, as strictly as a listener can collide.
    """
    ephemeral = _ephemeral_ports()
    outside = (
        range(20000, ephemeral.start) if ephemeral.start > 21000 else range(ephemeral.stop, 65536)
    )
    if not outside:  # no room below or above it: any port the kernel gives
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.choice(outside)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {outside.start}-{outside.stop - 1}")


def wait_for(check: Callable[[], T], timeout: float, msg: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``msg`` on time-out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # a peer still starting up
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s: {msg} (last error: {last_error})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Orthanc:
    """A real Orthanc (Debian package) started from a temporary config."""

    root: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise RuntimeError(
                "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
            )
        config = {
            "Name": "curia-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomScpTimeout": 30,
            "Plugins": ["/usr/share/orthanc/plugins"],
            "DicomWeb": {"Enable": True},
            "DicomModalities": {},
            "StableAge": 1,
            "SyncStorageArea": False,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        log = (self.root / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [binary, str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
        )
        wait_for(lambda: self.get("/system"), 30, "Orthanc did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def get(self, path: str, **kwargs: Any) -> Any:
        response = httpx.get(self.url + path, timeout=60, **kwargs)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: Any) -> Any:
        response = httpx.post(self.url + path, timeout=300, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def put(self, path: str, body: Any) -> None:
        httpx.put(self.url + path, json=body, timeout=60).raise_for_status()

    def upload(self, files: list[Path]) -> str:
        """Store files; return the Orthanc id of their study."""
        study_id = ""
        for file in files:
            answer = self.post("/instances", content=file.read_bytes())
            study_id = answer["ParentStudy"]
        return study_id

    def set_modality(self, name: str, aet: str, port: int) -> None:
        self.put(f"/modalities/{name}", {"AET": aet, "Host": "127.0.0.1", "Port": port})

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        found = self.post(
            "/tools/find",
            json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
        )
        if not found:
            return []
        return self.get(f"/studies/{found[0]}/series")


@dataclass
class NodeProcess:
    """``curia-node run`` (and optionally a separate Celery worker) as real processes."""

    env: dict[str, str]
    root: Path
    node: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None

    @property
    def dicom_port(self) -> int:
        return int(self.env["CURIA_DICOM__PORT"])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['CURIA_API__PORT']}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.root / log_name).open("ab")
        return subprocess.Popen(
            args,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )

    def allow_source(self, name: str, ae_title: str, host: str = "127.0.0.1") -> None:
        """Add a sender to the node's allow-list with the real CLI."""
        subprocess.run(
            [
                str(VENV_BIN / "curia-node"),
                "ae",
                "source",
                "add",
                name,
                "--ae-title",
                ae_title,
                "--host",
                host,
            ],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
        )

    def start(self, separate_worker: bool = False, timeout: float = 180) -> None:
        offset = len(self.log())
        self.node = self._spawn([str(VENV_BIN / "curia-node"), "run"], "node.log")
        if separate_worker:
            self.worker = self._spawn(
                [
                    str(VENV_BIN / "celery"),
                    "-A",
                    "pipelines.jobs.celery_app",
                    "worker",
                    "--pool=solo",
                    "--loglevel=INFO",
                    "-Q",
                    ",".join(
                        f"{self.env['CURIA_PIPELINE__QUEUE_PREFIX']}.{stage}" for stage in STAGES
                    ),
                ],
                "worker.log",
            )

        def ready_or_ended() -> bool:
            return self.node.poll() is not None or "Curia Node ready" in self.log()[offset:]

        wait_for(ready_or_ended, timeout, "curia-node did not become ready")
        if self.node.poll() is not None:  # outside wait_for, which would retry on it
            raise AssertionError(f"curia-node exited early:\n{self.log()}")

    def log(self, name: str = "node.log") -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in (self.worker, self.node):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (self.worker, self.node):
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
