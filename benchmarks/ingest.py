"""DIMSE ingest throughput: the node (durable, catalogued) vs DCMTK's storescp, one run.

Sends the same 300-slice 512x512 CT series (synthetic pixels) with DCMTK storescu
(TCP_NODELAY=1 on both ends) to storescp and to the node's listener, and prints instances/s
for each beside two floors of the disk, the same bytes made durable without network,
parsing or catalogue:

- the file floor: each instance to a new file, fsynced, renamed, its folder fsynced;
- the journal floor: each instance appended to a preallocated file, one fdatasync each
  (and the same into blocks zero-filled beforehand, as the node's journal segments are);
- the same into zero-filled blocks and a copy: each instance then also written to a file of
  its own past the page cache, as the node's filer writes its spool copy (one after the
  other here; the node overlaps them), the file system synced at the end;
- the durable receive floor (:mod:`benchmarks.durable_receive`): the same bytes over
  loopback from a sender that waits for each answer, made durable before it (written as
  they arrive, or after the last byte), and not written at all; and from it, the pace of a
  receiver that cheap with storescu as the sender: the receive floor's time per instance
  plus what writing as the bytes arrive added to the network's;
- the durable receiver floor (:file:`durable_scp.c`, compiled at run time where there is a C
  compiler): a C-STORE receiver in C that appends each data set fragment to a zero-filled
  journal as it arrives and answers once a shared ``fdatasync`` covers it, with nothing
  else (no parsing, no catalogue), sent to by storescu on one association and by the ten
  senders: the cheapest receiver that keeps the node's meaning of Success;

The node is built as ``curia-node run`` builds it (its disk guard asked before each
instance is let in), and timed as it runs once its journal has prepared segments to reuse
(kept across restarts): after two other series, the first of them printed apart as a new
node's pace; and its ten senders after a burst of theirs, untimed as a comparison but
printed apart too, which leaves the journal the spare segments a burst fills (a new node's
first burst makes them as it goes).
And, beside DCMTK storing, DCMTK receiving without storing (``storescp --ignore``): what the
sender and the network allow at all. The node's CPU time per instance (all its threads,
user and system) and the sender's are printed too, and what the disk was asked to write
while DCMTK and the node received (bytes, flushes and busy time per instance, from
/proc/diskstats), and what a ``sync`` right after each send wrote: storescp's bytes wait
in the page cache, the node's are made durable. Beside them, the share of the processors'
time the host took (steal, /proc/stat) while each receiver's sends were timed: on a
virtual machine it swings from nothing to a quarter within a run, and a receiver timed in
such a moment ran on less machine than the one beside it. Every timed send starts after a ``sync``
(untimed), so that none of them pays for what the one before left in the page cache, and with
its series read through once (untimed), so that its senders do not read from the disk the
receiver writes to (a hospital's sender reads from its own).

Disks differ between machines, so the ratios node/DCMTK, node/file floor and node/journal
floor are printed from the same run. DCMTK, the receive floor, the journal floor and the
node are sent to (or measured) in turn ``--repeats`` times (storescp and the node kept
running; a new series for the node each time), so that a slow moment of a shared machine
falls on all of them: medians, with ranges.
Then ``--senders`` concurrent storescu x ``--slices`` (distinct series) into the node and
into ``storescp --fork``, in turn ``--repeats`` times (the node idle while ``--fork``
receives; the machine's speed swings by half within a run): aggregate instances/s, medians
and ranges, and peak RSS while they send (the node's: the high-water marks of this
process, which hosts the listener, and of its filing process; DCMTK's: the sum over
storescp and its forked children, sampled every 20 ms), and the processor time each took
per instance, its senders' included (on a machine with few processors the senders and the
receiver share them; the node's also as the listener's and the filing process's while the
senders sent: what the node's receiving costs, beside the filing that follows), and what
each asked of the disk while it received (storescp's bytes wait in the page cache until
after its send; the node's journal is on disk before each answer).

Every series is written, and synced, before anything is timed, and nothing is deleted
until the end (each run keeps its own outputs): for minutes after many files are
deleted, ext4 takes longer to create files (it looks past the inodes just freed), and
bytes still on their way from the page cache would be written while a receiver is timed.
Each run prints what creating a file costs as it starts (:func:`creation_us`): a run
started right after another's clean-up pays ten times the usual for a while, storescp
as it receives and the node's filer behind its journal.
With the defaults that is about 11 GB per run, beside 7 GB of series. Before the first
run the machine's free memory is filled with page cache that costs no disk
(:func:`fill_memory`): every receiver is timed as on a server whose memory is in use.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--senders 10] [--repeats 3] [--runs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from benchmarks.disk import DiskCounters, creation_us, device_of, read_counters
from benchmarks.durable_receive import durable_receive
from benchmarks.memory import HighWater, PeakRss, Steal, cpu_seconds, fill_memory
from node.catalogue.db import Catalogue, upgrade
from node.core.collector import settle_collector
from node.core.settings import DicomSettings
from node.dimse.allow_list import SourcePolicy
from node.dimse.listener import start_listener
from node.store.direct_write import write_new
from node.store.disk import DiskGuard
from node.store.ingest import Ingestor
from node.store.journal import JOURNAL_DIR, Journal
from node.store.spool import Spool, fsync_dir, write_durably
from node.store.syscalls import syncfs
from node.store.write_ahead import IDLE_SECONDS
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


@contextlib.contextmanager
def storescp(work: Path, fork: bool = False, ignore: bool = False) -> Iterator[tuple[int, int]]:
    """A running storescp (``--fork`` for several senders; ``--ignore`` to receive without
    storing anything): its port and process ID."""
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    # Unique file names: each repeat writes new files, as the first does.
    command = ["storescp", "-aet", "CURIA", "+uf", "-od", str(out)] + (["--fork"] if fork else [])
    command += ["--ignore"] if ignore else []
    proc = subprocess.Popen([*command, str(port)], env=DCMTK_ENV)
    try:
        wait_for(lambda: port_open(port), 10, "storescp did not start")
        yield port, proc.pid
    finally:  # what it stored is removed with ``work``, at the end (see the docstring)
        proc.terminate()
        proc.wait()


def dcmtk_rate(folders: list[Path], slices: int, work: Path, disk: DiskLoad) -> tuple[float, float]:
    """Instances/s of ``storescp --fork`` receiving from several senders at once (after a
    ``sync``, as :meth:`DiskLoad.timed` sends), and its peak RSS in MiB; ``disk`` counts the
    disk's writes while it received."""
    with storescp(work, fork=True) as (port, pid), PeakRss(pid) as rss:
        elapsed = disk.timed(port, folders)
    return slices * len(folders) / elapsed, rss.mib


