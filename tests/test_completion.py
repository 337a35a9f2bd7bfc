"""Study completion: study quiet period, required series, force timeout, late instances."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from pydicom.dataset import Dataset

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance, PipelineRun, RunState, Series, SeriesState, Study
from node.core.settings import CompletionSettings
from node.workflow.completion import CompletionWatcher
from node.workflow.routing import Router, orientation

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def add_series(
    catalogue: Catalogue, study: str, uid: str, ago: float, slices: int = 100, modality="CT"
) -> None:
    with catalogue.session() as session:
        row = session.scalar(sa.select(Study).where(Study.study_instance_uid == study))
        row = row or Study(study_instance_uid=study)
        when = NOW - timedelta(seconds=ago)
        session.add(
            Series(
                series_instance_uid=uid,
                study=row,
                modality=modality,
                instance_count=slices,
                first_received_at=when - timedelta(seconds=5),
                last_received_at=when,
            )
        )


def watcher(
    catalogue: Catalogue, tmp_path: Path, **policy: object
) -> tuple[CompletionWatcher, list]:
    sent: list[int] = []
    w = CompletionWatcher(
        catalogue,
        lambda run_id, _priority: sent.append(run_id),
        lambda s: s.series_instance_uid,
        router=Router(catalogue, tmp_path),
        policy=CompletionSettings(series_quiet_seconds=10, **policy),
    )
    return w, sent


def states(catalogue: Catalogue) -> dict[str, str]:
    with catalogue.session() as session:
        return {s.series_instance_uid: s.state.value for s in session.scalars(sa.select(Series))}


def test_study_quiet_period_waits_for_the_whole_study(catalogue: Catalogue, tmp_path: Path) -> None:
    add_series(catalogue, "1.1", "1.1.1", ago=60)
    add_series(catalogue, "1.1", "1.1.2", ago=5)  # a sibling still arriving
    w, _sent = watcher(catalogue, tmp_path, study_quiet_seconds=30)
    assert w.complete_quiet_series(NOW) == []
    assert states(catalogue)["1.1.1"] == "receiving"
    assert len(w.complete_quiet_series(NOW + timedelta(seconds=31))) == 2
    assert set(states(catalogue).values()) == {"complete"}


def test_required_series_holds_the_study_until_it_arrives(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    add_series(catalogue, "2.1", "2.1.1", ago=60, slices=10)
    w, _ = watcher(catalogue, tmp_path, required_series=[{"modality": "CT", "min_slices": 50}])
    assert w.complete_quiet_series(NOW) == [], "a 10-slice CT does not meet '>= 50 slices'"
    add_series(catalogue, "2.1", "2.1.2", ago=20, slices=300)
    assert len(w.complete_quiet_series(NOW)) == 2


@pytest.mark.parametrize(
    ("action", "state", "runs"), [("process", "complete", 1), ("discard", "done", 0)]
)
def test_force_timeout_applies_its_action(
    catalogue: Catalogue, tmp_path: Path, action: str, state: str, runs: int
) -> None:
    add_series(catalogue, "3.1", "3.1.1", ago=60, slices=10)
    w, _ = watcher(
        catalogue,
        tmp_path,
        required_series=[{"modality": "CT", "min_slices": 50}],
        force_seconds=300,
        force_action=action,
    )
    assert w.complete_quiet_series(NOW) == []
    assert len(w.complete_quiet_series(NOW + timedelta(seconds=300))) == runs
    assert states(catalogue) == {"3.1.1": state}
    with catalogue.session() as session:
        series = session.scalars(sa.select(Series)).one()
        assert "required series missing after 300.0 s" in series.routing["completion"]


def _finish_first_run(catalogue: Catalogue, w: CompletionWatcher) -> int:
    [run_id] = w.complete_quiet_series(NOW)
    with catalogue.session() as session:
        run = session.get(PipelineRun, run_id)
        run.state = RunState.SUCCEEDED
        run.series.state = SeriesState.DONE
        # Two more instances arrive after completion.
        run.series.instance_count += 2
        run.series.last_received_at = NOW + timedelta(seconds=30)
    return run_id


def test_late_instances_trigger_one_rerun_that_supersedes(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    add_series(catalogue, "4.1", "4.1.1", ago=60)
    w, sent = watcher(catalogue, tmp_path, late_instances="rerun")
    first = _finish_first_run(catalogue, w)
    assert w.complete_quiet_series(NOW + timedelta(seconds=35)) == [], "not quiet yet"
    [rerun] = w.complete_quiet_series(NOW + timedelta(seconds=41))
    assert w.complete_quiet_series(NOW + timedelta(seconds=60)) == [], "taken once"
    assert sent == [first, rerun]
    with catalogue.session() as session:
        run = session.get(PipelineRun, rerun)
        assert run.rerun_of == first and run.run_key == "4.1.1#late1"
        assert run.requested_by == "late-instances"
        assert run.series.state == SeriesState.COMPLETE
        assert run.series.routing["late"][0]["then"] == "rerun"


def test_late_instances_appended_are_stored_only(catalogue: Catalogue, tmp_path: Path) -> None:
    add_series(catalogue, "5.1", "5.1.1", ago=60)
    w, _sent = watcher(catalogue, tmp_path, late_instances="append")
    _finish_first_run(catalogue, w)
    assert w.complete_quiet_series(NOW + timedelta(seconds=41)) == []
    assert states(catalogue) == {"5.1.1": "done"}
    with catalogue.session() as session:
        series = session.scalars(sa.select(Series)).one()
        assert series.routing["late"][0] == {
            "at": (NOW + timedelta(seconds=41)).isoformat(),
            "instances": 102,
            "then": "append",
        }


def test_required_series_are_validated_at_load() -> None:
    with pytest.raises(ValidationError, match="not a DICOM keyword"):
        CompletionSettings(required_series=[{"tags": {"Nope": "x"}}])
    with pytest.raises(ValidationError, match="no 'finding'"):
        CompletionSettings(required_series=[{"finding": {"head": "x"}}])


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], "axial"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "oblique"),
    ],
)
def test_orientation_from_image_orientation_patient(iop: list[float], expected: str) -> None:
    ds = Dataset()
    ds.ImageOrientationPatient = iop
    assert orientation(ds) == expected
    assert orientation(Dataset()) is None


# --- series of objects no head reads ----------------------------------------------------------

CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def add_objects(
    catalogue: Catalogue, series_uid: str, sop_class: str, count: int, at: datetime
) -> None:
    """Catalogue ``count`` objects of ``sop_class`` in the series, received at ``at``."""
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == series_uid))
        for n in range(count):
            uid = f"{series_uid}.{sop_class.rsplit('.', 1)[-1]}.{at.timestamp():.0f}.{n}"
            session.add(
                Instance(
                    sop_instance_uid=uid,
                    series=series,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"{uid}.dcm",
                    size=1,
                    sha256="0" * 64,
                    received_at=at,
                )
            )
        series.last_received_at = max(_aware(series.last_received_at), at)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_series_no_head_reads_are_not_analysed_at_completion_without_a_run(
    catalogue: Catalogue, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_series(catalogue, "6.1", "6.1.1", ago=60, slices=3)
    add_objects(catalogue, "6.1.1", CT, 3, NOW - timedelta(seconds=60))
    add_series(catalogue, "6.1", "6.1.2", ago=60, slices=1, modality="SR")
    add_objects(catalogue, "6.1.2", DOSE_SR, 1, NOW - timedelta(seconds=60))
    add_series(catalogue, "6.1", "6.1.3", ago=60, slices=1, modality="KO")
    add_objects(catalogue, "6.1.3", KOS, 1, NOW - timedelta(seconds=60))
    w, sent = watcher(catalogue, tmp_path)
    with caplog.at_level("INFO", logger="node.workflow.completion"):
        [run_id] = w.complete_quiet_series(NOW)
    assert sent == [run_id]
    with catalogue.session() as session:
        rows = {s.series_instance_uid: s for s in session.scalars(sa.select(Series))}
        assert rows["6.1.1"].state == SeriesState.COMPLETE and len(rows["6.1.1"].runs) == 1
        for uid, name in (("6.1.2", "X-Ray Radiation Dose SR"), ("6.1.3", "Key Object Selection")):
            assert rows[uid].state == SeriesState.NOT_ANALYSED and rows[uid].runs == []
            assert (
                name in rows[uid].state_reason and "not a CT or MR image" in rows[uid].state_reason
            )
    not_analysed = [r for r in caplog.records if "not analysed" in r.getMessage()]
    assert [r.levelname for r in not_analysed] == ["INFO", "INFO"], "one INFO line per series"


def test_a_dose_report_arriving_last_starts_no_analysis(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    """The CT series is analysed; the scanner's dose report comes after, in the CT's own
    series and in a series of its own: nothing is re-run, nothing new is analysed."""
    add_series(catalogue, "7.1", "7.1.1", ago=60, slices=3)
    add_objects(catalogue, "7.1.1", CT, 3, NOW - timedelta(seconds=60))
    w, sent = watcher(catalogue, tmp_path, late_instances="rerun")
    [first] = w.complete_quiet_series(NOW)
    with catalogue.session() as session:
        run = session.get(PipelineRun, first)
        run.state, run.series.state = RunState.SUCCEEDED, SeriesState.DONE
    add_objects(catalogue, "7.1.1", DOSE_SR, 1, NOW + timedelta(seconds=30))
    add_series(catalogue, "7.1", "7.1.2", ago=-30, slices=1, modality="SR")
    add_objects(catalogue, "7.1.2", DOSE_SR, 1, NOW + timedelta(seconds=30))
    assert w.complete_quiet_series(NOW + timedelta(seconds=45)) == []
    assert sent == [first]
    assert states(catalogue) == {"7.1.1": "done", "7.1.2": "not_analysed"}
    # CT images arriving late still re-run the analysis.
    add_objects(catalogue, "7.1.1", CT, 1, NOW + timedelta(seconds=60))
    [rerun] = w.complete_quiet_series(NOW + timedelta(seconds=75))
    assert sent == [first, rerun]


def test_required_series_can_name_a_dose_report(catalogue: Catalogue, tmp_path: Path) -> None:
    add_series(catalogue, "8.1", "8.1.1", ago=60, slices=3)
    add_objects(catalogue, "8.1.1", CT, 3, NOW - timedelta(seconds=60))
    w, _ = watcher(catalogue, tmp_path, required_series=[{"sop_class": "*DoseSR*"}])
    assert w.complete_quiet_series(NOW) == [], "held until the dose report is there"
    add_series(catalogue, "8.1", "8.1.2", ago=20, slices=1, modality="SR")
    add_objects(catalogue, "8.1.2", DOSE_SR, 1, NOW - timedelta(seconds=20))
    assert len(w.complete_quiet_series(NOW)) == 1
    assert states(catalogue) == {"8.1.1": "complete", "8.1.2": "not_analysed"}
