"""Admin control: API tokens by role, and destinations/sources over the CLI and the API."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import ApiToken, AuditEvent
from node.cli.main import app as cli
from node.core.settings import Settings
from node.delivery.destinations import get_destination
from node.web.app import api_token, create_api
from node.web.tokens import create_token, revoke_token
from tests.support.peers import Orthanc, free_port


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return settings


@pytest.fixture
def catalogue(settings: Settings) -> Catalogue:
    return Catalogue(settings.effective_database_url)


@pytest.fixture
def http(settings: Settings, catalogue: Catalogue) -> TestClient:
    return TestClient(create_api(settings, catalogue))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_cli_token_is_shown_once_and_stored_only_hashed(
    settings: Settings, catalogue: Catalogue, http: TestClient
) -> None:
    result = CliRunner().invoke(cli, ["token", "create", "alice", "--role", "admin"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    assert token.startswith("cn_") and len(token) > 40
    with catalogue.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "alice"))
        assert row is not None and token not in row.token_hash and row.role == "admin"
    assert http.get("/api/v1/whoami", headers=bearer(token)).json() == {
        "name": "alice",
        "role": "admin",
    }
    listed = CliRunner().invoke(cli, ["token", "list"])
    assert "alice" in listed.stdout and token not in listed.stdout
    again = CliRunner().invoke(cli, ["token", "create", "alice"])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_roles_limit_what_a_token_may_do(catalogue: Catalogue, http: TestClient) -> None:
    reader = create_token(catalogue, "dashboard-viewer", "read", "test")
    store = create_token(catalogue, "modality", "store", "test")
    assert http.get("/api/v1/destinations", headers=bearer(reader)).status_code == 200
    assert http.get("/dicom-web/studies", headers=bearer(reader)).status_code in (200, 204)
    refused = http.post(
        "/api/v1/destinations",
        json={"name": "x", "ae_title": "X", "host": "127.0.0.1", "port": 104},
        headers=bearer(reader),
    )
    assert refused.status_code == 403 and "read token" in refused.json()["detail"]
    # A store token may send STOW-RS (here an empty body: 4xx from STOW, not 403) and nothing else.
    stow = http.post(
        "/dicom-web/studies",
        content=b"",
        headers={**bearer(store), "Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert stow.status_code not in (401, 403)
    assert http.get("/api/v1/studies", headers=bearer(store)).status_code == 403
    assert http.get("/dicom-web/studies", headers=bearer(store)).status_code == 403


def test_revoked_token_is_refused(catalogue: Catalogue, settings: Settings) -> None:
    token = create_token(catalogue, "temp", "read", "test")
    http = TestClient(create_api(settings, catalogue))
    assert http.get("/api/v1/whoami", headers=bearer(token)).status_code == 200
    revoke_token(catalogue, "temp", "test")
    fresh = TestClient(create_api(settings, catalogue))  # no verification cache
    assert fresh.get("/api/v1/whoami", headers=bearer(token)).status_code == 401


def test_destination_crud_over_the_api_is_audited(
    settings: Settings, catalogue: Catalogue, http: TestClient
) -> None:
    admin = create_token(catalogue, "alice", "admin", "test")
    body = {
        "name": "neuro-stat",
        "protocol": "stow-rs",
        "url": "http://pacs.example:8080/dicom-web/",
        "token": "s3cret",
        "results": False,
    }
    created = http.post("/api/v1/destinations", json=body, headers=bearer(admin))
    assert created.status_code == 201, created.text
    assert created.json()["token"] == "**********" and created.json()["url"].endswith("dicom-web")
    assert http.post("/api/v1/destinations", json=body, headers=bearer(admin)).status_code == 409
    bad = http.post(
        "/api/v1/destinations",
        json={"name": "bad", "protocol": "dimse", "ae_title": "A"},
        headers=bearer(admin),
    )
    assert bad.status_code == 422 and "needs host, port" in bad.json()["detail"]

    masked = {**created.json(), "results": True}  # the dashboard sends back what it was given
    edited = http.patch("/api/v1/destinations/neuro-stat", json=masked, headers=bearer(admin))
    assert edited.status_code == 200 and edited.json()["results"] is True
    names = [d["name"] for d in http.get("/api/v1/destinations", headers=bearer(admin)).json()]
    assert names == ["archive", "neuro-stat"]
    assert (
        http.patch("/api/v1/destinations/archive", json={"port": 1}, headers=bearer(admin))
    ).status_code == 409
    assert http.delete("/api/v1/destinations/neuro-stat", headers=bearer(admin)).status_code == 204
    assert http.delete("/api/v1/destinations/neuro-stat", headers=bearer(admin)).status_code == 404

    with catalogue.session() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.target == "neuro-stat").order_by(AuditEvent.id)
        ).all()
        assert [e.action for e in events] == [
            "destination-added",
            "destination-changed",
            "destination-removed",
        ]
        assert all(e.actor == "api:alice" for e in events)
        change = events[1].details
        assert change["before"]["results"] is False and change["after"]["results"] is True
        assert "s3cret" not in str([e.details for e in events])
    assert get_destination(catalogue, settings, "archive").source == "config"


def test_sources_over_the_api(catalogue: Catalogue, http: TestClient, settings: Settings) -> None:
    admin = api_token(settings)
    created = http.post(
        "/api/v1/sources",
        json={"name": "ct-1", "ae_title": "CT1", "host": "10.0.0.0/24"},
        headers=bearer(admin),
    )
    assert created.status_code == 201
    bad = http.post(
        "/api/v1/sources", json={"name": "x", "ae_title": "A" * 17}, headers=bearer(admin)
    )
    assert bad.status_code == 422
    assert [s["name"] for s in http.get("/api/v1/sources", headers=bearer(admin)).json()] == [
        "ct-1"
    ]
    edited = http.patch("/api/v1/sources/ct-1", json={"host": "*"}, headers=bearer(admin))
    assert edited.status_code == 200 and edited.json()["host"] is None
    assert http.delete("/api/v1/sources/ct-1", headers=bearer(admin)).status_code == 204
    audit = http.get("/api/v1/audit", headers=bearer(admin)).json()
    assert [a["action"] for a in audit[:3]] == ["source-removed", "source-changed", "source-added"]
    assert audit[1]["details"]["before"]["host"] == "10.0.0.0/24"
    assert audit[0]["actor"] == "api:bootstrap"


def test_destination_checks_against_a_real_orthanc(
    orthanc: Orthanc, settings: Settings, catalogue: Catalogue, http: TestClient
) -> None:
    admin = api_token(settings)
    definitions = [
        {"name": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "web", "protocol": "stow-rs", "url": f"{orthanc.url}/dicom-web"},
        {"name": "rest", "protocol": "orthanc-rest", "url": orthanc.url},
        {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
    ]
    for body in definitions:
        assert (
            http.post("/api/v1/destinations", json=body, headers=bearer(admin)).status_code == 201
        )
    checks = {
        name: http.post(f"/api/v1/destinations/{name}/test", headers=bearer(admin)).json()
        for name in ("dimse", "web", "rest", "down")
    }
    assert checks["dimse"]["ok"] and "C-ECHO" in checks["dimse"]["detail"]
    assert checks["web"]["ok"] and "QIDO-RS" in checks["web"]["detail"]
    assert checks["rest"]["ok"] and "Orthanc" in checks["rest"]["detail"]
    assert not checks["down"]["ok"] and "rejected or failed" in checks["down"]["detail"]

    result = CliRunner().invoke(cli, ["ae", "destination", "test", "down"])
    assert result.exit_code == 1 and "rejected or failed" in result.stderr
    result = CliRunner().invoke(cli, ["ae", "destination", "test", "dimse"])
    assert result.exit_code == 0 and result.stdout.startswith("ok: C-ECHO")


def test_cli_destination_lifecycle(catalogue: Catalogue, settings: Settings) -> None:
    runner = CliRunner()
    added = runner.invoke(
        cli,
        ["ae", "destination", "add", "pacs2", "-a", "PACS2", "--host", "10.1.1.1", "--port", "104"],
    )
    assert added.exit_code == 0, added.output
    edited = runner.invoke(cli, ["ae", "destination", "edit", "pacs2", "--port", "11112"])
    assert edited.exit_code == 0 and "10.1.1.1:11112" in edited.stdout
    refused = runner.invoke(cli, ["ae", "destination", "edit", "pacs2", "--port", "70000"])
    assert refused.exit_code == 2 and "port" in refused.stderr
    listed = runner.invoke(cli, ["ae", "destination", "list", "--json"])
    assert '"pacs2"' in listed.stdout
    removed = runner.invoke(cli, ["ae", "destination", "remove", "pacs2"])
    assert removed.exit_code == 0


def test_local_ae_titles_over_the_api(http: TestClient, settings: Settings) -> None:
    admin = bearer(api_token(settings))
    assert http.get("/api/v1/local-ae-titles", headers=admin).json() == [
        {"ae_title": "CURIA", "port": 11112, "source": "config"}
    ]
    assert (
        http.post("/api/v1/local-ae-titles", json={"ae_title": "NEURO"}, headers=admin)
    ).status_code == 201
    again = http.post("/api/v1/local-ae-titles", json={"ae_title": "NEURO"}, headers=admin)
    assert again.status_code == 409
    titles = [t["ae_title"] for t in http.get("/api/v1/local-ae-titles", headers=admin).json()]
    assert titles == ["CURIA", "NEURO"]
    assert http.delete("/api/v1/local-ae-titles/NEURO", headers=admin).status_code == 204
    assert http.delete("/api/v1/local-ae-titles/NEURO", headers=admin).status_code == 404
    actions = [a["action"] for a in http.get("/api/v1/audit", headers=admin).json()[:2]]
    assert actions == ["local-ae-removed", "local-ae-added"]
