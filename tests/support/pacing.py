"""A peer that sends its bytes one at a time, slowly: the trickle a reader must cut off."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def dripping(peer: socket.socket, data: bytes, every: float = 0.05) -> Iterator[None]:
    """Send ``data`` through ``peer`` a byte every ``every`` seconds, in a thread, until
    the block ends."""
    stop = threading.Event()

    def drip() -> None:
        for index in range(len(data)):
            if stop.wait(every):
                return
            peer.sendall(data[index : index + 1])

    sender = threading.Thread(target=drip)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join()