def durable_scp_rates(
    sends: list[list[Path]], slices: int, work: Path
) -> list[tuple[float, float]] | None:
    """The durable receiver floor (:file:`durable_scp.c`: every data set fragment appended
    to a zero-filled journal as it arrives, each C-STORE answered once a shared
    ``fdatasync`` covers it, nothing else), compiled here and sent to by storescu: for each
    send in turn (its folders sent at once, ``slices`` instances each), instances/s and the
    processor time per instance (the senders' included) in ms; None where there is no C
    compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = work / "durable_scp"
    source = Path(__file__).with_name("durable_scp.c")
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    port = free_port()
    command = [str(binary), str(port), str(work / "durable-scp.journal"), "1024"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    rates = []
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the durable receiver floor did not start")
        for folders in sends:
            read_through(folders)
            os.sync()  # its zero-filled journal, and what came before, on disk first
            before, receiver = os.times(), cpu_seconds(proc.pid)
            elapsed = timed_send(port, folders)
            spent = (sum(cpu_seconds(proc.pid)) - sum(receiver)) * 1000
            instances = slices * len(folders)
            cpu = cpu_per_instance(before, os.times(), instances, own=False)
            rates.append((instances / elapsed, cpu + spent / instances))
    finally:
        proc.kill()
        proc.wait()
    return rates


def cpu_per_instance(
    before: os.times_result, after: os.times_result, instances: int, own: bool = True
) -> float:
    """Milliseconds of processor time per instance between two ``os.times()``: this
    process's (``own``) and its children's that were waited for (senders, storescp)."""
    spent = after.children_user - before.children_user
    spent += after.children_system - before.children_system
    if own:
        spent += after.user - before.user + after.system - before.system
    return spent * 1000 / instances


def read_through(folders: list[Path]) -> None:
    """Read every file of ``folders`` once, so that a send of them finds them in the page
    cache.

    A hospital's sender reads from its own disk; here the sender shares the receiver's.
    Once the run's memory is full, a series not read for a while is no longer cached, and
    its sender read it from the disk the receiver flushes to, while the receiver was timed.
    DCMTK and ``storescp --fork`` receive the same series on every turn (cached after the
    first), the node new ones (new UIDs): the node's senders read from the disk and DCMTK's
    did not. One association into the node, its series cached or not (memory filled as the
    benchmark fills it, 3 series each way): 1,303-1,481 against 880-1,082 instances/s."""
    chunk = bytearray(1 << 20)
    for folder in folders:
        for path in folder.iterdir():
            with open(path, "rb", buffering=0) as source:
                while source.readinto(chunk):
                    pass


class DiskLoad:
    """The disk's writes during the sends timed for one receiver, and those it left to be
    written later (by a ``sync`` right after), summed over repeats. Each send starts
    after a ``sync``, untimed, and with what it sends in the page cache
    (:func:`read_through`): the bytes an earlier receiver left in the page cache are not
    written while this one receives, and its senders do not read from the disk."""

    def __init__(self, device: tuple[int, int]) -> None:
        self.device = device
        self.during: DiskCounters | None = DiskCounters()
        self.after = DiskCounters()
        self.seconds = 0.0
        self.steal = Steal()  # the host's share of the processors while sends were timed

    def timed(
        self, port: int, folders: list[Path], settle: Callable[[], object] | None = None
    ) -> float:
        """Seconds the send took; ``settle``, called after it (untimed), waits until the
        receiver has done all it does for what it received (the node: filed it), so its
        disk writes are counted with the send's."""
        read_through(folders)
        os.sync()
        before = read_counters(self.device)
        with self.steal.timed():
            elapsed = timed_send(port, folders)
        if settle is not None:
            settle()
        sent = read_counters(self.device)
        os.sync()
        synced = read_counters(self.device)
        if self.during is None or before is None or sent is None or synced is None:
            self.during = None
        else:
            self.during += sent - before
            self.after += synced - sent
        self.seconds += elapsed
        return elapsed

    def describe(self, instances: int) -> str:
        if self.during is None:
            return f"not counted, steal {self.steal.percent:.0f}%"
        busy = self.during.busy_ms / 10 / self.seconds
        return (
            f"{self.during.bytes_written / instances / 1024:,.0f} KiB, "
            f"{self.during.flushes / instances:.2f} flushes, busy {busy:.0f}% "
            f"(then {self.after.bytes_written / instances / 1024:,.0f} KiB by a sync); "
            f"steal {self.steal.percent:.0f}%"
        )


