"""A background thread that does one piece of work now and then, or at once when woken.

Several owners of queued work (storage commitment reports, MPPS forwards) look for what is
due on a timer, and are woken early by whoever just queued something: one implementation of
that loop keeps their start, wake-up and shutdown behaving alike.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Poller:
    """Runs ``work`` every ``interval()`` seconds in a daemon thread, and at once on
    :meth:`wake`. An exception from ``work`` is logged (with ``failure``) and the loop goes
    on: queued work stays queued in the catalogue and is tried again at the next turn."""

    def __init__(
        self,
        name: str,
        work: Callable[[], object],
        interval: Callable[[], float],
        failure: str,
        join_timeout: float = 35.0,
    ) -> None:
        self.name = name
        self._work = work
        self._interval = interval
        self._failure = failure
        self._join_timeout = join_timeout
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: long work checks it between items."""
        return self._stop.is_set()

    def wake(self) -> None:
        """Something new is due: look now rather than at the next turn."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._join_timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._work()
            except Exception:
                log.exception(self._failure)
            self._wake.wait(self._interval())
            self._wake.clear()


class Polled:
    """A sender driven by its own :class:`Poller` (``_poller``): started, stopped and woken
    through it, so the commitment reporter and the MPPS forwarder share one way of doing so."""

    _poller: Poller

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._poller.wake()

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()
