"""The quarantine's retention and its CLI: records listed, old days purged, the size cap kept,
through the spool the node writes with and the `curia-node quarantine` commands."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli.main import app
from node.store.quarantine import Quarantine
from node.store.spool import Spool


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _age(quarantine: Path, days: int) -> None:
    """Move today's records to a folder named ``days`` ago, as if they were that old."""
    today = quarantine / datetime.now(UTC).strftime("%Y%m%d")
    today.rename(quarantine / (datetime.now(UTC) - timedelta(days=days)).strftime("%Y%m%d"))


def test_list_shows_records_and_purge_removes_days_older_than_asked(data: Path) -> None:
    spool = Spool(data / "spool", data / "quarantine")
    spool.quarantine(b"x" * 200, "not a DICOM file", "OLD\x1bAE")
    _age(data / "quarantine", 40)
    spool.quarantine(b"y", "too short", "NEWAE")
    listed = CliRunner().invoke(app, ["quarantine", "list"])
    assert listed.exit_code == 0, listed.output
    assert "not a DICOM file" in listed.output and "too short" in listed.output
    assert "OLD\\x1bAE" in listed.output and "\x1b" not in listed.output
    purged = CliRunner().invoke(app, ["quarantine", "purge", "--older-than-days", "30"])
    assert purged.exit_code == 0 and "removed 1 record(s)" in purged.output
    assert [r.reason for r in Quarantine(data / "quarantine").records()] == ["too short"]
    refused = CliRunner().invoke(app, ["quarantine", "purge"])
    assert refused.exit_code == 2 and "exactly one of" in refused.output


def test_retention_keeps_the_quarantine_within_its_size_and_age(data: Path) -> None:
    root = data / "quarantine"
    quarantine = Quarantine(root, max_age_days=30, max_bytes=3000)
    for days in (45, 3, 2):
        quarantine.add("kept", None, 2000, lambda path: path.write_bytes(b"\0" * 2000))
        _age(root, days)
    quarantine.add("today", None, 10, lambda path: None, b"0123456789")
    removed, freed = quarantine.enforce()
    kept = [(r.day, r.reason) for r in quarantine.records()]
    # The 45-day-old record goes by age; then the oldest days until at most 3000 bytes.
    assert removed == 2 and freed > 4000
    assert [reason for _, reason in kept] == ["kept", "today"]
    assert quarantine.usage() <= 3000
    line = json.loads((root / kept[-1][0] / "index.jsonl").read_text().splitlines()[0])
    assert bytes.fromhex(line["head"]) == b"0123456789" and "file" not in line


def test_the_node_applies_retention_while_it_quarantines(data: Path) -> None:
    spool = Spool(data / "spool", data / "quarantine", quarantine_max_age_days=1)
    spool.quarantine(b"old", "old", None)
    _age(data / "quarantine", 5)
    spool.quarantined._enforced = time.monotonic() - 3600  # the last pass long ago
    spool.quarantine(b"new", "new", None)
    assert [r.reason for r in spool.quarantined.records()] == ["new"]
    assert os.listdir(data / "quarantine") == [datetime.now(UTC).strftime("%Y%m%d")]
