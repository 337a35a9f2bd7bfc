"""A Celery worker running in a thread of the node process (embedded mode).

Same consumer, same acknowledgement rules as a separate ``celery worker``; only the pool
is ``solo``: tasks run one at a time in this thread, which suits one model on one device.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.worker import WorkController

log = logging.getLogger(__name__)


class _Controller(WorkController):
    def __init__(self, *args: object, ready: threading.Event, **kwargs: object) -> None:
        self._ready = ready
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: object) -> None:
        self._ready.set()


class EmbeddedWorker:
    def __init__(self, app: Celery, queues: list[str]) -> None:
        self.app = app
        self.queues = queues
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._controller: _Controller | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.app.finalize()
        # Celery looks tasks up in the "current app", which is per thread; the worker runs
        # tasks from its own thread and from its timer thread (retries with a countdown).
        # The node has one Celery app: make it the default for every thread.
        self.app.set_default()
        self.app.set_current()
        self._controller = _Controller(
            app=self.app,
            ready=self._ready,
            concurrency=1,
            pool="solo",
            hostname=anon_nodename(hostname="curia-embedded"),
            queues=self.queues,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel=logging.getLogger().level or logging.INFO,
        )
        self._thread = threading.Thread(target=self._run, name="celery-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the embedded Celery worker did not start")
        log.info("embedded worker consuming %s", ", ".join(self.queues))

    def _run(self) -> None:
        self.app.set_current()
        assert self._controller is not None
        self._controller.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._controller is not None:
            self._controller.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(timeout)