def _settle(ingestor: Ingestor) -> float:
    """Seconds until every instance the node answered is filed (spool and catalogue)."""
    started = time.perf_counter()
    if not ingestor.settle():
        raise RuntimeError("the node did not file what it received within its settle time")
    return time.perf_counter() - started


def _quiet(journal: Journal) -> None:
    """Wait, untimed, until the node's work behind its journal is done: its drained
    segments retired (once it has been idle a moment) and no spare being zero-filled, so
    none of it falls on the next receiver timed."""
    time.sleep(IDLE_SECONDS + 0.5)
    wait_for(lambda: not journal.preparing, 60, "the journal's spare was not made")


def _spread(rates: list[float]) -> str:
    """The median of ``rates`` and their range."""
    return f"{statistics.median(rates):7.1f} instances/s ({min(rates):.0f}-{max(rates):.0f})"


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


JOURNAL_SEGMENT = 256 << 20


def journal_floor(
    folder: Path, work: Path, written: bool = False, copies: Path | None = None
) -> float:
    """Instances/s for the cheapest durable write of the same bytes: appended with
    ``pwrite`` to a preallocated file (created, allocated and fsynced beforehand), one
    ``fdatasync`` per instance. With ``written`` its blocks are zero-filled first, as the
    node's journal segments are (a flush then changes no file system metadata).

    With ``copies`` (a new folder), each instance is then also written to a file of its
    own there, past the page cache, and the file system synced at the end: the disk work
    of the node's journal and spool copy, one after the other, with nothing else."""
    payloads = [path.read_bytes() for path in sorted(folder.iterdir())]
    path = work / "journal.floor"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = max(JOURNAL_SEGMENT, sum(map(len, payloads)) + (1 << 20))
        os.posix_fallocate(fd, 0, size)
        if written:
            zeros = bytes(1 << 20)
            for offset in range(0, size, len(zeros)):
                os.pwrite(fd, zeros, offset)
        os.fsync(fd)
        fsync_dir(work)
        offset = 0
        started = time.perf_counter()
        for index, data in enumerate(payloads):
            os.pwrite(fd, data, offset)
            os.fdatasync(fd)
            offset += len(data)
            if copies is not None:
                write_new(copies / f"{index}.dcm", data)
        if copies is not None and not syncfs(copies):
            os.sync()
        return len(payloads) / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()


