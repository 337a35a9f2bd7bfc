"""Per-sender settings: the configuration file's values, changed by admins in the catalogue
(CLI and API, audited), read live by the node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import AuditEvent, CompletionSignal
from node.catalogue.source_settings import (
    SourceSettingsError,
    SourceSettingsView,
    get_source_setting,
    reset_source_setting,
    set_source_setting,
)
from node.cli.main import app as cli
from node.core.settings import Settings
from node.dimse.association import Association, Requestor
from node.dimse.association_end import record_association_end
from node.web.app import api_token, create_api
from node.web.tokens import create_token


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    config = tmp_path / "curia.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        "[completion.sources.CT1]\nassociation_end = true\n"
        "[dicom.commitment.report_to.CT1]\nport = 104\n"
    )
    monkeypatch.setenv("CURIA_CONFIG", str(config))
    monkeypatch.delenv("CURIA_DATA_DIR", raising=False)
    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return settings


@pytest.fixture
def catalogue(settings: Settings) -> Catalogue:
    return Catalogue(settings.effective_database_url)


def audit(catalogue: Catalogue) -> list[AuditEvent]:
    with catalogue.session() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        session.expunge_all()
        return rows


def test_the_catalogue_wins_over_the_file_field_by_field(
    settings: Settings, catalogue: Catalogue
) -> None:
    base = get_source_setting(catalogue, settings, "CT1")
    assert base.signals.association_end and not base.signals.multiframe
    assert base.report is not None and base.report.association == "new_association"
    assert base.origin["signals.association_end"] == "configuration"
    assert base.origin["signals.multiframe"] == "default"

    changed = set_source_setting(
        catalogue,
        settings,
        "CT1",
        {"signals": {"multiframe": True}, "commitment_report": {"association": "same_then_new"}},
        "tester",
    )
    assert changed.signals.association_end and changed.signals.multiframe
    assert changed.report is not None
    assert (changed.report.association, changed.report.port) == ("same_then_new", 104)
    assert changed.origin["commitment_report.port"] == "configuration"
    assert changed.origin["commitment_report.association"] == "catalogue"
    (event,) = audit(catalogue)
    assert (event.action, event.target, event.actor) == ("source-settings-changed", "CT1", "tester")
    assert event.details["before"]["signals"]["multiframe"] is False
    assert event.details["after"]["signals"]["multiframe"] is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"signals": {"quiet": True}}, "unknown setting(s) quiet"),
        ({"commitment_report": {"association": "same_then_new"}}, "port is needed"),
        ({"commitment_report": {"port": 0}}, "port"),
        ({"commitment_report": {"colour": "red"}}, "colour"),
        ({"report": {}}, "unknown section(s) report"),
    ],
)
def test_a_bad_setting_is_refused_and_nothing_stored(
    settings: Settings, catalogue: Catalogue, changes: dict, message: str
) -> None:
    with pytest.raises(SourceSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        set_source_setting(catalogue, settings, "MR2", changes, "tester")
    assert get_source_setting(catalogue, settings, "MR2").report is None
    assert audit(catalogue) == []


def test_the_running_node_reads_a_change_without_restart(
    settings: Settings, catalogue: Catalogue
) -> None:
    view = SourceSettingsView(catalogue, settings, cache_seconds=0.0)
    assert "MR2" not in view.signals and "MR2" not in view.reports
    association = Association(Requestor("MR2", "CURIA", "127.0.0.1", 1234))
    association.series_uids.add("1.2.3")
    assert record_association_end(catalogue, association, "released", view.signals) == 0

    set_source_setting(
        catalogue,
        settings,
        "MR2",
        {
            "signals": {"association_end": True},
            "commitment_report": {"association": "same_association"},
        },
        "tester",
    )
    assert view.signals["MR2"].association_end
    assert view.reports["MR2"].association == "same_association"
    assert record_association_end(catalogue, association, "released", view.signals) == 1
    with catalogue.session() as session:
        assert session.scalar(select(CompletionSignal.source)) == "MR2"


def test_settings_from_the_cli(settings: Settings, catalogue: Catalogue) -> None:
    runner = CliRunner()
    done = runner.invoke(
        cli,
        [
            "ae",
            "settings",
            "set",
            "CT1",
            "--instance-count",
            "--commitment-report",
            "same_then_new",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "signals.instance_count" in done.stdout and "(catalogue)" in done.stdout
    shown = json.loads(runner.invoke(cli, ["ae", "settings", "show", "CT1", "--json"]).stdout)
    assert shown["signals"] == {
        "association_end": True,
        "instance_count": True,
        "multiframe": False,
    }
    assert shown["commitment_report"]["association"] == "same_then_new"
    listed = json.loads(runner.invoke(cli, ["ae", "settings", "list", "--json"]).stdout)
    assert [s["ae_title"] for s in listed] == ["CT1"]

    refused = runner.invoke(
        cli, ["ae", "settings", "set", "CT9", "--commitment-report", "same_then_new"]
    )
    assert refused.exit_code == 2 and "port is needed" in refused.stderr
    nothing = runner.invoke(cli, ["ae", "settings", "set", "CT1"])
    assert nothing.exit_code == 2

    reset = runner.invoke(cli, ["ae", "settings", "reset", "CT1"])
    assert reset.exit_code == 0, reset.output
    back = get_source_setting(catalogue, settings, "CT1")
    assert not back.signals.instance_count and back.report is not None
    assert back.report.association == "new_association"
    assert [e.action for e in audit(catalogue)] == [
        "source-settings-changed",
        "source-settings-reset",
    ]
    assert audit(catalogue)[0].actor.startswith("cli")


def test_settings_over_the_api(settings: Settings, catalogue: Catalogue) -> None:
    http = TestClient(create_api(settings, catalogue))
    admin = {"Authorization": f"Bearer {api_token(settings)}"}
    reader = {"Authorization": f"Bearer {create_token(catalogue, 'viewer', 'read', 'tester')}"}

    listed = http.get("/api/v1/source-settings", headers=reader)
    assert listed.status_code == 200 and [s["ae_title"] for s in listed.json()] == ["CT1"]
    change = {"signals": {"multiframe": True}}
    assert http.patch("/api/v1/source-settings/CT1", json=change, headers=reader).status_code == 403
    assert http.patch("/api/v1/source-settings/CT1", json=change).status_code == 401

    changed = http.patch("/api/v1/source-settings/CT1", json=change, headers=admin)
    assert changed.status_code == 200 and changed.json()["signals"]["multiframe"] is True
    assert (
        http.get("/api/v1/source-settings/CT1", headers=reader).json()["origin"][
            "signals.multiframe"
        ]
        == "catalogue"
    )
    bad = http.patch("/api/v1/source-settings/CT1", json={"signals": {"loud": True}}, headers=admin)
    assert bad.status_code == 422 and "loud" in bad.json()["detail"]
    assert http.patch("/api/v1/source-settings/CT1", json={}, headers=admin).status_code == 422

    reset = http.delete("/api/v1/source-settings/CT1", headers=admin)
    assert reset.status_code == 200 and reset.json()["signals"]["multiframe"] is False
    assert http.delete("/api/v1/source-settings/CT1", headers=admin).status_code == 404
    actions = [a["action"] for a in http.get("/api/v1/audit", headers=admin).json()[:2]]
    assert actions == ["source-settings-reset", "source-settings-changed"]


def test_config_check_names_unknown_keys_and_senders(
    settings: Settings, catalogue: Catalogue, tmp_path: Path
) -> None:
    runner = CliRunner()
    checked = runner.invoke(cli, ["config", "check"])
    assert checked.exit_code == 0, checked.output
    assert "settings for 'CT1' in the configuration, but no allowed sender" in checked.stderr
    assert runner.invoke(cli, ["ae", "source", "add", "ct-1", "-a", "CT1"]).exit_code == 0
    assert "CT1" not in runner.invoke(cli, ["config", "check"]).stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        "[completion.sources.CT1]\nassociation_ends = true\n"
        '[dicom.commitment.report_to.CT1]\nassociation = "same_then_new"\n'
    )
    refused = runner.invoke(cli, ["config", "check", "-c", str(bad)])
    assert refused.exit_code == 2
    assert "completion.sources.CT1.association_ends" in refused.stderr
    assert "port is needed" in refused.stderr


def test_a_sender_named_like_a_settings_row_is_left_alone(
    settings: Settings, catalogue: Catalogue
) -> None:
    from node.dimse.allow_list import add_source, list_sources

    add_source(catalogue, "settings:CT1", "CT1", None, "tester")
    with pytest.raises(SourceSettingsError, match="rename it first"):
        set_source_setting(catalogue, settings, "CT1", {"signals": {"multiframe": True}}, "t")
    with pytest.raises(SourceSettingsError, match="no settings"):
        reset_source_setting(catalogue, settings, "CT1", "t")
    assert [p.name for p in list_sources(catalogue)] == ["settings:CT1"]
