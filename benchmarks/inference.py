"""Backbone alone vs. the node's whole path from DICOM files, in slices/s, and peak memory.

In one process: (a) the raw timm forward of the backbone on random input, (b) decoding
only (pydicom on the preprocessing thread pool), and (c) ``analyse_series`` on a synthetic
CT series written to a temporary folder (decode -> preprocess -> backbone -> heads). The
ratio c/a is how much of the backbone's speed the node keeps end to end; comparing c with
a and b shows whether decoding overlaps the model or adds to it. ``--memory-scaling`` runs
the node path in fresh processes at 300 and 2,000 slices to show that peak memory does not
grow with the series (streaming).

    .venv/bin/python -m benchmarks.inference [--size base|tiny] [--device auto|cpu|cuda]
        [--slices N] [--jpeg2000] [--batch N] [--iters N] [--attentive] [--memory-scaling]

On CPU the defaults shrink (batch 8, fewer iterations, 32 slices for the full-size model)
so a run takes minutes, not hours; pass --slices / --batch to override.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pipelines.model.backbone import Backbone, demo_backbone
from pipelines.model.heads import Head, demo_attentive_head, demo_head
from pipelines.model.inference import analyse_series, select_device
from pipelines.model.preprocess import iter_series_chunks, plan_series

RESULT_PREFIX = "RESULT "


# --- a synthetic CT series ---------------------------------------------------------------


def _phantom(z: float, rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """An axial slice in HU: air, an elliptical body, two lungs, a spine, some noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (xx / (0.42 + 0.03 * np.sin(z / 40))) ** 2 + (yy / 0.32) ** 2 < 1
    hu[body] = 40.0
    lung_size = max(0.0, 0.12 + 0.08 * np.sin(z / 60))
    for side in (-0.17, 0.17):
        lung = ((xx - side) / (lung_size + 1e-3)) ** 2 + ((yy + 0.03) / 0.18) ** 2 < 1
        hu[lung & body] = -850.0
    spine = (xx / 0.05) ** 2 + ((yy - 0.2) / 0.05) ** 2 < 1
    hu[spine] = 700.0
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    return hu


def _slice_dataset(k: int, count: int, uids: dict[str, str], hu: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality = "CT"
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH-0001"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-250.0, -250.0, float(k - count)]
    ds.PixelSpacing = [0.98, 0.98]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def write_series(
    folder: Path, count: int, *, jpeg2000: bool, seed: int = 0
) -> tuple[list[Path], str]:
    """``count`` slices of 512 x 512 CT (uncompressed or JPEG 2000 lossless) and the series UID.

    Slices are generated and written on a thread pool; the JPEG 2000 encoder itself runs
    one slice at a time (concurrent calls into it crashed the process here).
    """
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    encoder = threading.Lock()

    def write(k: int) -> Path:
        ds = _slice_dataset(k, count, uids, _phantom(float(k), np.random.default_rng(seed + k)))
        if jpeg2000:
            with encoder:
                ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(write, range(count))), uids["series"]


# --- measurements ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    value = work()
    _sync(device)
    return time.perf_counter() - started, value


def raw_forward(
    backbone: Backbone, batch: int, iters: int, *, warmup: int, repeats: int = 3
) -> float:
    """Slices/s of the timm forward alone (bf16 autocast + fused attention on CUDA).

    The best of ``repeats`` timings of ``iters`` passes: on a shared machine the fastest
    run is the one least disturbed by other work.
    """
    device = backbone.device
    size = backbone.spec.image_size
    x = torch.randn(batch, 1, size, size, device=device)
    for _ in range(warmup):
        backbone.features(x)
    best = min(
        _timed(device, lambda: [backbone.features(x) for _ in range(iters)])[0]
        for _ in range(max(1, repeats))
    )
    return batch * iters / best