def write_inputs(args: argparse.Namespace, work: Path) -> None:
    """Every series the runs send, written and synced before anything is timed."""
    names = ["series", "series-warm-up-0", "series-warm-up-1"]
    names += [f"series-node-{repeat}" for repeat in range(args.repeats)]
    folders = [work / name for name in names]
    for turn in [*range(args.repeats), "first"]:  # new series for the node each turn
        folders += _senders_series(work, args.senders, turn)
    for path in folders:
        write_series(path, args.slices)
    os.sync()


def one_run(args: argparse.Namespace, inputs: Path, work: Path) -> None:
    """One comparison, sending the series in ``inputs``; what it writes goes to ``work``,
    removed only at the end of every run."""
    folder = inputs / "series"
    print(f"file creation  : {creation_us(work / 'creation'):7.1f} us per new file (empty)")
    floor = durable_floor(folder, work)
    written = journal_floor(folder, work, written=True)
    (work / "floor-copies").mkdir()
    twice = journal_floor(folder, work, written=True, copies=work / "floor-copies")
    received = durable_receive(folder, work)

    run_dir = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    url = f"sqlite:///{run_dir / 'catalogue.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    spool = Spool(run_dir / "spool", run_dir / "quarantine")
    node_journal = Journal(spool.root / JOURNAL_DIR)
    settings = DicomSettings(host="127.0.0.1", port=free_port(), max_associations=args.senders + 2)
    # As `curia-node run` builds it: its disk guard asked before each instance is let in.
    guard = DiskGuard(run_dir, settings.min_free_mb * 1024 * 1024)
    ingestor = Ingestor(spool, catalogue, guard, journal=node_journal, filing_process=True)
    port = settings.port
    server = start_listener(
        settings,
        ingestor,
        SourcePolicy(catalogue, accept_any=True),
    )
    settle_collector()  # as `curia-node run` does once started
    try:
        # A new node's journal has no prepared segments yet: its first ~300 MiB also pay for
        # zero-filling them (kept since, across restarts). Its first series is timed apart;
        # the node is timed below as it runs from then on.
        warm_up = [inputs / f"series-warm-up-{i}" for i in range(2)]
        cold = args.slices / timed_send(port, warm_up[:1])
        timed_send(port, warm_up[1:])
        _settle(ingestor)
        wait_for(lambda: node_journal.spares >= 1, 30, "the journal kept no spare segment")
        _quiet(node_journal)
        # DCMTK, the receive floor, the journal floor and the node in turn, so that a
        # slower moment of a shared machine falls on all four: medians, and each one's range.
        dcmtk_rates, receive_rates, journal_rates, node_rates = [], [], [], []
        lags: list[float] = []  # seconds from the sender's end to its instances all filed
        device = device_of(work)
        dcmtk_disk, receive_disk, node_disk = DiskLoad(device), DiskLoad(device), DiskLoad(device)
        cpu_user = cpu_system = sender_user = sender_system = 0.0
        with storescp(work) as (dcmtk_port, _), storescp(work, ignore=True) as (ignore_port, _):
            for repeat in range(args.repeats):
                dcmtk_rates.append(args.slices / dcmtk_disk.timed(dcmtk_port, [folder]))
                receive_rates.append(args.slices / receive_disk.timed(ignore_port, [folder]))
                # The disk's floor beside each turn: its pace drifts within minutes, and
                # the goal's ratio is to the floor of the same moment.
                journal_rates.append(journal_floor(folder, work))
                fresh = inputs / f"series-node-{repeat}"  # new UIDs: each is new to the node
                filer = ingestor.write_ahead.filing_pid if ingestor.write_ahead else None
                before, filing_before = os.times(), cpu_seconds(filer)
                node_rates.append(
                    args.slices
                    / node_disk.timed(port, [fresh], settle=lambda: lags.append(_settle(ingestor)))
                )
                cpu, filing = os.times(), cpu_seconds(filer)
                _quiet(node_journal)
                cpu_user += cpu.user - before.user + filing[0] - filing_before[0]
                cpu_system += cpu.system - before.system + filing[1] - filing_before[1]
                sender_user += cpu.children_user - before.children_user
                sender_system += cpu.children_system - before.children_system
        dcmtk, node = statistics.median(dcmtk_rates), statistics.median(node_rates)
        receive, journal = statistics.median(receive_rates), statistics.median(journal_rates)
        print(f"DCMTK storescp : {_spread(dcmtk_rates)} (no fsync, no catalogue)")
        print(f"Curia Node     : {_spread(node_rates)} (durable + catalogued before Success)")
        print(f"  new journal  : {cold:7.1f} instances/s (a new node's first series)")
        print(
            "  filed        : every instance in spool and catalogue "
            + " / ".join(f"{lag * 1000:.0f}" for lag in lags)
            + " ms after storescu's end (Success waits for the journal alone)"
        )
        print(f"receive floor  : {_spread(receive_rates)} (storescp --ignore: stores nothing)")
        print(f"file floor     : {floor:7.1f} instances/s (new file + fsync + rename + dir fsync)")
        print(
            f"journal floor  : {_spread(journal_rates)} (preallocated pwrite + fdatasync, "
            "measured before each of the node's turns)"
        )
        print(f"  into written : {written:7.1f} instances/s (the same, blocks zero-filled first)")
        print(
            f"  and a copy   : {twice:7.1f} instances/s (the same, then each written to a file "
            "of its own past the page cache: the node's two writes, one after the other)"
        )
        print(
            f"durable receive: {received['arriving']:7.1f} instances/s written as they arrive, "
            f"{received['after']:.1f}/s written after the last byte, "
            f"{received['network']:.1f}/s not written (loopback, an answer awaited per instance)"
        )
        # The cycle of a receiver as cheap as that one, sent to by storescu: storescu's own
        # (the receive floor) and what the durable write adds to it on loopback.
        paced = 1 / (1 / receive + 1 / received["arriving"] - 1 / received["network"])
        print(
            f"  storescu's pace : {paced:7.1f} instances/s (the receive floor, plus what "
            "writing as they arrive adds): DCMTK/that "
            f"{dcmtk / paced:.2f}, node/that {node / paced:.2f}"
        )
        print(
            f"ratios node/DCMTK {node / dcmtk:.2f}, node/file floor {node / floor:.2f}, "
            f"node/journal floor {node / journal:.2f}, node/receive floor {node / receive:.2f}, "
            f"node/journal floor and a copy {node / twice:.2f}"
        )
        per = 1000 / (args.slices * args.repeats)
        print(
            f"CPU per instance (ms): node {cpu_user * per:.2f} user + "
            f"{cpu_system * per:.2f} system; storescu {sender_user * per:.2f} user + "
            f"{sender_system * per:.2f} system"
        )
        sent = args.slices * args.repeats
        size = sum(path.stat().st_size for path in folder.iterdir()) / args.slices / 1024
        print(
            f"disk writes while receiving, per instance of {size:,.0f} KiB: "
            f"DCMTK {dcmtk_disk.describe(sent)} | node {node_disk.describe(sent)}"
        )
        # Ten senders, the node and storescp --fork in turn --repeats times (the node idle
        # while --fork receives), so that a slower moment of the machine falls on both.
        many = _many_senders(args, inputs, work, port, ingestor, node_journal, device)
    finally:
        server.shutdown()
        ingestor.close()
        catalogue.dispose()
    floors = durable_scp_rates(
        [[folder], _senders_series(inputs, args.senders, 0)], args.slices, work
    )
    many.report(args)
    if floors is not None:
        (floor_one, _), (floor_many, floor_cpu) = floors
        print(
            f"durable receiver floor (durable_scp.c: journal as it arrives, group commit, no "
            f"parsing, no catalogue), one association: {floor_one:.1f} instances/s | "
            f"node/that {node / floor_one:.2f}, DCMTK/that {dcmtk / floor_one:.2f}; "
            f"that/journal floor into written {floor_one / written:.2f}"
        )
        print(
            f"  {args.senders} senders: {floor_many:.1f} instances/s, CPU per instance "
            f"{floor_cpu:.2f} ms, senders' included | node/that "
            f"{statistics.median(many.node) / floor_many:.2f}, storescp --fork/that "
            f"{statistics.median(many.fork) / floor_many:.2f}"
        )
    many.report_disk(args)


