"""Claims: a stage executed twice at once works once.

Two executions of one stage for one run or delivery (a redelivered task, a time-out) must
give one analysis, one set of results and files, and one C-STORE per result. Shown for the
claim itself (two threads, SQLite and PostgreSQL) and for the whole pipeline with two real
workers consuming the same queues, in both modes: production (RabbitMQ + PostgreSQL) and
embedded (the SQLite broker + SQLite catalogue), each receiving one of two copies of the task.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from benchmarks.ingest import write_series
from node.catalogue.db import Catalogue, alembic_config, migrations_dir, upgrade
from node.catalogue.models import (
    Delivery,
    DeliveryState,
    Instance,
    PipelineRun,
    Result,
    RunState,
    Series,
    SeriesState,
    Study,
)
from node.core.settings import Settings
from node.delivery import deliveries
from node.store.ingest import Ingestor
from node.store.spool import Spool
from node.workflow import runs
from pipelines.jobs.celery_app import create_app
from tests.support.broker import delete_queues
from tests.support.env import RABBITMQ_URL
from tests.support.peers import VENV_BIN, free_port, wait_for

# --- the claim itself -----------------------------------------------------------------------


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'claims.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return _sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_url")


def _run_with_delivery(catalogue: Catalogue, n: int) -> tuple[int, int]:
    """A queued run of a new series, and a pending delivery of one of its results."""
    with catalogue.session() as session:
        series = Series(
            series_instance_uid=f"1.2.3.{n}", study=Study(study_instance_uid=f"1.2.4.{n}")
        )
        session.add(series)
        run = runs.create(session, series, f"key-{n}")
        result = Result(
            run=run,
            kind="sr",
            part="0",
            sop_instance_uid=f"1.2.5.{n}",
            series_instance_uid=f"1.2.6.{n}",
            path=f"x/{n}.dcm",
        )
        session.add(result)
        session.flush()
        [delivery_id] = deliveries.create_for_results(session, [result], ["archive"], {})
        return run.id, delivery_id


def _race(claim: Callable[[], object], contenders: int = 2) -> list[object]:
    """Call ``claim`` from ``contenders`` threads released at the same instant."""
    barrier = threading.Barrier(contenders)
    outcomes: list[object] = []
    lock = threading.Lock()

    def contend() -> None:
        barrier.wait()
        outcome = claim()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_two_threads_claiming_one_run_one_wins(database_url: str) -> None:
    upgrade(database_url)
    catalogue = Catalogue(database_url)
    try:
        for n in range(10):
            run_id, delivery_id = _run_with_delivery(catalogue, n)
            for stage in ("prepare", "analyse"):
                held = _race(lambda s=stage, r=run_id: runs.claim(catalogue, r, s))
                won = [c for c in held if c.outcome is runs.Claimed.CLAIMED]
                assert len(won) == 1, f"{stage}: {[c.outcome for c in held]}"
                assert [c.outcome for c in held if c not in won] == [runs.Claimed.BUSY]
                assert runs.release(catalogue, won[0])
            sends = _race(lambda d=delivery_id: deliveries.claim(catalogue, d), contenders=3)
            assert sorted(c.outcome for c in sends) == ["busy", "busy", "claimed"]
            with catalogue.session() as session:
                assert session.get(Delivery, delivery_id).attempts == 1, "one attempt counted"
                assert session.get(PipelineRun, run_id).state == RunState.RUNNING
    finally:
        catalogue.dispose()


def test_a_dead_holders_claim_is_taken_over_and_its_outcome_refused(tmp_path: Path) -> None:
    url = _sqlite_url(tmp_path)
    upgrade(url)
    catalogue = Catalogue(url)
    run_id, delivery_id = _run_with_delivery(catalogue, 1)
    dead = runs.claim(catalogue, run_id, "analyse")
    assert runs.claim(catalogue, run_id, "analyse").outcome is runs.Claimed.BUSY
    # The holder stops renewing (its worker was killed): after the lease, another takes over.
    with catalogue.session() as session:
        session.get(PipelineRun, run_id).claimed_at = datetime.now(UTC) - runs.LEASE * 2
    alive = runs.claim(catalogue, run_id, "analyse")
    assert alive.outcome is runs.Claimed.CLAIMED
    with catalogue.session() as session:
        assert not runs.record_inferred(session, dead, {"findings": []}, "b", "h")
    with catalogue.session() as session:
        assert runs.record_inferred(session, alive, {"findings": []}, "b", "h")
    assert runs.claim(catalogue, run_id, "analyse").outcome is runs.Claimed.DONE
    assert runs.claim(catalogue, run_id, "prepare").outcome is runs.Claimed.DONE
    assert not runs.fail(catalogue, run_id, "late error", dead), "a lost claim fails nothing"

    first = deliveries.claim(catalogue, delivery_id)
    assert deliveries.claim(catalogue, delivery_id).outcome is deliveries.Claimed.BUSY
    with catalogue.session() as session:
        assert deliveries.record_failure(session, first, "refused", max_attempts=2) is not None
    second = deliveries.claim(catalogue, delivery_id)
    with catalogue.session() as session:
        failure = deliveries.record_failure(session, second, "refused", max_attempts=2)
        assert failure is not None and failure.final and failure.run_id == run_id
    assert deliveries.claim(catalogue, delivery_id).outcome is deliveries.Claimed.GONE
    catalogue.dispose()


def test_not_analysed_ends_run_and_series_without_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run no head applies to ends "not analysed" with its reason: nothing failed, no
    error, one INFO line, and no stage claims it again; a lost claim changes nothing."""
    url = _sqlite_url(tmp_path)
    upgrade(url)
    catalogue = Catalogue(url)
    run_id, _ = _run_with_delivery(catalogue, 1)
    held = runs.claim(catalogue, run_id, "analyse")
    stale = runs.RunClaim(run_id, "analyse", runs.Claimed.CLAIMED, "not-the-holder")
    with catalogue.session() as session:
        assert not runs.not_analysed(session, stale, "ignored")
    with caplog.at_level("INFO", logger="node.workflow.runs"), catalogue.session() as session:
        assert runs.not_analysed(session, held, "localizer: 3 slices, heads need 20")
    with catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        assert run.state == RunState.NOT_ANALYSED and run.error is None
        assert run.finished_at is not None and run.claim_token is None
        assert run.series.state == SeriesState.NOT_ANALYSED
        assert run.series.state_reason == "localizer: 3 slices, heads need 20"
    lines = [r for r in caplog.records if r.name == "node.workflow.runs"]
    assert [r.levelname for r in lines] == ["INFO"] and not any(r.exc_info for r in lines)
    assert runs.claim(catalogue, run_id, "prepare").outcome is runs.Claimed.DONE
    assert runs.claim(catalogue, run_id, "analyse").outcome is runs.Claimed.DONE
    assert runs.claim(catalogue, run_id, "report").outcome is runs.Claimed.GONE
    catalogue.dispose()