def decode_only(paths: list[Path], batch: int) -> float:
    """Slices/s of header planning plus decoding, with nothing else running."""
    started = time.perf_counter()
    plan = plan_series(paths)
    count = sum(len(indices) for indices, _ in iter_series_chunks(plan, batch))
    return count / (time.perf_counter() - started)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or (64 if on_cuda else 8)
    iters = args.iters or (20 if on_cuda else (2 if args.size == "base" else 8))
    slices = args.slices or (300 if on_cuda or args.size == "tiny" else 32)
    torch.manual_seed(0)
    backbone = demo_backbone(args.size, device=device)
    heads: list[Head] = [demo_head(backbone.spec.hidden_size)]
    if args.attentive:
        heads.append(demo_attentive_head(backbone.spec.hidden_size, num_slices=5))
    result: dict[str, Any] = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else ""),
        "size": args.size,
        "model": backbone.identity.name,
        "batch": batch,
        "slices": slices,
        "transfer_syntax": "JPEG 2000 lossless" if args.jpeg2000 else "explicit VR LE",
        "threads": torch.get_num_threads(),
    }
    if not args.skip_raw:
        result["raw_slices_per_s"] = raw_forward(
            backbone, batch, iters, warmup=3 if on_cuda else 1, repeats=args.repeats
        )
    else:  # still warm the model up once so the node path does not pay for it
        raw_forward(backbone, min(batch, 2), 1, warmup=0, repeats=1)
    with tempfile.TemporaryDirectory(prefix="curia-bench-") as tmp:
        if args.series is not None:  # an existing series (e.g. written by another process)
            paths = sorted(p for p in args.series.iterdir() if p.suffix == ".dcm")
            series_uid = plan_series(paths).series_instance_uid
            result["slices"] = slices = len(paths)
            result["write_s"] = 0.0
        else:
            started = time.perf_counter()
            paths, series_uid = write_series(Path(tmp) / "series", slices, jpeg2000=args.jpeg2000)
            result["write_s"] = time.perf_counter() - started
        if not args.skip_decode:
            result["decode_slices_per_s"] = decode_only(paths, batch)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, findings = _timed(
            device,
            lambda: analyse_series(
                paths, backbone, heads, series_instance_uid=series_uid, batch_size=batch
            ),
        )
    assert findings.slice_count == slices
    result["node_s"] = seconds
    result["node_slices_per_s"] = slices / seconds
    if "raw_slices_per_s" in result:
        result["node_vs_raw"] = result["node_slices_per_s"] / result["raw_slices_per_s"]
    result["peak_rss_mb"] = peak_rss_mb()
    if on_cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _rate(value: float) -> str:
    return f"{value:10.2f}" if value < 10 else f"{value:10.1f}"


def report(result: dict[str, Any]) -> None:
    print(
        f"device {result['device']}, {result['model']}, batch "
        f"{result['batch']}, {result['threads']} torch threads"
    )
    if "raw_slices_per_s" in result:
        print(f"(a) backbone forward alone      {_rate(result['raw_slices_per_s'])} slices/s")
    if "decode_slices_per_s" in result:
        print(f"    decoding alone              {_rate(result['decode_slices_per_s'])} slices/s")
    print(
        f"(b) node, {result['slices']} slices from disk  {_rate(result['node_slices_per_s'])} "
        f"slices/s ({result['node_s']:.2f} s, {result['transfer_syntax']}; writing took "
        f"{result['write_s']:.1f} s)"
    )
    if "node_vs_raw" in result:
        print(f"    ratio b/a                   {result['node_vs_raw']:10.2f}")
    print(f"    peak RSS                    {result['peak_rss_mb']:10.0f} MB")
    if "peak_cuda_mb" in result:
        print(f"    peak CUDA allocated         {result['peak_cuda_mb']:10.0f} MB")


def memory_scaling(args: argparse.Namespace) -> None:
    """Peak RSS of the node path at 300 and 2,000 slices, each in a fresh process.

    The series is written beforehand (here), so the measured process's peak is the
    analysis alone: model, decoding, preprocessing and the heads.
    """
    rows = []
    for slices in (300, 2000):
        with tempfile.TemporaryDirectory(prefix="curia-bench-") as tmp:
            write_series(Path(tmp), slices, jpeg2000=args.jpeg2000)
            command = [
                sys.executable,
                "-m",
                "benchmarks.inference",
                "--size",
                args.size,
                "--device",
                args.device,
                "--series",
                tmp,
                "--skip-raw",
                "--skip-decode",
                "--json",
            ]
            if args.batch:
                command += ["--batch", str(args.batch)]
            if args.attentive:
                command.append("--attentive")
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX))
            rows.append(json.loads(line[len(RESULT_PREFIX) :]))
    print(f"streaming, {rows[0]['model']}, batch {rows[0]['batch']}:")
    for row in rows:
        cuda = f", peak CUDA {row['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in row else ""
        print(
            f"  {row['slices']:5d} slices: {row['node_slices_per_s']:8.1f} slices/s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB{cuda}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["base", "tiny"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--slices", type=int, default=None, help="series length (default 300)")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed forward passes for (a)")
    parser.add_argument("--repeats", type=int, default=3, help="(a) is the best of these")
    parser.add_argument("--jpeg2000", action="store_true", help="write JPEG 2000 lossless")
    parser.add_argument(
        "--series", type=Path, default=None, help="analyse this folder of .dcm files instead"
    )
    parser.add_argument("--attentive", action="store_true", help="add an attentive 3D head")
    parser.add_argument("--memory-scaling", action="store_true", help="300 vs 2000 slices")
    parser.add_argument("--skip-raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one RESULT json line")
    args = parser.parse_args()
    if args.memory_scaling:
        memory_scaling(args)
        return
    result = run(args)
    if args.json:
        print(RESULT_PREFIX + json.dumps(result))
    else:
        report(result)


if __name__ == "__main__":
    main()