@dataclass
class ManySenders:
    """Ten senders (``--senders``) sent to the node and to ``storescp --fork`` in turn:
    each one's instances/s per turn, processor time per instance with the senders'
    (averaged over the turns), peak RSS (the highest), and the disk's writes."""

    first: float  # the node's first burst, untimed as a comparison
    node: list[float]
    fork: list[float]
    lags: list[float]  # seconds from the senders' end to every instance filed
    node_cpu: float
    listening_cpu: float  # the listener's process while the senders sent
    filing_cpu: float  # the filing process's while they sent
    senders_cpu: float
    fork_cpu: float
    node_rss: float
    fork_rss: float
    node_disk: DiskLoad
    fork_disk: DiskLoad

    def report(self, args: argparse.Namespace) -> None:
        node, fork = statistics.median(self.node), statistics.median(self.fork)
        lags = " / ".join(f"{lag * 1000:.0f}" for lag in self.lags)
        ratios = " / ".join(f"{n / f:.2f}" for n, f in zip(self.node, self.fork, strict=True))
        print(
            f"{args.senders} senders x {args.slices} (distinct series), node and storescp "
            f"--fork in turn {len(self.node)} times: node {_spread(self.node)} aggregate (all "
            f"filed {lags} ms after), peak RSS {self.node_rss:.0f} MiB (with its filing "
            f"process) | storescp --fork {_spread(self.fork)}, peak RSS {self.fork_rss:.0f} "
            f"MiB | ratio of the medians {node / fork:.2f} (each turn: {ratios})"
        )
        print(
            f"  the node's first burst: {self.first:7.1f} instances/s (its journal making "
            "the segments a burst fills, kept as spares since)"
        )
        print(
            f"  CPU per instance (ms), senders' included: node {self.node_cpu:.2f} (with its "
            f"filing, until all filed; senders {self.senders_cpu:.2f}; while they sent, the "
            f"listener {self.listening_cpu:.2f} and the filing {self.filing_cpu:.2f}) | "
            f"storescp --fork {self.fork_cpu:.2f} | {os.cpu_count()} processors"
        )

    def report_disk(self, args: argparse.Namespace) -> None:
        # storescp's bytes wait in the page cache past its timed send; the node's are on
        # disk before each answer, and the spool copies written by its filer before "all
        # filed".
        sent = args.slices * args.senders * len(self.node)
        print(
            f"  disk writes while receiving, per instance: node {self.node_disk.describe(sent)}"
            f" | storescp --fork {self.fork_disk.describe(sent)}"
        )


