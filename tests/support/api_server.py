"""The node's real HTTP API (``create_api``) served in-process by uvicorn on a free port."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from dicomweb_client import DICOMwebClient
from fastapi import FastAPI
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance
from node.core.settings import Settings
from node.web.app import api_token, create_api
from tests.support.peers import free_port, wait_for

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


def multipart_body(parts: list[bytes], boundary: str, close: bool = True) -> bytes:
    """A STOW-RS request body of DICOM ``parts``; ``close=False`` leaves out the last boundary."""
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


@dataclass
class RunningNode:
    """The node's HTTP API served by uvicorn on a free port, with its catalogue."""

    url: str
    token: str
    settings: Settings
    catalogue: Catalogue

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.dicomweb, headers=self.auth)

    def catalogued(self, sop_uids: list[str]) -> dict[str, Instance]:
        with self.catalogue.session() as session:
            rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids)))
            return {row.sop_instance_uid: row for row in rows}

    def stow(self, parts: list[bytes], path: str = "/studies", **headers: str) -> httpx.Response:
        boundary = uuid.uuid4().hex
        return httpx.post(
            self.dicomweb + path,
            content=multipart_body(parts, boundary),
            headers={"Content-Type": STOW_TYPE.format(boundary), **self.auth, **headers},
            timeout=60,
        )


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 15, "uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def running_node(root: Path, database_url: str | None = None) -> Iterator[RunningNode]:
    """The real API app (``create_api``) over a fresh data folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CURIA_CONFIG", raising=False)
        settings = Settings(data_dir=root, database_url=database_url)
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    try:
        with serving(create_api(settings, catalogue)) as url:
            if httpx.get(f"{url}/dicom-web/studies").status_code == 404:
                pytest.fail("node/api.py does not include the DICOMweb router (node.dicomweb)")
            yield RunningNode(url, api_token(settings), settings, catalogue)
    finally:
        catalogue.dispose()
