"""Time building the node's results for a full-size CT: the SR and the Segmentation.

Writes a synthetic 300-slice 512 x 512 CT series (uncompressed, one study) to a temporary
folder, reads its headers back without pixels (as the report step does), then times
``build_sr`` over all sources and ``build_seg`` for a 300 x 512 x 512 mask with a blob in
some slices, on the CPU. Each build is repeated; the first call in a process also pays
for highdicom loading its tables of the standard once, so it is reported apart.

    .venv/bin/python -m benchmarks.results [--slices 300] [--repeat 5] [--validate]

``--validate`` writes both objects and runs dciodvfy (and dsrdump on the SR) on them,
printing their Error / Warning lines.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.core.settings import packaged_templates_dir
from pipelines.findings import (
    CodeRef,
    HeadClass,
    HeadFinding,
    ModelIdentity,
    SeriesFindings,
    SeriesMask,
)
from pipelines.model.masks import MaskHead, demo_mask_head, make_series_mask
from pipelines.model.preprocess import plan_series
from pipelines.reporting.document import build_sr
from pipelines.reporting.files import write_dataset
from pipelines.reporting.provenance import DeviceIdentity
from pipelines.reporting.seg import build_seg
from pipelines.reporting.templates import load_templates

SR_GOAL_S = 1.0
SEG_GOAL_S = 5.0
SIZE = 512
TEMPLATES = packaged_templates_dir()
REGIONS = ("Head", "Neck", "Chest", "Abdomen", "Pelvis")


def write_series(folder: Path, slices: int) -> list[Path]:
    """A 512 x 512 CT (air, a water-like body, a bone-like spine) of ``slices`` slices."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    body = ((x - 256) / 200.0) ** 2 + ((y - 256) / 150.0) ** 2 <= 1.0
    spine = (x - 256) ** 2 + (y - 340) ** 2 <= 25**2
    pixels = np.full((SIZE, SIZE), -1000, dtype=np.int16)
    pixels[body] = 40
    pixels[spine] = 700
    paths = []
    for k in range(slices):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -300.0 + 1.25 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.SliceThickness = 1.25
        ds.Rows = ds.Columns = SIZE
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def blob_mask(paths: list[Path], model: ModelIdentity, head: MaskHead) -> SeriesMask:
    """An ellipsoid over a third of the slices, in the series' sorted order."""
    plan = plan_series(paths)
    n = len(plan)
    z, y, x = np.ogrid[0:n, 0:SIZE, 0:SIZE]
    centre, half = n / 2, max(1.0, n / 6)
    mask = ((z - centre) / half) ** 2 + ((y - 230) / 60.0) ** 2 + ((x - 300) / 80.0) ** 2 <= 1.0
    return make_series_mask(
        mask,
        sop_instance_uids=plan.sop_instance_uids,
        series_instance_uid=plan.series_instance_uid,
        model=model,
        mask_head=head,
        highest_probability=0.9,
    )


def classification(slices: int) -> HeadFinding:
    classes = tuple(
        HeadClass(
            name=r.lower(),
            code=CodeRef(getattr(codes.SCT, r).value, "SCT", getattr(codes.SCT, r).meaning),
        )
        for r in REGIONS
    )
    return HeadFinding(
        head_name="body-region",
        head_version="0.1.0-demo",
        task="classification",
        classes=classes,
        probabilities=(0.05, 0.05, 0.7, 0.15, 0.05),
        predicted_index=2,
        key_slice=slices // 2,
        demo=True,
    )


def timed(build: Callable[[], Any], repeat: int) -> tuple[Any, float, list[float]]:
    """(result, first call, later calls) in seconds."""
    started = time.perf_counter()
    result = build()
    first = time.perf_counter() - started
    later = []
    for _ in range(repeat):
        started = time.perf_counter()
        build()
        later.append(time.perf_counter() - started)
    return result, first, later


def verdict(name: str, first: float, later: list[float], goal: float) -> str:
    typical = statistics.median(later) if later else first
    status = "PASS" if max(first, typical) < goal else "FAIL"
    return (
        f"{name}: {typical:.2f} s (median of {len(later)}; first call {first:.2f} s) "
        f"(goal < {goal:g} s) {status}"
    )


def validate(path: Path, sr: bool) -> None:
    tools = [["dciodvfy", "-new"]] + ([["dsrdump"]] if sr else [])
    for tool in tools:
        if shutil.which(tool[0]) is None:
            print(f"  {tool[0]}: not installed")
            continue
        proc = subprocess.run([*tool, str(path)], capture_output=True, text=True, check=False)
        lines = (proc.stdout + proc.stderr).splitlines()
        flagged = [ln for ln in lines if ln.startswith(("Error", "Warning", "E:", "F:", "W:"))]
        print(f"  {tool[0]} {path.name}: {len(flagged)} flagged line(s)")
        for line in flagged:
            print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after the first")
    parser.add_argument("--validate", action="store_true", help="run dciodvfy/dsrdump")
    args = parser.parse_args()

    device = DeviceIdentity(
        model_name="Curia Node",
        software_version="benchmark",
        device_uid=generate_uid(),
        device_name="CURIA",
    )
    model = ModelIdentity(name="Curia-B (demo weights)", version="demo-seed-0", demo=True)
    templates = load_templates(TEMPLATES)
    with tempfile.TemporaryDirectory(prefix="curia-results-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = write_series(root / "ct", args.slices)
        print(
            f"series: {len(paths)} slices {SIZE}x{SIZE}, uncompressed, written in "
            f"{time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        print(f"headers read (stop_before_pixels): {time.perf_counter() - started:.2f} s")
        head = demo_mask_head(768, backbone=model.name)
        mask = blob_mask(paths, model, head)
        slices_with_blob = int(np.count_nonzero(mask.mask.any(axis=(1, 2))))
        print(f"mask: {mask.mask.shape}, blob in {slices_with_blob} slices")

        seg, seg_first, seg_later = timed(
            lambda: build_seg(sources, mask, head, device), args.repeat
        )
        findings = SeriesFindings(
            series_instance_uid=mask.series_instance_uid,
            model=model,
            findings=[classification(len(sources))],
            slice_count=len(sources),
            sop_instance_uids_sorted=list(mask.sop_instance_uids),
        )
        _, sr_first, sr_later = timed(
            lambda: build_sr(sources, findings, templates, device), args.repeat
        )
        # Mask heads get their own SR (see report.split_findings), referencing the SEG.
        masks_only = replace(findings, findings=[mask.finding])
        sr_seg, sr_seg_first, sr_seg_later = timed(
            lambda: build_sr(sources, masks_only, templates, device, segmentations=[seg]),
            args.repeat,
        )

        print(verdict(f"SR ({len(sources)} sources)", sr_first, sr_later, SR_GOAL_S))
        print(verdict("SR of the mask head (SEG reference)", sr_seg_first, sr_seg_later, SR_GOAL_S))
        print(verdict(f"SEG ({seg.NumberOfFrames} frames kept)", seg_first, seg_later, SEG_GOAL_S))
        if args.validate:
            out = root / "out"
            out.mkdir()
            validate(write_dataset(sr_seg, out / "sr.dcm"), sr=True)
            validate(write_dataset(seg, out / "seg.dcm"), sr=False)


if __name__ == "__main__":
    main()
