"""What the prepare stage takes off the GPU worker: inference time with and without it.

The sample CT (JPEG 2000, as many archives store CT) is analysed the way the inference
stage does it, once decoding the files itself and once reading a series the prepare stage
decoded ahead (on a CPU worker in production). Prints the seconds of each, the prepare
stage's own time, and the ratio of inference-stage time prepared / decoding itself.

    .venv/bin/python -m benchmarks.prepare [--copies 5] [--runs 3] [--size tiny|base]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from pipelines.model.backbone import demo_backbone
from pipelines.model.heads import demo_head
from pipelines.model.inference import analyse_series
from pipelines.model.prepared import prepare_series
from tests.support.testdata import repaired_ct_series


def sample_series(folder: Path, copies: int) -> tuple[list[Path], str]:
    """The 20-slice sample CT, ``copies`` times over, stacked into one series; and its UID."""
    paths: list[Path] = []
    for copy in range(copies):
        for path in repaired_ct_series(folder / f"c{copy}", "bench-prepare"):
            ds = dcmread(path)
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{copy}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1000.0 * copy
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths, str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def parse_args(doc: str) -> argparse.Namespace:
    """The options the sample-CT benchmarks share: series length, runs, model size."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5, help="copies of the 20-slice CT")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", choices=("tiny", "base"), default="tiny")
    return parser.parse_args()


def main() -> None:
    args = parse_args(__doc__)

    backbone = demo_backbone(args.size)
    heads = [demo_head(backbone.spec.hidden_size)]
    root = Path(tempfile.mkdtemp(prefix="curia-bench-prepare-"))
    try:
        paths, uid = sample_series(root / "ct", args.copies)
        print(f"{len(paths)} slices (JPEG 2000), backbone {args.size}, {backbone.device}")
        analyse_series(paths, backbone, heads, series_instance_uid=uid)  # warm up
        itself, prepared_times, prepare_times = [], [], []
        for run in range(args.runs):
            started = time.perf_counter()
            analyse_series(paths, backbone, heads, series_instance_uid=uid)
            itself.append(time.perf_counter() - started)

            started = time.perf_counter()
            prepared = prepare_series(paths, root / "prepared" / str(run))
            prepare_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            analyse_series(prepared, backbone, heads, series_instance_uid=uid)
            prepared_times.append(time.perf_counter() - started)
            del prepared
            shutil.rmtree(root / "prepared" / str(run))
        for name, values in (
            ("inference stage, decoding itself", itself),
            ("inference stage, series prepared", prepared_times),
            ("prepare stage (CPU worker)", prepare_times),
        ):
            print(f"{name:34s} " + "  ".join(f"{v:6.2f} s" for v in values))
        ratio = statistics.median(prepared_times) / statistics.median(itself)
        print(f"ratio inference-stage time prepared / decoding itself (median): {ratio:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
