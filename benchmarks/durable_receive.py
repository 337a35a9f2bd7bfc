"""The floor of a durable receiver on one connection whose sender waits for every answer.

A C-STORE sender such as storescu sends an instance, waits for its answer, then sends the
next, so each instance costs the receiver its network time plus whatever it must finish
after the last byte before answering. Here a sender process sends each instance's bytes
over loopback in pieces of the node's maximum PDU and waits for a two-byte answer; the
receiver writes them into a file whose blocks were written beforehand and answers once
they are durable (``fdatasync``). No DICOM, parsing or catalogue: what any receiver that
keeps the meaning of Success needs of the network and the disk, three ways:

- ``network``: nothing written (the network and the wait alone);
- ``after``: the instance written after its last byte, then flushed;
- ``arriving``: written as it arrives, whole pages started on their way to the disk at once
  (as the node's journal does), the rest and a flush after the last byte.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from node.store.syscalls import start_write_out

PIECE = 256 << 10  # the node's maximum PDU
PAGE = 4096
ANSWER = b"ok"
MODES = ("network", "after", "arriving")

_SENDER = f"""
import socket, sys, time
from pathlib import Path
files = sorted(Path(sys.argv[2]).iterdir())
payloads = [path.read_bytes() for path in files]
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for data in payloads:
    sock.sendall(len(data).to_bytes(8, "little"))
    view = memoryview(data)
    for start in range(0, len(data), {PIECE}):
        sock.sendall(view[start : start + {PIECE}])
    if sock.recv({len(ANSWER)}) != {ANSWER!r}:
        raise SystemExit("no answer")
sock.close()
"""


def durable_receive(folder: Path, work: Path) -> dict[str, float]:
    """Instances/s of each way (:data:`MODES`) for the instances in ``folder``."""
    sizes = [path.stat().st_size for path in folder.iterdir()]
    target = work / "durable-receive.floor"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        room = sum(_pages(size) for size in sizes) + PAGE
        zeros = bytes(1 << 20)
        for offset in range(0, room, len(zeros)):
            os.pwrite(fd, zeros, offset)
        os.fsync(fd)
        return {mode: len(sizes) / _timed(folder, fd, mode) for mode in MODES}
    finally:
        os.close(fd)
        target.unlink()


def _timed(folder: Path, fd: int, mode: str) -> float:
    """Seconds from the sender's connection to its last answer."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(port), str(folder)])
    try:
        server.settimeout(30)
        conn, _ = server.accept()
        started = time.perf_counter()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(30)
            _receive(conn, fd, mode)
            elapsed = time.perf_counter() - started
    finally:
        server.close()
        if sender.wait(30) != 0:
            raise RuntimeError("the durable receive floor's sender failed")
    return elapsed


def _receive(conn: socket.socket, fd: int, mode: str) -> None:
    """Receive instances until the sender closes, each as ``mode`` says."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    offset = 0
    while True:
        head = _exactly(conn, view, 8)
        if head is None:
            return
        size = int.from_bytes(head, "little")
        if size > len(buffer):
            raise RuntimeError(f"an instance of {size} bytes is larger than the floor's buffer")
        got = written = 0
        while got < size:
            read = conn.recv_into(view[got:size])
            if not read:
                raise RuntimeError("the sender closed in the middle of an instance")
            got += read
            whole = got // PAGE * PAGE
            if mode == "arriving" and whole - written >= 64 << 10:
                os.pwrite(fd, view[written:whole], offset + written)
                start_write_out(fd, offset + written, whole - written)
                written = whole
        if mode != "network":
            os.pwrite(fd, view[written:size], offset + written)
            os.fdatasync(fd)
        offset += _pages(size)
        conn.sendall(ANSWER)


def _exactly(conn: socket.socket, view: memoryview, size: int) -> bytes | None:
    """``size`` bytes, or None where the sender closed before the first of them."""
    got = 0
    while got < size:
        read = conn.recv_into(view[got:size])
        if not read:
            if got == 0:
                return None
            raise RuntimeError("the sender closed in the middle of a length")
        got += read
    return bytes(view[:size])


def _pages(size: int) -> int:
    return (size + PAGE - 1) // PAGE * PAGE


if __name__ == "__main__":  # python -m benchmarks.durable_receive FOLDER
    rates = durable_receive(Path(sys.argv[1]), Path(os.environ.get("TMPDIR", "/tmp")))
    print(", ".join(f"{mode} {rate:.0f}/s" for mode, rate in rates.items()))
