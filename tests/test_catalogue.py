"""Schema migrations on both databases, and the completion watcher's rules."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from node.catalogue import instance_lookups
from node.catalogue.db import Catalogue, upgrade
from node.catalogue.instance_lookups import UidLookup
from node.catalogue.models import (
    Instance,
    PipelineRun,
    RunState,
    Series,
    SeriesState,
    Study,
)
from node.workflow.completion import CompletionWatcher

TABLES = {
    "studies",
    "series",
    "instances",
    "pipeline_runs",
    "results",
    "peers",
    "deliveries",
    "audit_events",
    "performed_steps",
    "mpps_forwards",
    "commitment_requests",
    "completion_signals",
    "alembic_version",
}


def test_sqlite_schema_upgrades_and_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    upgrade(url)
    assert set(sa.inspect(sa.create_engine(url)).get_table_names()) >= TABLES


@pytest.mark.production
def test_postgres_schema_upgrades(postgres_url: str) -> None:
    upgrade(postgres_url)
    upgrade(postgres_url)
    engine = sa.create_engine(postgres_url)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def _uid_lookup_sees_each_commit(url: str) -> None:
    """What ingest relies on: a UID catalogued after the lookup's connection last answered
    is found at once (no transaction kept open on it), one never catalogued is not."""
    upgrade(url)
    catalogue = Catalogue(url)
    lookup = UidLookup(url, connections=1)
    try:
        assert not lookup("1.2.3.1"), "nothing is catalogued yet"
        with catalogue.session() as session:
            study = Study(study_instance_uid="1.2.3")
            series = Series(series_instance_uid="1.2.3.9", study=study)
            session.add(
                Instance(
                    sop_instance_uid="1.2.3.1",
                    series=series,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="a",
                    size=1,
                )
            )
        assert lookup("1.2.3.1"), "a row committed since is seen by the same connection"
        assert not lookup("1.2.3.10"), "a UID is matched whole, not as a prefix"
    finally:
        lookup.dispose()
        catalogue.dispose()


compiled_lookup = pytest.mark.skipif(
    instance_lookups._uid_lookup is None, reason="the compiled lookup is not built"
)


@pytest.mark.parametrize(
    "compiled", [pytest.param(True, marks=compiled_lookup), False], ids=["compiled", "driver"]
)
def test_the_uid_lookup_sees_each_commit_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    if not compiled:
        monkeypatch.setattr(instance_lookups, "_uid_lookup", None)
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    assert UidLookup(url).compiled is compiled
    _uid_lookup_sees_each_commit(url)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_the_compiled_uid_lookup_is_built_where_a_compiler_is() -> None:
    """The install builds it (setup.py, against Debian's libsqlite3-dev); without it ten
    associations receiving at once wait on the interpreter lock around every question."""
    assert instance_lookups._uid_lookup is not None


@compiled_lookup
def test_a_question_sqlite_cannot_answer_at_once_is_asked_the_usual_way(tmp_path: Path) -> None:
    """The compiled lookup holds the interpreter lock, so it never waits for SQLite's
    locks: while another connection holds the catalogue, it gives up at once and the
    question goes through the driver, which waits (its busy timeout) and answers."""
    path = tmp_path / "c.sqlite"
    url = f"sqlite:///{path}"
    upgrade(url)
    lookup = UidLookup(url, connections=1)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        assert lookup.compiled
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # no reader gets in, WAL or not
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(instance_lookups._uid_lookup.LookupFailed, match="locked"):
            lookup._compiled("1.2.3")
        threading.Timer(0.3, holder.close).start()
        started = time.monotonic()
        assert not lookup("1.2.3"), "answered once the catalogue was let go"
        assert time.monotonic() - started >= 0.2, "the driver waited for it"
        assert not lookup._compiled("1.2.3"), "and the compiled lookup answers again"
    finally:
        holder.close()
        lookup.dispose()


def test_only_an_sqlite_file_is_asked_by_the_compiled_lookup(tmp_path: Path) -> None:
    """PostgreSQL, an SQLite database in memory, or a file the lookup cannot open (not
    there yet, no schema) are asked through the driver alone; nothing is created."""
    missing = tmp_path / "missing.sqlite"
    for url in (
        "postgresql+psycopg://curia@127.0.0.1:1/none",
        "sqlite://",
        "sqlite:///:memory:",
        f"sqlite:///{missing}",
        f"sqlite:///{tmp_path / 'no-schema.sqlite'}",
    ):
        if url.endswith("no-schema.sqlite"):
            sqlite3.connect(url.removeprefix("sqlite:///")).close()
        lookup = UidLookup(url)
        assert not lookup.compiled, url
        lookup.dispose()
    assert not missing.exists()


@pytest.mark.production
def test_the_uid_lookup_sees_each_commit_on_postgres(postgres_url: str) -> None:
    _uid_lookup_sees_each_commit(postgres_url)


@pytest.mark.production
def test_the_uid_lookup_answers_after_postgres_drops_its_connections(postgres_url: str) -> None:
    """The lookup keeps its connections without pinging them: after the server ends them
    (a restart, an administrator), the next question still gets its answer, not an error
    that would refuse an instance."""
    upgrade(postgres_url)
    lookup = UidLookup(postgres_url, connections=4)
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        held = [lookup._connection() for _ in range(3)]  # three kept, idle
        for connection in held:
            lookup._idle.put(connection)
        assert not lookup("1.2.3.1")
        with admin.connect() as conn:
            ended = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert ended >= 3, "the lookup's connections were ended by the server"
        assert not lookup("1.2.3.1"), "answered on a new connection"
        assert not lookup("1.2.3.2"), "and the stale ones kept were not used again"
    finally:
        admin.dispose()
        lookup.dispose()


def test_a_uid_lookup_that_cannot_read_the_catalogue_says_so_as_the_engine_would(
    tmp_path: Path,
) -> None:
    """Ingest treats a catalogue it cannot read as 'not known to be new' by catching
    SQLAlchemy's errors: the lookup's driver errors must arrive as those."""
    lookup = UidLookup(f"sqlite:///{tmp_path / 'no-schema.sqlite'}")
    try:
        with pytest.raises(sa.exc.SQLAlchemyError, match="instances"):
            lookup("1.2.3")
    finally:
        lookup.dispose()


def _series(catalogue: Catalogue, uid: str, last: datetime) -> None:
    with catalogue.session() as session:
        study = Study(study_instance_uid=f"{uid}.1")
        session.add(Series(series_instance_uid=uid, study=study, last_received_at=last))


def test_watcher_completes_only_quiet_series_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    now = datetime.now(UTC)
    _series(catalogue, "1.2.3", now - timedelta(seconds=30))
    _series(catalogue, "1.2.4", now)
    sent: list[int] = []
    watcher = CompletionWatcher(
        catalogue,
        lambda run_id, _priority: sent.append(run_id),
        lambda s: s.series_instance_uid,
        10,
        1,
    )

    first = watcher.complete_quiet_series(now)
    assert len(first) == 1 and sent == first
    assert watcher.complete_quiet_series(now) == [], "a complete series is not queued again"
    later = watcher.complete_quiet_series(now + timedelta(seconds=11))
    assert len(later) == 1
    with catalogue.session() as session:
        states = {s.series_instance_uid: s.state for s in session.scalars(sa.select(Series))}
        assert states == {"1.2.3": SeriesState.COMPLETE, "1.2.4": SeriesState.COMPLETE}
        runs = session.scalars(sa.select(PipelineRun)).all()
        assert all(run.enqueued_at is not None for run in runs)


def test_watcher_resends_runs_that_never_reached_the_broker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    _series(catalogue, "1.2.3", datetime.now(UTC))
    with catalogue.session() as session:
        series = session.scalars(sa.select(Series)).one()
        session.add(PipelineRun(series=series, run_key="k", state=RunState.QUEUED))
    sent: list[int] = []
    watcher = CompletionWatcher(
        catalogue, lambda run_id, _priority: sent.append(run_id), lambda s: "k", 10, 1
    )
    assert watcher.resend_unsent() == sent and len(sent) == 1
    assert watcher.resend_unsent() == [], "sent runs are not sent twice"
