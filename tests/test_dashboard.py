"""The admin dashboard: the overview endpoint, and the pages driven in a real headless Chromium
against a real node, a real Orthanc and the real sample CT."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import event

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import (
    Delivery,
    DeliveryState,
    PerformedStep,
    PipelineRun,
    Result,
    RunState,
    Series,
    SeriesState,
    StepStatus,
    Study,
)
from node.core.settings import Settings
from node.web.app import api_token, create_api
from node.web.tokens import create_token
from tests.support.env import node_env
from tests.support.peers import VENV_BIN, Orthanc, free_port
from tests.support.testdata import TEST_PATIENT_ID, TEST_PATIENT_NAME

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
ACCESSION = "ACC-4711"

# ---- /api/v1/overview (fast, in-process) ----------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    settings = Settings(data_dir=tmp_path)
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return settings


@pytest.fixture
def catalogue(settings: Settings) -> Iterator[Catalogue]:
    catalogue = Catalogue(settings.effective_database_url)
    yield catalogue
    catalogue.dispose()


@pytest.fixture
def http(settings: Settings, catalogue: Catalogue) -> TestClient:
    return TestClient(create_api(settings, catalogue), follow_redirects=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_study(catalogue: Catalogue, n: int) -> None:
    """A study whose series went through the whole pipeline: one result, three deliveries."""
    t0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with catalogue.session() as session:
        study = Study(
            study_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}",
            patient_id=TEST_PATIENT_ID,
            accession_number=ACCESSION,
            study_date="20250102",
        )
        series = Series(
            study=study,
            series_instance_uid=f"1.2.826.0.1.3680043.10.2.{n}",
            modality="CT",
            series_description="Abdomen",
            instance_count=20,
            state=SeriesState.DONE,
            first_received_at=t0,
            last_received_at=t0 + timedelta(seconds=4),
            completed_at=t0 + timedelta(seconds=6),
        )
        run = PipelineRun(
            series=series,
            run_key=f"run-{n}",
            state=RunState.FAILED,
            created_at=t0 + timedelta(seconds=6),
            enqueued_at=t0 + timedelta(seconds=6),
            started_at=t0 + timedelta(seconds=7),
            inferred_at=t0 + timedelta(seconds=9),
            finished_at=t0 + timedelta(seconds=12),
            error="delivery to dead failed: refused",
        )
        result = Result(
            run=run,
            kind="sr",
            sop_instance_uid=f"1.2.826.0.1.3680043.10.3.{n}",
            series_instance_uid=f"1.2.826.0.1.3680043.10.4.{n}",
            path=f"x/{n}.dcm",
            summary="body-region: abdomen (90%)",
        )
        session.add_all(
            [
                Delivery(result=result, destination="archive", state=DeliveryState.SENT),
                Delivery(
                    result=result,
                    destination="dead",
                    state=DeliveryState.FAILED,
                    attempts=1,
                    last_error="refused",
                ),
                Delivery(series=series, destination="forward", rule="r1"),
            ]
        )


def test_overview_needs_a_token(http: TestClient) -> None:
    assert http.get("/api/v1/overview").status_code == 401
    assert http.get("/api/v1/overview", headers=bearer("wrong")).status_code == 401


def test_overview_shape_queues_and_counts(
    http: TestClient, settings: Settings, catalogue: Catalogue
) -> None:
    add_study(catalogue, 1)
    with catalogue.session() as session:  # a second series, received and waiting for its run
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.9", patient_id=TEST_PATIENT_ID)
        series = Series(
            study=study, series_instance_uid="1.2.826.0.1.3680043.10.9.1", instance_count=3
        )
        session.add(PipelineRun(series=series, run_key="queued", state=RunState.QUEUED))
        session.add(
            PerformedStep(
                sop_instance_uid="1.2.826.0.1.3680043.10.9.7",
                calling_ae_title="CT1",
                status=StepStatus.COMPLETED,
                performed_series={"1.2.826.0.1.3680043.10.9.1": ["1.2.3.1", "1.2.3.2"]},
            )
        )
    reader = create_token(catalogue, "viewer", "read", "test")
    response = http.get("/api/v1/overview", headers=bearer(reader))
    assert response.status_code == 200
    body = response.json()
    assert body["queues"] == {
        "runs_queued": 1,
        "runs_running": 0,
        "deliveries_pending": 1,
        "deliveries_failed": 1,
    }
    assert body["counts"]["instances_received"] == 23
    assert body["counts"]["studies"] == 2 and body["counts"]["series"] == 2
    assert body["counts"]["runs"] == {"failed": 1, "queued": 1}
    newest, done = body["studies"]
    assert newest["study_instance_uid"] == "1.2.826.0.1.3680043.10.9", "newest first"
    assert newest["series"][0]["runs"][0]["state"] == "queued"
    series = done["series"][0]
    assert {k: series[k] for k in ("uid", "modality", "description", "instance_count")} == {
        "uid": "1.2.826.0.1.3680043.10.2.1",
        "modality": "CT",
        "description": "Abdomen",
        "instance_count": 20,
    }
    assert series["state"] == "done"
    assert series["completed_at"].startswith("2025-01-02T03:04:11")
    assert series["completed_by"] is None and series["waiting_for"] is None
    (step,) = body["performed_steps"]
    assert (step["calling_ae_title"], step["status"]) == ("CT1", "COMPLETED")
    assert step["series"] == {"1.2.826.0.1.3680043.10.9.1": 2}
    run = series["runs"][0]
    assert run["inferred_at"].startswith("2025-01-02T03:04:14")
    assert run["error"] == "delivery to dead failed: refused"
    (result,) = run["results"]
    assert result["kind"] == "sr" and result["uid"] == "1.2.826.0.1.3680043.10.3.1"
    assert result["summary"] == "body-region: abdomen (90%)"
    assert [(d["destination"], d["state"], d["attempts"]) for d in result["deliveries"]] == [
        ("archive", "sent", 0),
        ("dead", "failed", 1),
    ]
    assert result["deliveries"][1]["last_error"] == "refused"
    assert [(d["destination"], d["rule"]) for d in series["forwards"]] == [("forward", "r1")]


def test_overview_has_no_patient_data(http: TestClient, settings: Settings, catalogue) -> None:
    add_study(catalogue, 1)
    text = http.get("/api/v1/overview", headers=bearer(api_token(settings))).text
    for secret in (TEST_PATIENT_ID, ACCESSION, "20250102", "PatientName", "patient"):
        assert secret not in text


def test_overview_queries_do_not_grow_with_the_studies(
    http: TestClient, settings: Settings, catalogue: Catalogue
) -> None:
    def statements() -> int:
        seen: list[str] = []
        listener = lambda *args: seen.append(args[2])  # noqa: E731
        event.listen(catalogue.engine, "before_cursor_execute", listener)
        try:
            assert http.get("/api/v1/overview", headers=bearer(api_token(settings))).is_success
        finally:
            event.remove(catalogue.engine, "before_cursor_execute", listener)
        return len(seen)

    add_study(catalogue, 1)
    few = statements()
    for n in range(2, 12):
        add_study(catalogue, n)
    assert statements() == few, "one query per level, not per row"


def test_pages_need_no_token_and_hold_no_data(http: TestClient) -> None:
    assert http.get("/").headers["location"] == "dashboard/"
    assert http.get("/dashboard").status_code == 307
    page = http.get("/dashboard/")
    assert page.status_code == 200 and "Curia Node" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "api.js", "ui.js", "studies.js", "admin.js", "dashboard.css"):
        asset = http.get(f"/dashboard/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith(("text/javascript", "text/css"))
    assert http.get("/dashboard/missing.js").status_code == 404
    assert http.get("/dashboard/..%2Fdashboard.py").status_code == 404


# ---- the dashboard in a real browser, against a real node -----------------------------------


def push_study(orthanc: Orthanc, node_port: int, files: list[Path]) -> None:
    """Orthanc sends the study to the node by C-STORE, as a modality or PACS would."""
    orthanc_study = orthanc.upload(files)
    orthanc.set_modality("node", "CURIA", node_port)
    orthanc.post("/modalities/node/store", json={"Resources": [orthanc_study], "Synchronous": True})


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_in_a_browser(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, browser
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    env = node_env(
        tmp_path,
        orthanc,
        CURIA_DELIVERY__MAX_ATTEMPTS="1",
        CURIA_DELIVERY__BACKOFF_SECONDS="0.5",
    )
    node = node_factory(env)
    token = (Path(env["CURIA_DATA_DIR"]) / "api-token").read_text().strip()
    header = dcmread(ct_series[0], stop_before_pixels=True)
    study_uid, series_uid = header.StudyInstanceUID, header.SeriesInstanceUID
    dead_port = free_port()

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))

    # a. The root leads to the dashboard, which asks for the token; a wrong one is refused.
    page.goto(node.api_url + "/")
    assert page.url.endswith("/dashboard/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(page.locator("#node-version")).to_have_text(re.compile(r"^v\d"))
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-message")).to_contain_text("did not accept")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#who-name")).to_have_text("bootstrap")
    expect(page.locator("#who-role")).to_have_text("admin")
    expect(page.get_by_role("tab", name="Studies")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#studies-body")).to_contain_text("No study received yet")

    # b. Add a DIMSE destination where nothing listens; the API's refusals show by the form.
    page.get_by_role("tab", name="Peers").click()
    archive = page.locator('#destinations-body tr[data-destination="archive"]')
    expect(archive).to_contain_text("config")
    expect(archive.get_by_role("button", name="Edit")).to_have_count(0)
    form = page.locator("#destination-form")
    form.get_by_label("Name", exact=True).fill("dead-end")
    form.get_by_label("AE title", exact=True).fill("NOWHERE")
    form.get_by_label("Host").fill("127.0.0.1")
    form.get_by_role("button", name="Add destination").click()
    expect(page.locator("#destination-message")).to_contain_text("needs port")
    form.get_by_label("Port").fill(str(dead_port))
    expect(form.get_by_label("Send every result here")).to_be_checked()
    form.get_by_role("button", name="Add destination").click()
    expect(page.locator("#destination-message")).to_have_text("Added dead-end.")
    dead_end = page.locator('#destinations-body tr[data-destination="dead-end"]')
    expect(dead_end).to_contain_text(f"NOWHERE@127.0.0.1:{dead_port}")
    expect(page.locator("#audit-body")).to_contain_text("destination-added")
    expect(page.locator("#local-body")).to_contain_text("CURIA")
    page.locator("#local-form").get_by_label("AE title").fill("CURIA-NEURO")
    page.locator("#local-form").get_by_role("button", name="Add AE title").click()
    expect(page.locator("#local-message")).to_have_text("The node now also answers to CURIA-NEURO.")
    expect(page.locator("#local-body")).to_contain_text("CURIA-NEURO")

    # c. The real CT arrives and goes through every stage; the archive gets the results.
    page.get_by_role("tab", name="Studies").click()
    push_study(orthanc, node.dicom_port, ct_series)
    expect(page.locator(f'tr[data-study="{study_uid}"]')).to_be_visible(timeout=60_000)
    row = page.locator(f'tr[data-series="{series_uid}"]')
    expect(row).to_contain_text("20 instances")
    archive_badge = row.locator('[data-destination="archive"]')
    expect(archive_badge).to_have_attribute("data-state", "sent", timeout=300_000)
    for stage in ("received", "complete", "inference", "report"):
        expect(row.locator(f'[data-stage="{stage}"]')).to_have_attribute("data-status", "done")
    studies_text = page.locator("#panel-studies").inner_text()
    assert TEST_PATIENT_ID not in studies_text and TEST_PATIENT_NAME not in studies_text
    page.get_by_role("button", name="View report").click()
    report = page.frame_locator("#report-frame")
    expect(report.locator("body")).to_contain_text("Curia AI results", timeout=60_000)
    expect(report.get_by_role("heading", name="Imaging Measurement Report").first).to_be_visible()
    page.get_by_role("button", name="Close").click()

    # d. With one attempt allowed, the dead destination's deliveries are dead-lettered.
    dead_badge = row.locator('[data-destination="dead-end"]')
    expect(dead_badge).to_have_attribute("data-state", "failed", timeout=120_000)
    expect(row.locator('[data-stage="delivered"]')).to_have_attribute("data-status", "failed")
    pending = page.locator('#studies-queues [data-queue="deliveries_pending"]')
    expect(pending).to_have_attribute("data-value", "0", timeout=120_000)  # all dead-lettered
    expect(page.locator("#failures-count")).to_be_visible()
    page.get_by_role("tab", name="Failures").click()
    failed_rows = page.locator("#failures-body tr[data-delivery]")
    expect(failed_rows.first).to_contain_text("dead-end")
    failed_count = failed_rows.count()
    assert failed_count >= 1

    # Fix the destination through the form: Orthanc's AE title and DICOM port.
    page.get_by_role("tab", name="Peers").click()
    dead_end.get_by_role("button", name="Edit").click()
    expect(form.get_by_label("Name", exact=True)).to_have_value("dead-end")
    form.get_by_label("AE title", exact=True).fill(orthanc.aet)
    form.get_by_label("Port").fill(str(orthanc.dicom_port))
    form.get_by_role("button", name="Save changes").click()
    expect(page.locator("#destination-message")).to_have_text("Saved dead-end.")
    expect(dead_end).to_contain_text(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    expect(page.locator("#audit-body")).to_contain_text(f"port: {dead_port} → {orthanc.dicom_port}")
    dead_end.get_by_role("button", name="Test").click()
    expect(dead_end.locator('[data-field="check"]')).to_contain_text("ok")

    # Retry one delivery by its own button, then the rest with "Retry all".
    page.get_by_role("tab", name="Failures").click()
    expect(failed_rows).to_have_count(failed_count)
    failed_rows.first.get_by_role("button", name="Retry").click()
    expect(page.locator("#failures-message")).to_contain_text("Re-queued delivery #")
    if failed_count > 1:
        expect(failed_rows).to_have_count(failed_count - 1)
        page.get_by_role("button", name="Retry all").click()
    expect(page.locator("#failures-body")).to_contain_text("No failed deliveries")
    page.get_by_role("tab", name="Studies").click()
    expect(dead_badge).to_have_attribute("data-state", "sent", timeout=120_000)
    expect(row.locator('[data-stage="delivered"]')).to_have_attribute("data-status", "done")
    expect(row.locator('[data-field="series-state"]')).to_have_text("done")
    expect(page.locator("#failures-count")).to_be_hidden()

    # Rules: shown, or said to be unavailable; queues and health from the overview.
    page.get_by_role("tab", name="Rules").click()
    expect(page.locator("#rules-unavailable:visible, #rules-editor:visible")).to_have_count(1)
    page.get_by_role("tab", name="Queues and health").click()
    expect(page.locator("#queue-cards")).to_contain_text("Instances received")
    expect(page.locator("#queue-cards .metric").nth(4)).to_contain_text("20")

    # e. The screenshot in the docs, only when asked for.
    page.get_by_role("tab", name="Studies").click()
    expect(row.locator('[data-stage="delivered"]')).to_have_attribute("data-status", "done")
    if os.environ.get("CURIA_SCREENSHOT"):
        page.mouse.move(0, 0)
        table = page.locator("#panel-studies .table-wrap").bounding_box()
        bottom = table["y"] + table["height"] + 24
        page.screenshot(
            path=str(SCREENSHOT), clip={"x": 0, "y": 0, "width": 1440, "height": bottom}
        )

    # A read token sees everything and no write control; logging out forgets the token.
    reader = subprocess.run(
        [str(VENV_BIN / "curia-node"), "token", "create", "viewer", "--role", "read"],
        env={**os.environ, **node.env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    page.get_by_role("button", name="Log out").click()
    expect(page.locator("#login-message")).to_have_text("You are logged out.")
    page.get_by_label("API token").fill(reader)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#who-role")).to_have_text("read")
    expect(page.locator("#read-only-notice")).to_be_visible()
    expect(page.locator(f'tr[data-series="{series_uid}"]')).to_be_visible()
    page.get_by_role("tab", name="Peers").click()
    expect(page.locator('#destinations-body tr[data-destination="dead-end"]')).to_be_visible()
    expect(page.locator("#destination-form")).to_be_hidden()
    expect(page.get_by_role("button", name="Edit")).to_have_count(0)

    # A token revoked (here: forgotten by the tab) sends the admin back to the login.
    page.evaluate("sessionStorage.setItem('curia-node.dashboard.token', 'revoked')")
    page.get_by_role("tab", name="Studies").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(page.locator("#login-message")).to_contain_text("401")
    assert not page_errors, page_errors
    context.close()
