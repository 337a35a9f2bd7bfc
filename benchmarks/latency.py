"""Last instance -> SR in the archive, for each way the node learns that a series is complete.

Starts a real Orthanc (the archive) and a real `curia-node run` (embedded mode), then sends
the same CT (the TotalSegmentator sample, 20 slices, new UIDs each time) from a pynetdicom
modality four times, once per completion signal:

- ``quiet``: no signal; the node waits out ``completion.series_quiet_seconds``.
- ``mpps``: N-CREATE, the C-STOREs, then N-SET COMPLETED listing every instance.
- ``association-end``: a sender with ``association_end`` on; the series completes at release.
- ``multiframe``: one Legacy Converted Enhanced CT (highdicom) from a sender with
  ``multiframe`` on: the series is complete when the object's dimension grid is, and its
  frames are analysed as one stack.

For each it prints the time from the last instance's C-STORE response to the series being
complete, the analysis (the run's start to its end, read from the catalogue), and to the SR
stored in Orthanc. Goal: with a signal, last instance -> SR <= analysis + 2 s.

    .venv/bin/python -m benchmarks.latency [--demo-size tiny|base] [--quiet 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.catalogue.models import PipelineRun, Series
from tests.support.modality import (
    MPPS,
    association,
    series_view,
    step_ended,
    step_in_progress,
    store,
)
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for
from tests.support.testdata import repaired_ct_series

SENDERS = {
    "quiet": ("QUIET", {}),
    "mpps": ("MODALITY", {}),
    "association-end": ("SENDER", {"association_end": True}),
    "multiframe": ("MFRAME", {"multiframe": True}),
}


@dataclass
class Timing:
    signal: str
    completed_by: str | None
    to_complete: float
    analysis: float | None
    to_sr: float | None


def multiframe(files: list[Path], folder: Path) -> list[Path]:
    """The series as one Legacy Converted Enhanced CT object, in a new series."""
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ds.decompress()
    image = LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = folder / "multiframe.dcm"
    image.save_as(path)
    return [path]


def send(node: NodeProcess, signal: str, files: list[Path]) -> float:
    """Send ``files`` as that signal's sender; return when the last C-STORE was answered."""
    ae_title = SENDERS[signal][0]
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with association(node, files, ae_title=ae_title) as assoc:
        if signal == "mpps":
            step = generate_uid()
            assoc.send_n_create(step_in_progress(study_uid), MPPS, step)
            store(assoc, files)
            last = time.monotonic()
            assoc.send_n_set(step_ended("COMPLETED", files), MPPS, step)
        else:
            store(assoc, files)
            last = time.monotonic()
    return last


def measure(node: NodeProcess, orthanc: Orthanc, signal: str, files: list[Path]) -> Timing:
    header = dcmread(files[0], stop_before_pixels=True)
    last = send(node, signal, files)
    view = wait_for(
        lambda: (s := series_view(node, header.SeriesInstanceUID)) and s["completed_by"] and s,
        120,
        f"{signal}: the series never completed",
        interval=0.05,
    )
    to_complete = time.monotonic() - last

    def sr_arrived() -> bool:
        return any(
            s["MainDicomTags"].get("Modality") == "SR"
            for s in orthanc.series_of_study(header.StudyInstanceUID)
        )

    wait_for(sr_arrived, 900, f"{signal}: no SR reached Orthanc", interval=0.05)
    to_sr = time.monotonic() - last
    analysis = analysis_of(node, header)
    return Timing(signal, view["completed_by"], to_complete, analysis, to_sr)


def analysis_of(node: NodeProcess, header: object) -> float | None:
    """The run's start to its end (prepare, analyse, report), from the node's catalogue."""
    engine = sa.create_engine(f"sqlite:///{Path(node.env['CURIA_DATA_DIR']) / 'catalogue.sqlite'}")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                row = connection.execute(
                    sa.select(PipelineRun.started_at, PipelineRun.finished_at, PipelineRun.state)
                    .join(Series, Series.id == PipelineRun.series_id)
                    .where(Series.series_instance_uid == header.SeriesInstanceUID)  # type: ignore[attr-defined]
                ).first()
            if row is not None and row.state == "failed":
                return None
            if row is not None and row.finished_at is not None and row.started_at is not None:
                return (row.finished_at - row.started_at).total_seconds()
            time.sleep(0.2)
    finally:
        engine.dispose()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-size", default="tiny", choices=["base", "tiny"])
    parser.add_argument("--quiet", type=float, default=10.0, help="series quiet period, s")
    parser.add_argument("--runs", type=int, default=1, help="rounds of the four signals")
    parser.add_argument("--poll", type=float, default=1.0, help="completion poll period, s")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="curia-latency-"))
    (root / "orthanc").mkdir()
    orthanc = Orthanc(root / "orthanc", free_port(), free_port())
    orthanc.start()
    sources = {ae: flags for ae, flags in SENDERS.values() if flags}
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_ARCHIVE__AE_TITLE": orthanc.aet,
        "CURIA_ARCHIVE__PORT": str(orthanc.dicom_port),
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": str(args.quiet),
        "CURIA_COMPLETION__POLL_SECONDS": str(args.poll),
        "CURIA_COMPLETION__SOURCES": json.dumps(sources),
        "CURIA_MODEL__DEMO_SIZE": args.demo_size,
        "CURIA_PIPELINE__QUEUE_PREFIX": f"curia-latency-{uuid.uuid4().hex[:8]}",
    }
    node = NodeProcess(env, root)
    timings: list[Timing] = []
    try:
        for name, (ae_title, _flags) in SENDERS.items():
            node.allow_source(name, ae_title)
        node.start()
        for round_ in range(args.runs):
            for signal in SENDERS:
                files = repaired_ct_series(root / f"{signal}-{round_}", f"latency-{uuid.uuid4()}")
                if signal == "multiframe":
                    files = multiframe(files, root / f"{signal}-{round_}")
                timings.append(measure(node, orthanc, signal, files))
    finally:
        node.stop()
        orthanc.stop()

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"model: demo {args.demo_size}; quiet period {args.quiet:.1f} s; poll {args.poll} s")
    print("| signal | completed by | last instance -> complete (s) | analysis (s) |", end="")
    print(" last instance -> SR in Orthanc (s) | SR - analysis (s) |")
    print("|---|---|---|---|---|---|")
    for t in timings:
        overhead = t.to_sr - t.analysis if t.to_sr is not None and t.analysis else None
        print(
            f"| {t.signal} | {t.completed_by} | {t.to_complete:.2f} | {shown(t.analysis)} | "
            f"{shown(t.to_sr)} | {shown(overhead)} |"
        )


if __name__ == "__main__":
    main()
