"""Crashes: every instance that got Success survives a kill -9 of the node.

A real DCMTK storescu pushes a 300-slice series; the node is killed with SIGKILL after a
number of Success responses, restarted, and every instance storescu saw succeed must be in
the catalogue with its exact bytes on disk. The sender then resends everything (duplicates
are Success, stored once) and the series completes.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from benchmarks.ingest import write_series
from tests.support.env import node_env
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for

SLICES = 300


@pytest.fixture(scope="module")
def series_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("push") / "series"
    write_series(folder, SLICES)
    return folder


def _push(node: NodeProcess, folder: Path, kill_after: int | None) -> list[str]:
    """storescu the folder; SIGKILL the node after ``kill_after`` Successes; return the
    files that got a Success response."""
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", "CURIA", "+sd", "127.0.0.1", str(node.dicom_port), str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    succeeded: list[str] = []
    current = None
    for line in proc.stdout:
        sending = re.search(r"Sending file: (\S+)", line)
        if sending:
            current = sending.group(1)
        elif "Received Store Response (Success)" in line and current:
            succeeded.append(current)
            if kill_after is not None and len(succeeded) == kill_after:
                os.killpg(node.node.pid, signal.SIGKILL)
    proc.wait()
    return succeeded


def _catalogued(node: NodeProcess) -> dict[str, tuple[str, str | None]]:
    db = Path(node.env["CURIA_DATA_DIR"]) / "catalogue.sqlite"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT sop_instance_uid, path, sha256 FROM instances").fetchall()
    return {sop: (path, digest) for sop, path, digest in rows}


def _data_set(part10: bytes) -> bytes:
    """The bytes after a Part 10 file's meta group (the node writes a meta of its own)."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    return part10[144 + int.from_bytes(part10[140:144], "little") :]


def _sop_uid(path: str) -> str:
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True).SOPInstanceUID


@pytest.mark.e2e
@pytest.mark.parametrize("kill_after", [1, 150, 299])
def test_kill_9_during_a_push_loses_nothing_that_got_success(
    kill_after: int, series_300: Path, node_factory, tmp_path: Path
) -> None:
    archive = Orthanc(tmp_path, free_port(), free_port())  # never started: results not needed
    env = node_env(tmp_path, archive, CURIA_COMPLETION__SERIES_QUIET_SECONDS="1")
    node = node_factory(env)

    succeeded = _push(node, series_300, kill_after)
    assert len(succeeded) >= kill_after
    node.node.wait(10)

    node.start()  # restart on the same data folder
    catalogued = _catalogued(node)
    spool = Path(env["CURIA_DATA_DIR"]) / "spool"
    for file in succeeded:
        sop = _sop_uid(file)
        assert sop in catalogued, f"an instance that got Success is missing after kill -9 ({file})"
        path, digest = catalogued[sop]
        stored = (spool / path).read_bytes()
        sent = Path(file).read_bytes()
        assert _data_set(stored) == _data_set(sent), "stored bytes are complete"
        # filed from the ingest journal, a row has no digest until one is needed
        assert digest in (None, hashlib.sha256(stored).hexdigest())
    for sop, (path, _) in catalogued.items():
        assert (spool / path).is_file(), f"catalogued instance {sop} has no file"

    again = _push(node, series_300, kill_after=None)
    assert len(again) == SLICES, "after the restart every instance is accepted"
    # Filed once the sender's stream ends, each once.
    wait_for(lambda: len(_catalogued(node)) >= SLICES or None, 30, "the push filed")
    assert len(_catalogued(node)) == SLICES, "each stored once"

    def series_done() -> bool:
        db = Path(env["CURIA_DATA_DIR"]) / "catalogue.sqlite"
        with sqlite3.connect(db) as conn:
            states = [s for (s,) in conn.execute("SELECT state FROM pipeline_runs")]
        return bool(states) and states[-1] in ("reported", "succeeded", "failed")

    wait_for(series_done, 120, "the series completes and is analysed after the restart")
