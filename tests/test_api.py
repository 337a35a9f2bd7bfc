"""The HTTP API: health is open, everything else needs the bearer token."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node.catalogue.db import Catalogue, upgrade
from node.core.settings import Settings
from node.web.app import api_token, create_api


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, str]:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    settings = Settings(data_dir=tmp_path)
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    app = create_api(settings, Catalogue(settings.effective_database_url))
    return TestClient(app), api_token(settings)


def test_health_needs_no_token(client: tuple[TestClient, str]) -> None:
    http, _ = client
    assert http.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc"])
def test_no_or_bad_token_is_401(client: tuple[TestClient, str], header: str | None) -> None:
    http, _ = client
    headers = {"Authorization": header} if header else {}
    response = http.get("/api/v1/studies", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_token_is_generated_once_and_kept_private(tmp_path: Path, client) -> None:
    http, token = client
    path = tmp_path / "api-token"
    assert path.read_text() == token and len(token) >= 32
    assert path.stat().st_mode & 0o077 == 0, "only the node's user may read the token"
    response = http.get("/api/v1/studies", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json() == []


def test_readiness_and_metrics(client: tuple[TestClient, str]) -> None:
    http, token = client
    assert http.get("/readyz").json() == {"status": "ready"}
    assert http.get("/metrics").status_code == 401
    body = http.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert "curia_instances_received_total" in body
    assert "# TYPE curia_pipeline_runs gauge" in body
