"""A busy night: many senders at once into a real node, results back to a real archive.

Starts a real Orthanc (the archive) and a real ``curia-node run`` (embedded mode, demo
model), then N sender processes associate at the same time and each C-STOREs its own
S-slice study (synthetic 512x512 CT, uncompressed) with pynetdicom, timing every C-STORE.
Prints the aggregate instances/s, the C-STORE latency p50/p95/max, failures, the node's peak
RSS, and, per study, the time from its last instance to its SR stored in the archive.

    .venv/bin/python -m benchmarks.load [--senders 20] [--slices 300] [--demo-size tiny]
        [--ingest-only] [--runs 1]

``--ingest-only`` stops once every instance is answered (no wait for the SRs); each run prints
how many associations the node recorded as aborted, with their reasons, and how many answers
pynetdicom's reactor took from under ``send_c_store`` and the sender handed back
(:mod:`node.delivery.responses`; without that, each is a C-STORE left waiting and an
association the node aborts after ``network_timeout``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from pydicom import dcmread
from pynetdicom import AE

from benchmarks.ingest import write_series
from benchmarks.memory import peak_rss_mib
from node.delivery.responses import keep_responses
from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def send_study(args: tuple[int, int, list[str]]) -> tuple[list[float], int, float, int]:
    """One sender: one association, every file; (latencies s, failures, end time, answers
    handed back)."""
    index, port, paths = args
    ae = AE(ae_title=f"LOAD{index:02d}")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="CURIA")
    if not assoc.is_established:
        return [], len(paths), time.time(), 0
    keeper = keep_responses(assoc)
    latencies, failures = [], 0
    last_answer = time.time()
    try:
        for done, path in enumerate(paths):
            started = time.perf_counter()
            try:
                status = assoc.send_c_store(Path(path))  # sent from the file, not re-encoded
            except RuntimeError:  # aborted: the node's log and catalogue say why
                print(f"LOAD{index:02d}: association lost after {done} instances", flush=True)
                failures += len(paths) - done
                break
            latencies.append(time.perf_counter() - started)
            if getattr(status, "Status", None) != 0x0000:
                failures += 1
            last_answer = time.time()  # the study's last instance is stored
    finally:
        if assoc.is_established:
            assoc.release()
    return latencies, failures, last_answer, keeper.handed_back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--demo-size", default="tiny", choices=["base", "tiny"])
    parser.add_argument("--quiet", type=float, default=2.0, help="series quiet period, s")
    parser.add_argument("--ingest-only", action="store_true", help="do not wait for the SRs")
    parser.add_argument("--runs", type=int, default=1, help="runs, one after another")
    args = parser.parse_args()
    aborted_runs = 0
    for run in range(1, args.runs + 1):
        print(f"--- run {run} of {args.runs}")
        aborted_runs += run_once(args) > 0
    print(f"runs with an aborted association: {aborted_runs} of {args.runs}")


def aborted_associations(root: Path) -> list[tuple[str, str]]:
    """(calling AE title, reason) of every association the node recorded as aborted."""
    engine = sa.create_engine(f"sqlite:///{root / 'data' / 'catalogue.sqlite'}")
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT calling_ae_title, reason FROM associations WHERE outcome = 'aborted'")
        ).all()
    engine.dispose()
    return [(str(row[0]), str(row[1])) for row in rows]


def run_once(args: argparse.Namespace) -> int:
    """One run; the number of aborted associations."""
    root = Path(tempfile.mkdtemp(prefix="curia-load-"))
    studies = [write_series(root / f"study-{i:02d}", args.slices) for i in range(args.senders)]
    study_uids = [dcmread(s[0], stop_before_pixels=True).StudyInstanceUID for s in studies]
    (root / "orthanc").mkdir()
    orthanc = Orthanc(root / "orthanc", free_port(), free_port())
    orthanc.start()
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_DICOM__MAX_ASSOCIATIONS": str(args.senders + 4),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_ARCHIVE__PORT": str(orthanc.dicom_port),
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": str(args.quiet),
        "CURIA_COMPLETION__POLL_SECONDS": "0.2",
        "CURIA_MODEL__DEMO_SIZE": args.demo_size,
    }
    node = NodeProcess(env, root)
    try:
        for i in range(args.senders):
            node.allow_source(f"load-{i}", f"LOAD{i:02d}")
        node.start()
        assert node.node is not None
        jobs = [(i, node.dicom_port, [str(p) for p in s]) for i, s in enumerate(studies)]
        started = time.time()
        with multiprocessing.get_context("spawn").Pool(args.senders) as pool:
            outcomes = pool.map(send_study, jobs)
        ended = max(end for _, _, end, _ in outcomes)
        ingest_rss = peak_rss_mib(node.node.pid)

        arrived: dict[str, float] = {}

        def all_reports() -> bool:
            for uid in study_uids:
                if uid not in arrived and any(
                    s["MainDicomTags"].get("Modality") == "SR" for s in orthanc.series_of_study(uid)
                ):
                    arrived[uid] = time.time()
            return len(arrived) == len(study_uids)

        if not args.ingest_only:
            wait_for(all_reports, 3600, "not every study got its SR", interval=0.5)
        total_rss = peak_rss_mib(node.node.pid)
    finally:
        node.stop()
        orthanc.stop()
        aborted = aborted_associations(root)
        for line in node.log().splitlines():  # why the node ended any association early
            if " aborted: " in line or "ended:" in line or "closed a" in line:
                print(f"node log: {line}")
        shutil.rmtree(root, ignore_errors=True)  # 2 x 150 MB per sender

    latencies = sorted(x for lat, _, _, _ in outcomes for x in lat)
    failures = sum(f for _, f, _, _ in outcomes)
    handed_back = sum(h for _, _, _, h in outcomes)
    count = args.senders * args.slices
    p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000
    print(f"{args.senders} concurrent associations x {args.slices} slices (512x512, explicit LE)")
    print(f"aggregate: {count / (ended - started):.1f} instances/s over {ended - started:.1f} s")
    print(
        f"C-STORE latency: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p95 {p95:.1f} ms, max {latencies[-1] * 1000:.1f} ms; failures: {failures}"
    )
    print(f"node peak RSS: {ingest_rss:.0f} MiB after ingest, {total_rss:.0f} MiB overall")
    print(f"aborted associations: {len(aborted)}")
    print(f"answers taken by the sender library's reactor and handed back: {handed_back}")
    for calling, reason in aborted:
        print(f"  {calling}: {reason}")
    if args.ingest_only:
        return len(aborted)
    ends = {uid: end for uid, (_, _, end, _) in zip(study_uids, outcomes, strict=True)}
    delays = sorted(arrived[uid] - ends[uid] for uid in study_uids)
    print(
        f"last instance -> SR in archive (demo {args.demo_size}, {args.quiet:.0f} s quiet "
        f"included): min {delays[0]:.1f} s, median {statistics.median(delays):.1f} s, "
        f"max {delays[-1]:.1f} s"
    )
    for uid in study_uids:
        print(f"  study ...{uid[-12:]}: {arrived[uid] - ends[uid]:.1f} s")
    return len(aborted)


if __name__ == "__main__":
    main()
