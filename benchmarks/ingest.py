"""DIMSE ingest throughput: the node (durable, catalogued) vs DCMTK's storescp, one run.

Sends the same 300-slice 512x512 CT series (synthetic pixels) with DCMTK storescu
(TCP_NODELAY=1 on both ends) to storescp and to the node's listener, prints instances/s for
each and the ratio node/DCMTK, and the disk's own floor (what the fsyncs that a Success
requires cost, without network or catalogue); then 10 concurrent senders x 300 slices to the node
(aggregate instances/s, peak RSS of this process, which hosts the listener).

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--senders 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.catalogue.db import Catalogue, upgrade
from node.core.settings import DicomSettings
from node.dimse.allow_list import SourcePolicy
from node.dimse.listener import start_listener
from node.store.ingest import Ingestor
from node.store.spool import Spool, write_durably
from tests.support.peers import free_port, port_open, wait_for

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def write_series(folder: Path, slices: int) -> list[Path]:
    """A synthetic axial CT series, uncompressed, one file per slice."""
    from pydicom.dataset import Dataset

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "BENCH^INGEST"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, folder: Path, aet: str = "STORESCU") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aet", aet, "-aec", "CURIA", "+sd", "127.0.0.1", str(port), str(folder)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def timed_send(port: int, folders: list[Path]) -> float:
    started = time.perf_counter()
    procs = [storescu(port, folder, f"SENDER{i}") for i, folder in enumerate(folders)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def dcmtk_rate(folder: Path, slices: int, work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "CURIA", "-od", str(out), str(port)], env=DCMTK_ENV
    )
    try:
        wait_for(lambda: port_open(port), 10, "storescp did not start")
        return slices / timed_send(port, [folder])
    finally:
        proc.terminate()
        proc.wait()


def durable_floor(folder: Path, work: Path) -> float:
    """Instances/s for only what a Success requires of the disk: each file's bytes written
    to a temporary name, fsynced, renamed and its folder fsynced (no network, no parsing,
    no catalogue). Whatever the node does, it cannot answer faster than this."""
    target = work / "floor"
    target.mkdir()
    files = sorted(folder.iterdir())
    payloads = [path.read_bytes() for path in files]
    started = time.perf_counter()
    for path, data in zip(files, payloads, strict=True):
        write_durably(target / path.name, data)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--senders", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("storescp") is None:
        raise SystemExit("DCMTK is not installed (apt-get install dcmtk)")

    work = Path(tempfile.mkdtemp(prefix="curia-ingest-"))
    try:
        folder = work / "series"
        write_series(folder, args.slices)
        dcmtk = dcmtk_rate(folder, args.slices, work)
        floor = durable_floor(folder, work)

        url = f"sqlite:///{work / 'catalogue.sqlite'}"
        upgrade(url)
        catalogue = Catalogue(url)
        ingestor = Ingestor(Spool(work / "spool", work / "quarantine"), catalogue)
        port = free_port()
        server = start_listener(
            DicomSettings(host="127.0.0.1", port=port, max_associations=args.senders + 2),
            ingestor,
            SourcePolicy(catalogue, accept_any=True),
        )
        try:
            node = args.slices / timed_send(port, [folder])
            print(f"DCMTK storescp: {dcmtk:7.1f} instances/s (no fsync, no catalogue)")
            print(f"Curia Node    : {node:7.1f} instances/s (fsync + rename + catalogued)")
            print(f"disk floor    : {floor:7.1f} instances/s (write + fsync + rename, no network)")
            print(f"ratio node/DCMTK: {node / dcmtk:.2f}")
            print(f"ratio node/disk floor: {node / floor:.2f}")
            folders = [work / f"series-{i}" for i in range(args.senders)]
            for extra in folders:
                write_series(extra, args.slices)
            elapsed = timed_send(port, folders)
            total = args.slices * args.senders
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{args.senders} concurrent senders x {args.slices}: {total / elapsed:.1f} "
                f"instances/s aggregate (distinct series), peak RSS {rss:.0f} MiB"
            )
        finally:
            server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
