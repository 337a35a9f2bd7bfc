"""Per-source completion signals in the completion watcher, each on and off, and the quiet
period as the fallback; what storage commitment commits (stored, archived, class)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import (
    CompletionSignal,
    Delivery,
    DeliveryState,
    Series,
    SeriesState,
)
from node.core.settings import CompletionSettings, SourceSignals
from node.dimse.commitment import judge
from node.workflow.completion import CompletionWatcher
from node.workflow.signals import Signals, complete_grid
from tests.support.series_rows import CT, ENHANCED_CT, NOW, add_series, header, stack


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def run_watcher(
    catalogue: Catalogue, spool: Path, sources: dict[str, SourceSignals], quiet: float = 10
) -> dict[str, tuple[str, str | None]]:
    """One completion pass at NOW; every series' (state, completed_by)."""
    watcher = CompletionWatcher(
        catalogue,
        lambda _run, _priority: None,
        lambda s: s.series_instance_uid,
        policy=CompletionSettings(series_quiet_seconds=quiet),
        signals=Signals(spool, sources),
    )
    watcher.complete_quiet_series(now=NOW)
    with catalogue.session() as session:
        return {
            s.series_instance_uid: (s.state.value, s.completed_by)
            for s in session.scalars(sa.select(Series))
        }


@pytest.mark.parametrize("on", [True, False])
def test_stated_instance_count(catalogue: Catalogue, tmp_path: Path, on: bool) -> None:
    full = add_series(catalogue, tmp_path, [header(ImagesInAcquisition=3) for _ in range(3)])
    short = add_series(catalogue, tmp_path, [header(ImagesInAcquisition=3) for _ in range(2)])
    unstated = add_series(catalogue, tmp_path, [header() for _ in range(2)])
    states = run_watcher(catalogue, tmp_path, {"CT1": SourceSignals(instance_count=on)})
    assert states[full] == (("complete", "instance-count") if on else ("receiving", None))
    assert states[short] == ("receiving", None)
    assert states[unstated] == ("receiving", None)


@pytest.mark.parametrize("on", [True, False])
def test_complete_multiframe_stack(catalogue: Catalogue, tmp_path: Path, on: bool) -> None:
    whole = add_series(catalogue, tmp_path, [stack(4)])
    gap = add_series(catalogue, tmp_path, [stack(3, [(1, 1), (1, 2), (1, 4)])])
    states = run_watcher(catalogue, tmp_path, {"CT1": SourceSignals(multiframe=on)})
    assert states[whole] == (("complete", "multiframe") if on else ("receiving", None))
    assert states[gap] == ("receiving", None)


def test_signals_trusted_only_for_their_source(catalogue: Catalogue, tmp_path: Path) -> None:
    other = add_series(catalogue, tmp_path, [stack(4)], ae="OTHER")
    states = run_watcher(catalogue, tmp_path, {"CT1": SourceSignals(multiframe=True)})
    assert states[other] == ("receiving", None)


def test_complete_grid_needs_every_combination_once() -> None:
    assert complete_grid(stack(4))
    assert complete_grid(stack(4, [(1, 1), (1, 2), (2, 1), (2, 2)]))
    assert not complete_grid(stack(4, [(1, 1), (1, 2), (2, 1), (1, 1)]))  # a repeat
    assert not complete_grid(stack(3, [(1, 1), (1, 2), (2, 1)]))  # (2, 2) missing
    assert not complete_grid(header())  # single frame


def test_association_end_counts_unless_an_instance_came_later(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    signalled = add_series(catalogue, tmp_path, [header()], ago=2)
    later = add_series(catalogue, tmp_path, [header()], ago=1)
    with catalogue.session() as session:
        for uid, at in (
            (signalled, NOW - timedelta(seconds=1)),
            (later, NOW - timedelta(seconds=2)),
        ):
            session.add(CompletionSignal(series_instance_uid=uid, signal="association-end", at=at))
    states = run_watcher(catalogue, tmp_path, {})
    assert states[signalled] == ("complete", "association-end")
    assert states[later] == ("receiving", None), "an instance after the signal: wait"
    with catalogue.session() as session:
        left = session.scalars(sa.select(CompletionSignal.series_instance_uid)).all()
    assert left == [later], "a completed series' signals are dropped"


def test_quiet_period_is_the_fallback(catalogue: Catalogue, tmp_path: Path) -> None:
    quiet = add_series(catalogue, tmp_path, [header()], ago=11)
    recent = add_series(catalogue, tmp_path, [header()], ago=9)
    states = run_watcher(catalogue, tmp_path, {"CT1": SourceSignals(instance_count=True)})
    assert states[quiet] == ("complete", "quiet")
    assert states[recent] == ("receiving", None)


def test_commitment_covers_only_what_is_stored_and_archived(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    files = [header() for _ in range(3)]
    uid = add_series(catalogue, tmp_path, files)
    (tmp_path / f"{files[2].SOPInstanceUID}.dcm").unlink()  # lost from the spool
    unknown = generate_uid()
    items = [[CT, files[0].SOPInstanceUID], [ENHANCED_CT, files[1].SOPInstanceUID]]
    items += [[CT, files[2].SOPInstanceUID], [CT, unknown]]

    verdict = judge(catalogue, tmp_path, items, after_archived=False)
    assert verdict.committed == [items[0]]
    reasons = {uid: (code, why) for _, uid, code, why in verdict.failed}
    assert reasons == {
        files[1].SOPInstanceUID: (0x0119, "stored with another class"),
        files[2].SOPInstanceUID: (0x0110, "file missing from the spool"),
        unknown: (0x0112, "not received"),
    }

    archived = judge(catalogue, tmp_path, items[:1], after_archived=True)
    assert archived.committed == [] and archived.waiting == 1
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        session.add(Delivery(series_id=series.id, destination="pacs", state=DeliveryState.SENT))
    assert judge(catalogue, tmp_path, items[:1], after_archived=True).committed == [items[0]]


def test_a_late_instance_after_an_early_completion_follows_the_late_instance_rule(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    uid = add_series(catalogue, tmp_path, [header()], ago=2)
    with catalogue.session() as session:
        session.add(
            CompletionSignal(
                series_instance_uid=uid, signal="association-end", at=NOW - timedelta(seconds=1)
            )
        )
    watcher = CompletionWatcher(
        catalogue,
        lambda _run, _priority: None,
        lambda s: s.series_instance_uid,
        policy=CompletionSettings(series_quiet_seconds=10),
        signals=Signals(tmp_path, {}),
    )
    assert len(watcher.complete_quiet_series(now=NOW)) == 1, "completed early, one run"
    late = NOW + timedelta(seconds=5)
    with catalogue.session() as session:  # its run ends; then one more instance arrives
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        series.state = SeriesState.DONE
        series.last_received_at = late
        series.instance_count += 1
    assert watcher.complete_quiet_series(now=late + timedelta(seconds=1)) == [], (
        "the old signal does not complete it again: the late instance waits for quiet"
    )
    rerun = watcher.complete_quiet_series(now=late + timedelta(seconds=11))
    assert len(rerun) == 1, "quiet again: one re-run (late_instances = rerun)"
    with catalogue.session() as session:
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == uid))
        assert series.completed_by == "association-end"
        assert [note["then"] for note in series.routing["late"]] == ["rerun"]