def test_a_partly_analysed_series_says_what_was_set_aside(tmp_path: Path) -> None:
    """A series whose axial stack was analysed and whose localizer was not ends done, and
    says beside its state what no head read, where the API, dashboard and status show it."""
    url = _sqlite_url(tmp_path)
    upgrade(url)
    catalogue = Catalogue(url)
    aside = "localizer (1 slice, 512x512)"
    for n, set_aside in ((1, [aside]), (2, [])):
        run_id, delivery_id = _run_with_delivery(catalogue, n)
        with catalogue.session() as session:
            run = session.get(PipelineRun, run_id)
            run.state, run.findings = RunState.REPORTED, {"set_aside": set_aside}
            session.get(Delivery, delivery_id).state = DeliveryState.SENT
        with catalogue.session() as session:
            runs.finish_if_delivered(session, run_id)
        with catalogue.session() as session:
            run = session.get(PipelineRun, run_id)
            assert run.state == RunState.SUCCEEDED and run.series.state == SeriesState.DONE
            expected = f"not analysed: {aside}" if set_aside else None
            assert run.series.state_reason == expected
    catalogue.dispose()


def test_a_forwarded_series_sends_each_object_once_across_late_arrivals(tmp_path: Path) -> None:
    """Objects of one series arriving in several associations, some after the forward went:
    each send carries only what the destination has not had, and one with nothing new is
    done without sending."""
    url = _sqlite_url(tmp_path)
    upgrade(url)
    catalogue = Catalogue(url)

    def arrive(series_id: int, *uids: str) -> None:
        with catalogue.session() as session:
            for uid in uids:
                session.add(
                    Instance(
                        sop_instance_uid=uid,
                        series_id=series_id,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"{uid}.dcm",
                        size=1,
                        sha256="0" * 64,
                    )
                )

    with catalogue.session() as session:
        series = Series(series_instance_uid="1.2.3.9", study=Study(study_instance_uid="1.2.4.9"))
        session.add(series)
        session.flush()
        series_id = series.id
    arrive(series_id, "9.1", "9.2")
    with catalogue.session() as session:
        [delivery_id] = deliveries.create_forwards(session, series_id, {"registry": "dose"})

    def send() -> tuple[str, ...]:
        held = deliveries.claim(catalogue, delivery_id)
        if held.outcome is not runs.Claimed.CLAIMED:
            return ()
        with catalogue.session() as session:
            deliveries.mark_sent(session, held)
        return held.series_paths

    assert send() == ("9.1.dcm", "9.2.dcm")
    arrive(series_id, "9.3")
    with catalogue.session() as session:
        deliveries.reset_forwards(session, series_id)
    assert send() == ("9.3.dcm",)
    with catalogue.session() as session:
        deliveries.reset_forwards(session, series_id)
    assert send() == ()
    with catalogue.session() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery.state == DeliveryState.SENT and len(delivery.sent_instances) == 3
    catalogue.dispose()


