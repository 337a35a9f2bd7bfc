"""A real OHIF v3 viewer for tests: the prebuilt app from npm, served next to a test Orthanc.

The viewer is the published ``@ohif/app`` package (a complete static build), fetched once
with ``npm pack`` into an ignored cache and checked against the registry's integrity digest.
It is served by a small threaded HTTP server that

- answers ``/app-config.js`` with a configuration pointing at ``/dicom-web`` on the same
  origin (Orthanc 1.10 sends no CORS headers, so the viewer must not call it cross-origin);
- proxies ``/dicom-web/...`` to the Orthanc's DICOMweb plug-in;
- serves files from the build, and ``index.html`` for page routes such as ``/viewer``.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import shutil
import subprocess
import tarfile
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_CACHE = REPO / ".cache" / "ohif"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  investigationalUseDialog: {option: 'never'},
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Test Orthanc',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {enabled: true, relativeResolution: 'studies'},
      },
    },
  ],
};
"""


def _integrity() -> str:
    """The registry's digest of the pinned tarball (npm checks the download against it)."""
    out = subprocess.run(
        ["npm", "view", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "dist.integrity", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out)


def fetch_ohif(cache: Path = OHIF_CACHE) -> Path:
    """The viewer's static build folder, fetched with ``npm pack`` on first use."""
    dist = cache / OHIF_VERSION / "dist"
    if (dist / "index.html").is_file():
        return dist
    if shutil.which("npm") is None:
        raise RuntimeError("npm is missing: run scripts/system-deps.sh (npm)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        packed = subprocess.run(
            ["npm", "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        (info,) = json.loads(packed.stdout)
        if info["integrity"] != _integrity():
            raise RuntimeError(f"{OHIF_PACKAGE}@{OHIF_VERSION}: integrity mismatch")
        with tarfile.open(Path(tmp) / info["filename"]) as archive:
            archive.extractall(tmp, filter="data")
        target = cache / OHIF_VERSION
        target.mkdir(exist_ok=True)
        shutil.rmtree(dist, ignore_errors=True)
        (Path(tmp) / "package" / "dist").rename(dist)
    return dist


class _Handler(BaseHTTPRequestHandler):
    dist: ClassVar[Path]
    upstream: ClassVar[tuple[str, int]]

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/dicom-web"):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        target = (self.dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.dist) or not target.is_file():
            target = self.dist / "index.html"  # a page route of the single-page app
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, target.read_bytes(), kind)

    def _proxy(self) -> None:
        host, port = self.upstream
        connection = http.client.HTTPConnection(host, port, timeout=120)
        headers = {
            k: v for k, v in self.headers.items() if k.lower() in {"accept", "range", "host"}
        }
        try:
            connection.request("GET", self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            kind = response.getheader("Content-Type", "application/octet-stream")
            self._send(response.status, body, kind)
        finally:
            connection.close()

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class OhifServer:
    """OHIF on ``http://127.0.0.1:<port>``, reading studies from one Orthanc."""

    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        handler = type(
            "OhifHandler",
            (_Handler,),
            {"dist": dist.resolve(), "upstream": ("127.0.0.1", orthanc_http_port)},
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def viewer_url(self, study_uid: str, series_uid: str | None = None) -> str:
        url = f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"
        return url + (f"&initialSeriesInstanceUID={series_uid}" if series_uid else "")

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