def _senders_series(inputs: Path, senders: int, turn: int | str) -> list[Path]:
    """The series the ten senders (``senders``) send in one turn."""
    return [inputs / f"series-{turn}-{sender}" for sender in range(senders)]


def _many_senders(
    args: argparse.Namespace,
    inputs: Path,
    work: Path,
    port: int,
    ingestor: Ingestor,
    journal: Journal,
    device: tuple[int, int],
) -> ManySenders:
    """The node (new series each turn) and ``storescp --fork`` (the first turn's series
    again) received from ``--senders`` storescu at once, in turn ``--repeats`` times."""
    total = args.slices * args.senders
    node, fork, lags = [], [], []
    node_cpu = senders_cpu = fork_cpu = node_rss = fork_rss = listening = filing_while = 0.0
    node_disk, fork_disk = DiskLoad(device), DiskLoad(device)
    first = _senders_series(inputs, args.senders, 0)
    # A burst first, untimed as a comparison: the journal keeps the segments it fills as
    # spares (across restarts too), so the node is timed as it runs from then on.
    warm_up = (
        args.slices
        * args.senders
        / timed_send(port, _senders_series(inputs, args.senders, "first"))
    )
    _settle(ingestor)
    _quiet(journal)
    for turn in range(args.repeats):
        folders = _senders_series(inputs, args.senders, turn)
        filer = ingestor.write_ahead.filing_pid if ingestor.write_ahead else None
        os.sync()  # before the processor time is read: the timed send's own sync finds nothing
        before, filing_before = os.times(), cpu_seconds(filer)
        sent: list[tuple[os.times_result, tuple[float, float]]] = []  # as the senders ended

        def settle(
            sent: list[tuple[os.times_result, tuple[float, float]]] = sent,
            filer: int | None = filer,
        ) -> None:
            sent.append((os.times(), cpu_seconds(filer)))
            lags.append(_settle(ingestor))

        with HighWater((os.getpid(), filer) if filer else (os.getpid(),)) as peak:
            elapsed = node_disk.timed(port, folders, settle=settle)
        after, filing_after = os.times(), cpu_seconds(filer)
        node.append(total / elapsed)
        node_cpu += cpu_per_instance(before, after, total)
        node_cpu += (sum(filing_after) - sum(filing_before)) * 1000 / total
        ((ended, filing_ended),) = sent
        listening += (ended.user - before.user + ended.system - before.system) * 1000 / total
        filing_while += (sum(filing_ended) - sum(filing_before)) * 1000 / total
        senders_cpu += cpu_per_instance(before, after, total, own=False)
        node_rss = max(node_rss, peak.mib)
        _quiet(journal)
        # storescp --fork as the node was: after a sync, no file deleted since the run began.
        before = os.times()
        rate, rss = dcmtk_rate(first, args.slices, work, fork_disk)
        fork.append(rate)
        fork_cpu += cpu_per_instance(before, os.times(), total, own=False)
        fork_rss = max(fork_rss, rss)
    turns = args.repeats
    return ManySenders(
        first=warm_up,
        node=node,
        fork=fork,
        lags=lags,
        node_cpu=node_cpu / turns,
        listening_cpu=listening / turns,
        filing_cpu=filing_while / turns,
        senders_cpu=senders_cpu / turns,
        fork_cpu=fork_cpu / turns,
        node_rss=node_rss,
        fork_rss=fork_rss,
        node_disk=node_disk,
        fork_disk=fork_disk,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=3, help="DCMTK and node sends in turn, one association"
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison")
    args = parser.parse_args()
    if shutil.which("storescp") is None:
        raise SystemExit("DCMTK is not installed (apt-get install dcmtk)")

    work = Path(tempfile.mkdtemp(prefix="curia-ingest-"))
    try:
        write_inputs(args, work)
        fill_memory(work)
        for run in range(args.runs):
            if args.runs > 1:
                print(f"-- run {run + 1} of {args.runs}")
            outputs = work / f"run-{run + 1}"
            outputs.mkdir()
            one_run(args, work, outputs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
