"""Time from the last instance received to the SR stored in the archive, for the real CT.

Starts a real Orthanc and a real `curia-node run` (embedded mode), has Orthanc push the
TotalSegmentator sample CT (20 slices, JPEG 2000) to the node by C-STORE, and measures until
the node's SR is in Orthanc. Prints the total and the quiet period it includes.

    .venv/bin/python -m benchmarks.end_to_end [--demo-size base|tiny] [--quiet 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from pydicom import dcmread

from tests.support.peers import NodeProcess, Orthanc, free_port, wait_for
from tests.support.testdata import repaired_ct_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-size", default="base", choices=["base", "tiny"])
    parser.add_argument("--quiet", type=float, default=2.0, help="series quiet period, s")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="curia-bench-"))
    series = repaired_ct_series(root / "ct", f"bench-{uuid.uuid4()}")
    study_uid = dcmread(series[0], stop_before_pixels=True).StudyInstanceUID
    orthanc = Orthanc(root / "orthanc", free_port(), free_port())
    (root / "orthanc").mkdir()
    orthanc.start()
    env = {
        "CURIA_DATA_DIR": str(root / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_ARCHIVE__PORT": str(orthanc.dicom_port),
        "CURIA_COMPLETION__SERIES_QUIET_SECONDS": str(args.quiet),
        "CURIA_COMPLETION__POLL_SECONDS": "0.2",
        "CURIA_MODEL__DEMO_SIZE": args.demo_size,
    }
    node = NodeProcess(env, root)
    try:
        node.allow_source("orthanc", orthanc.aet)
        node.start()
        orthanc_study = orthanc.upload(series)
        orthanc.set_modality("node", "CURIA", node.dicom_port)
        started = time.monotonic()
        orthanc.post("/modalities/node/store", json={"Resources": [orthanc_study]})
        pushed = time.monotonic()

        def sr_arrived() -> bool:
            return any(
                s["MainDicomTags"].get("Modality") == "SR"
                for s in orthanc.series_of_study(study_uid)
            )

        wait_for(sr_arrived, 900, "no SR reached Orthanc", interval=0.05)
        done = time.monotonic()
    finally:
        node.stop()
        orthanc.stop()
    print(f"model: demo {args.demo_size}; series: {len(series)} slices (JPEG 2000 lossless)")
    print(f"push (Orthanc -> node, C-STORE): {pushed - started:.2f} s")
    total = done - pushed
    print(
        f"last instance -> SR in Orthanc: {total:.2f} s (includes the {args.quiet:.1f} s "
        f"quiet period; {total - args.quiet:.2f} s of work)"
    )


if __name__ == "__main__":
    main()
