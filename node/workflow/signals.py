"""Completion signals: a series is complete when its sender says so, not only when it is quiet.

Read by the completion watcher on every pass for series still receiving:

- ``mpps``: an ended (COMPLETED or DISCONTINUED) MPPS step listed the series' instances,
  and every one of them is stored. Until then the series waits, and what it misses is
  written on it (``routing["waiting_for"]``) for the API and dashboard.
- ``association-end``: a sender known to send each series whole on one association
  released it, and no instance of the series came after.
- ``instance-count``: the sender fills Images in Acquisition (0020,1002) reliably and the
  series holds that many instances.
- ``multiframe``: every instance of the series is a multi-frame object whose Dimension
  Index Values cover a complete grid (each index 1..max, every combination once).

The last three are trusted per source (``completion.sources``); MPPS whenever a modality
sends it. The quiet period stays the fallback for everything else. A signal completes a
series once: instances that come later follow the late-instance rule like any others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.catalogue.models import CompletionSignal, Instance, Series, SeriesState
from node.core.settings import SourceSignals
from node.workflow.routing import first_header

log = logging.getLogger(__name__)

MPPS, ASSOCIATION_END = "mpps", "association-end"
INSTANCE_COUNT, MULTIFRAME = "instance-count", "multiframe"
QUIET, FORCED = "quiet", "forced"
MISSING_SHOWN = 20  # missing UIDs written on a waiting series; the count is always exact


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def complete_grid(header: Dataset) -> bool:
    """Whether a multi-frame header's Dimension Index Values fill their whole grid."""
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        per_frame = header.get("PerFrameFunctionalGroupsSequence", [])
        if frames < 2 or len(per_frame) != frames or not header.get("DimensionIndexSequence"):
            return False
        indexes = []
        for group in per_frame:
            values = group.FrameContentSequence[0].DimensionIndexValues
            several = isinstance(values, list | MultiValue)
            indexes.append(tuple(int(v) for v in (values if several else [values])))
    except (AttributeError, IndexError, TypeError, ValueError):
        return False
    width = len(indexes[0])
    if width == 0 or any(len(index) != width for index in indexes):
        return False
    maxima = [max(index[axis] for index in indexes) for axis in range(width)]
    for axis, top in enumerate(maxima):
        if {index[axis] for index in indexes} != set(range(1, top + 1)):
            return False
    return len(set(indexes)) == frames == math.prod(maxima)


@dataclass
class Signals:
    """Which receiving series a signal completes now, and what waiting ones miss."""

    spool_dir: Path
    sources: Mapping[str, SourceSignals] = field(default_factory=dict)
    _counts: dict[int, int | None] = field(default_factory=dict)  # series id -> stated size
    # series id -> instance id -> whether the instance is a complete grid
    _grids: dict[int, dict[int, bool]] = field(default_factory=dict)

    def ready(self, session: Session, series: list[Series]) -> dict[int, str]:
        """Series id -> the signal that completes it, for those of ``series`` (receiving)
        a signal completes now."""
        done: dict[int, str] = {}
        live = {s.id for s in series}
        for key in [k for k in self._counts if k not in live]:
            del self._counts[key]
        for key in [k for k in self._grids if k not in live]:
            del self._grids[key]
        if not series:
            return done
        by_uid = {s.series_instance_uid: s for s in series}
        signals = session.scalars(
            select(CompletionSignal)
            .where(CompletionSignal.series_instance_uid.in_(list(by_uid)))
            .order_by(CompletionSignal.id)
        ).all()
        for signal in signals:
            target = by_uid[signal.series_instance_uid]
            if target.id in done:
                continue
            if signal.signal == MPPS:
                if self._mpps_ready(session, target, signal):
                    done[target.id] = MPPS
            elif _aware(signal.at) >= _aware(target.last_received_at):
                done[target.id] = signal.signal
        for target in series:
            if target.id in done:
                continue
            source = self.sources.get(target.calling_ae_title or "")
            if source is None:
                continue
            if source.instance_count and self._count_reached(session, target):
                done[target.id] = INSTANCE_COUNT
            elif source.multiframe and self._grids_complete(session, target):
                done[target.id] = MULTIFRAME
        return done

    def _mpps_ready(self, session: Session, series: Series, signal: CompletionSignal) -> bool:
        expected = list((signal.expected or {}).get("sop_instance_uids", []))
        stored: set[str] = set()
        for start in range(0, len(expected), 500):
            stored.update(
                session.scalars(
                    select(Instance.sop_instance_uid)
                    .where(Instance.series_id == series.id)
                    .where(Instance.sop_instance_uid.in_(expected[start : start + 500]))
                )
            )
        missing = [uid for uid in expected if uid not in stored]
        routing = dict(series.routing or {})
        if missing:
            waiting = {
                "signal": MPPS,
                "step": signal.source,
                "missing": len(missing),
                "missing_uids": missing[:MISSING_SHOWN],
            }
            if routing.get("waiting_for") != waiting:
                routing["waiting_for"] = waiting
                series.routing = routing
            return False
        if "waiting_for" in routing:
            del routing["waiting_for"]
            series.routing = routing
        return True

    def _count_reached(self, session: Session, series: Series) -> bool:
        if series.id not in self._counts:
            header = first_header(session, self.spool_dir, series)
            value = header.get("ImagesInAcquisition") if header is not None else None
            try:
                self._counts[series.id] = int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                self._counts[series.id] = None
        stated = self._counts[series.id]
        return stated is not None and stated > 0 and series.instance_count >= stated

    def _grids_complete(self, session: Session, series: Series) -> bool:
        rows = session.scalars(select(Instance).where(Instance.series_id == series.id)).all()
        if not rows:
            return False
        known = self._grids.setdefault(series.id, {})
        for row in rows:
            if row.id not in known:
                try:
                    header = dcmread(self.spool_dir / row.path, stop_before_pixels=True)
                    known[row.id] = complete_grid(header)
                except (OSError, ValueError):
                    known[row.id] = False
            if not known[row.id]:
                return False
        return True

    def forget(self, series_ids: list[int]) -> None:
        """Drop cached header facts of series that are no longer receiving."""
        for series_id in series_ids:
            self._counts.pop(series_id, None)
            self._grids.pop(series_id, None)


def consumed(session: Session, series: Series) -> None:
    """A series is complete: its signals have done their work (instances that come later
    follow the late-instance rule, never a signal), so they are dropped."""
    session.execute(
        delete(CompletionSignal).where(
            CompletionSignal.series_instance_uid == series.series_instance_uid
        )
    )


def receiving(session: Session) -> list[Series]:
    """Series still receiving. Not locked: ingest counts their instances meanwhile, and
    only those a signal completes are locked (:func:`lock`)."""
    return list(session.scalars(select(Series).where(Series.state == SeriesState.RECEIVING)))


def lock(session: Session, series_ids: list[int]) -> list[Series]:
    """The series among ``series_ids`` still receiving, locked for completion (skipping
    any another watcher holds)."""
    if not series_ids:
        return []
    return list(
        session.scalars(
            select(Series)
            .where(Series.id.in_(series_ids))
            .where(Series.state == SeriesState.RECEIVING)
            .with_for_update(skip_locked=True)
        )
    )