def test_upgrade_gives_existing_results_distinct_parts(tmp_path: Path) -> None:
    """A catalogue at 0004 with two SRs of one run upgrades; new parts are unique."""
    url = _sqlite_url(tmp_path)
    with migrations_dir() as scripts:
        command.upgrade(alembic_config(url, scripts), "0004")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO studies (id, study_instance_uid, created_at) "
                "VALUES (1, '1.1', '2026-01-01 00:00:00')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO series (id, series_instance_uid, study_id, instance_count, state, "
                "first_received_at, last_received_at, priority) "
                "VALUES (1, '1.1.1', 1, 0, 'done', '2026-01-01', '2026-01-01', 0)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO pipeline_runs (id, series_id, run_key, state, created_at) "
                "VALUES (1, 1, 'k', 'succeeded', '2026-01-01')"
            )
        )
        for n in (1, 2):
            conn.execute(
                sa.text(
                    "INSERT INTO results (id, run_id, kind, sop_instance_uid, series_instance_uid, "
                    f"path, created_at) VALUES ({n}, 1, 'sr', '1.9.{n}', '1.8.{n}', 'p{n}', "
                    "'2026-01-01')"
                )
            )
    engine.dispose()
    upgrade(url)
    catalogue = Catalogue(url)
    with catalogue.session() as session:
        parts = session.scalars(sa.select(Result.part).order_by(Result.id)).all()
        assert parts == ["legacy-1", "legacy-2"]
    with pytest.raises(sa.exc.IntegrityError), catalogue.session() as session:
        for n in (3, 4):
            session.add(
                Result(
                    run_id=1,
                    kind="sr",
                    part="0",
                    sop_instance_uid=f"1.9.{n}",
                    series_instance_uid="1.8",
                    path=f"p{n}",
                )
            )
    catalogue.dispose()


# --- two real workers, one task sent twice ----------------------------------------------------


class CountingArchive:
    """A pynetdicom storage SCP that records every C-STORE it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="ARCHIVE")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def archive() -> Iterator[CountingArchive]:
    scp = CountingArchive()
    yield scp
    scp.stop()


def _env(tmp_path: Path, archive: CountingArchive, **extra: str) -> dict[str, str]:
    return {
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_ARCHIVE__AE_TITLE": "ARCHIVE",
        "CURIA_ARCHIVE__PORT": str(archive.port),
        "CURIA_MODEL__DEMO_SIZE": "tiny",
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-claims-{uuid.uuid4().hex[:8]}",
        **extra,
    }


def _queued_run(settings: Settings, tmp_path: Path) -> int:
    """A received 4-slice CT series and its queued run, in the workers' catalogue."""
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    ingestor = Ingestor(Spool(settings.spool_dir, settings.quarantine_dir), catalogue)
    for path in write_series(tmp_path / "series", 4):
        assert ingestor.ingest(path.read_bytes(), "CT1").status == 0x0000
    with catalogue.session() as session:
        series = session.scalars(sa.select(Series)).one()
        run_id = runs.create(session, series, f"{series.series_instance_uid}:claims").id
    catalogue.dispose()
    return run_id


