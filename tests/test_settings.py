"""One typed settings object: defaults, TOML file, environment, masked display."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from node.cli.main import app
from node.core.masking import mask_url
from node.core.settings import Settings, load_settings


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.dicom.ae_title == "CURIA" and settings.dicom.port == 11112
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    assert settings.effective_broker_url.startswith("curia-sqla+sqlite:///")
    assert settings.api.host == "127.0.0.1"


def test_file_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nae_title = "FROMFILE"\nport = 4000\n')
    monkeypatch.setenv("CURIA_DICOM__PORT", "5000")
    settings = load_settings(config)
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.port == 5000, "the environment overrides the file"


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DICOM__AE_TITLE", "WAY-TOO-LONG-AE-TITLE")
    with pytest.raises(ValidationError, match="AE title"):
        Settings()


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CURIA_API__TOKEN", "s3cret-token")
    monkeypatch.setenv("CURIA_DATABASE_URL", "postgresql+psycopg://curia:pa55word@db/curia")
    monkeypatch.setenv("CURIA_PIPELINE__BROKER_URL", "amqp://user:brokerpw@mq:5672//")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    for secret in ("s3cret-token", "pa55word", "brokerpw"):
        assert secret not in result.output
    shown = json.loads(result.output)
    assert shown["database_url"] == "postgresql+psycopg://curia:**********@db/curia"
    assert shown["pipeline"]["broker_url"] == "amqp://user:**********@mq:5672//"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://:**********@cache:6379/0"),
        ("amqp://user:p@ss@w0rd@mq:5672//", "amqp://user:**********@mq:5672//"),
        ("https://alice:pw@pacs/dicom-web", "https://alice:**********@pacs/dicom-web"),
        (
            "https://pacs/wado?access_token=abc123&x=1",
            "https://pacs/wado?access_token=**********&x=1",
        ),
        ("https://pacs/dicom-web", "https://pacs/dicom-web"),
        ("sqlite:////data/catalogue.sqlite", "sqlite:////data/catalogue.sqlite"),
    ],
)
def test_every_url_secret_is_masked_the_same_way(url: str, shown: str) -> None:
    """An empty user, a password holding '@', and a token in the query are all hidden."""
    assert mask_url(url) == shown


def test_config_show_masks_a_redis_url_with_an_empty_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CURIA_PIPELINE__BROKER_URL", "redis://:pass@word@cache:6379/0")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "pass@word" not in result.output and "word@" not in result.output
    assert json.loads(result.output)["pipeline"]["broker_url"] == "redis://:**********@cache:6379/0"


def test_cli_reports_a_bad_config_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DICOM__PORT", "not-a-port")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "invalid configuration" in result.output and "port" in result.output


def test_per_source_signals_and_report_addresses_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        "[completion.sources.CT_SCANNER_1]\nassociation_end = true\n"
        "[dicom.commitment.report_to.Modality_1]\nport = 104\n"
    )
    settings = load_settings(config)
    assert settings.completion.sources["CT_SCANNER_1"].association_end
    assert not settings.completion.sources["CT_SCANNER_1"].instance_count
    assert settings.dicom.commitment.report_to["Modality_1"].port == 104, "AE titles keep case"
    config.write_text('[completion.sources."WAY-TOO-LONG-AE-TITLE"]\nmultiframe = true\n')
    with pytest.raises(ValidationError, match="AE title"):
        load_settings(config)


def test_model_precision_defaults_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    assert Settings().model.precision == "fp32"
    monkeypatch.setenv("CURIA_MODEL__PRECISION", "bf16")
    assert Settings().model.precision == "bf16"
    monkeypatch.setenv("CURIA_MODEL__PRECISION", "fp8")
    with pytest.raises(ValidationError, match="precision"):
        Settings()
