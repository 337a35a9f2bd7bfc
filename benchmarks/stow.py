"""STOW-RS ingest throughput: the node (durable, catalogued) vs Orthanc's DICOMweb plugin.

Sends the same 300-slice 512x512 CT series (synthetic pixels, uncompressed) in one STOW-RS
request, streamed by the same httpx client, to the node's HTTP API (a separate uvicorn
process with its default HTTP implementation, bearer token checked) and to a real Orthanc
(``POST /dicom-web/studies``), on this machine, one request each per run. Prints
instances/s for each and the ratio node/Orthanc, per run.

    .venv/bin/python -m benchmarks.stow [--slices 300] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from fastapi import FastAPI

from benchmarks.ingest import write_series
from benchmarks.memory import peak_rss_mib
from tests.support.peers import Orthanc, free_port, port_open, wait_for

TOKEN = "benchmark-token"


def node_app() -> FastAPI:
    """The node's API app over ``CURIA_DATA_DIR`` (uvicorn --factory entry point)."""
    from node.catalogue.db import Catalogue, upgrade
    from node.core.settings import Settings
    from node.web.app import create_api

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return create_api(settings, Catalogue(settings.effective_database_url))


def body(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """The multipart/related body, streamed file by file."""
    for path in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def timed_stow(url: str, paths: list[Path], headers: dict[str, str]) -> float:
    boundary = uuid.uuid4().hex
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    started = time.perf_counter()
    response = httpx.post(
        url,
        content=body(paths, boundary),
        headers={**headers, "Content-Type": content_type, "Accept": "application/dicom+json"},
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    stored = response.json()["00081199"]["Value"]
    if len(stored) != len(paths):
        raise RuntimeError(f"{url} stored {len(stored)} of {len(paths)} instances")
    return elapsed


def node_rate(paths: list[Path], work: Path) -> tuple[float, float, float]:
    port = free_port()
    env = {**os.environ, "CURIA_DATA_DIR": str(work / "node"), "CURIA_API__TOKEN": TOKEN}
    env.pop("CURIA_CONFIG", None)
    log = (work / "node.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "benchmarks.stow:node_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_open(port), 60, "the node's API did not start")
        url = f"http://127.0.0.1:{port}/dicom-web/studies"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        httpx.get(url, headers=headers).raise_for_status()  # warm: imports, database
        idle = peak_rss_mib(server.pid)
        rate = len(paths) / timed_stow(url, paths, headers)
        return rate, idle, peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)


def orthanc_rate(paths: list[Path], work: Path) -> float:
    orthanc = Orthanc(work / "orthanc", free_port(), free_port())
    orthanc.root.mkdir()
    orthanc.start()
    try:
        return len(paths) / timed_stow(f"{orthanc.url}/dicom-web/studies", paths, {})
    finally:
        orthanc.stop()


def http_implementation() -> str:
    """What uvicorn's ``--http auto`` picks here (httptools when installed, else h11)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="measure both this many times")
    args = parser.parse_args()
    if shutil.which("Orthanc") is None:
        raise SystemExit("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")

    work = Path(tempfile.mkdtemp(prefix="curia-stow-"))
    try:
        paths = write_series(work / "series", args.slices)
        size = sum(path.stat().st_size for path in paths) / 1e6
        print(f"{args.slices} instances, {size:.0f} MB, one STOW-RS request each")
        print(f"node API served by uvicorn with {http_implementation()}")
        for run in range(1, args.runs + 1):
            folder = work / f"run-{run}"
            folder.mkdir()
            orthanc = orthanc_rate(paths, folder)
            node, idle, rss = node_rate(paths, folder)
            if args.runs > 1:
                print(f"run {run}:")
            print(f"Orthanc DICOMweb: {orthanc:7.1f} instances/s (SyncStorageArea off: no fsync)")
            print(f"Curia Node      : {node:7.1f} instances/s (fsync + rename + catalogued)")
            print(f"node API process peak RSS: {idle:.0f} MiB before, {rss:.0f} MiB after")
            print(f"ratio node/Orthanc: {node / orthanc:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