class Workers:
    """Two `curia-node worker` processes consuming every stage queue."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        for name in ("w1", "w2"):
            log = (root / f"{name}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [str(VENV_BIN / "curia-node"), "worker", "--name", name],
                    env={**os.environ, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                    start_new_session=True,
                )
            )
        try:
            for name in ("w1", "w2"):
                wait_for(lambda n=name: " ready." in self.log(n), 120, f"worker {name} not ready")
        except BaseException:
            self.stop()  # a worker that never became ready must not outlive the test
            raise

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> list[str]:
        return [self.log("w1"), self.log("w2")]

    def settle(self, quiet: float = 6.0, timeout: float = 120) -> None:
        """Wait until neither worker has logged anything for ``quiet`` seconds (every
        second execution, retries included, has run its course)."""
        deadline = time.monotonic() + timeout
        last, since = self.logs(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.logs()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
        raise AssertionError("the workers never went quiet")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def _twice_at_once(
    env: dict[str, str], archive: CountingArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(env, monkeypatch)
    run_id = _queued_run(settings, tmp_path)
    workers = Workers(env, tmp_path)
    app = create_app(settings)
    catalogue = Catalogue(settings.effective_database_url)
    try:
        analyse = app.tasks["curia.analyse_series"]
        for _ in range(2):  # as a broker redelivering it would: two copies, two workers
            analyse.apply_async((run_id,))

        def finished() -> bool:
            with catalogue.session() as session:
                return session.get(PipelineRun, run_id).state == RunState.SUCCEEDED

        wait_for(finished, 180, "the run did not finish")
        workers.settle()
        assert all("Task curia.analyse_series[" in log for log in workers.logs()), (
            "each worker executed one copy of the analysis task"
        )
        _assert_once(workers, catalogue, settings, archive, run_id)

        # Every later stage sent twice more at once: nothing is recorded or sent again.
        with catalogue.session() as session:
            delivery_ids = session.scalars(sa.select(Delivery.id)).all()
        for _ in range(2):
            app.tasks["curia.write_report"].apply_async((run_id,))
            for delivery_id in delivery_ids:
                app.tasks["curia.dispatch_result"].apply_async((delivery_id,))
        workers.settle()
        assert sum(log.count("Task curia.write_report[") for log in workers.logs()) >= 3
        _assert_once(workers, catalogue, settings, archive, run_id)
    finally:
        workers.stop()
        catalogue.dispose()


def _assert_once(
    workers: Workers,
    catalogue: Catalogue,
    settings: Settings,
    archive: CountingArchive,
    run_id: int,
) -> None:
    # "run N: 20 slices analysed in ..." (of K stacks, when the series has several)
    analysed = sum(len(re.findall(r"\d+ slices .*analysed in", log)) for log in workers.logs())
    assert analysed == 1, "one analysis"
    with catalogue.session() as session:
        results = session.scalars(sa.select(Result).where(Result.run_id == run_id)).all()
        sent = session.scalars(sa.select(Delivery)).all()
        assert sorted((r.kind, r.part) for r in results) == [
            ("seg", "demo-region-mask"),
            ("sr", "0"),
            ("sr", "1"),
        ], "one SEG and two SRs, recorded once"
        assert {d.state for d in sent} == {DeliveryState.SENT} and len(sent) == 3
        assert all(d.attempts == 1 for d in sent), "each result sent once"
        uids = sorted(r.sop_instance_uid for r in results)
    files = sorted(settings.results_dir.rglob("*.dcm"))
    assert len(files) == 3, "one file per result"
    assert sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files) == uids
    assert sorted(archive.received) == uids, "one C-STORE per result at the destination"


@pytest.mark.e2e
@pytest.mark.production
def test_production_two_workers_one_task_twice(
    archive: CountingArchive,
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _env(
        tmp_path,
        archive,
        CURIA_DATABASE_URL=postgres_url,
        CURIA_PIPELINE__BROKER_URL=RABBITMQ_URL,
        CURIA_PIPELINE__EMBEDDED_WORKER="false",
    )
    try:
        _twice_at_once(env, archive, tmp_path, monkeypatch)
    finally:
        delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])


@pytest.mark.e2e
def test_embedded_two_workers_one_task_twice(
    archive: CountingArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _twice_at_once(_env(tmp_path, archive), archive, tmp_path, monkeypatch)


def test_a_delivery_claim_expires_with_its_lease(tmp_path: Path) -> None:
    url = _sqlite_url(tmp_path)
    upgrade(url)
    catalogue = Catalogue(url)
    _run_id, delivery_id = _run_with_delivery(catalogue, 1)
    held = deliveries.claim(catalogue, delivery_id, lease=timedelta(seconds=30))
    assert held.outcome is deliveries.Claimed.CLAIMED and held.result_path == "x/1.dcm"
    assert deliveries.renew(catalogue, held)
    taken = deliveries.claim(catalogue, delivery_id, lease=timedelta(0))
    assert taken.outcome is deliveries.Claimed.CLAIMED, "a zero lease: taken over at once"
    assert not deliveries.renew(catalogue, held), "the first holder lost it"
    with catalogue.session() as session:
        deliveries.mark_sent(session, taken)
    assert deliveries.claim(catalogue, delivery_id).outcome is deliveries.Claimed.DONE
    catalogue.dispose()
