"""`curia-node run`: wire the stages together in one process and keep them running."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.source_settings import SourceSettingsView
from node.core.collector import settle_collector
from node.core.settings import Settings
from node.delivery.commitment_reports import CommitmentReporter
from node.delivery.mpps_forward import MppsForwarder
from node.dimse.allow_list import SourcePolicy
from node.dimse.commitment import STORAGE_COMMITMENT_SOP_CLASS, CommitmentRequests
from node.dimse.listener import NormalisedService, start_listener
from node.dimse.mpps import MPPS_SOP_CLASS, PerformedSteps
from node.dimse.report_channels import ReturnPaths
from node.store.disk import DiskGuard
from node.store.ingest import Ingestor
from node.store.journal import JOURNAL_DIR, Journal
from node.store.spool import spool_for
from node.workflow.completion import CompletionWatcher
from node.workflow.routing import Router
from node.workflow.signals import Signals

if TYPE_CHECKING:  # imported when the API starts: the HTTP server is not always wanted
    import uvicorn

log = logging.getLogger(__name__)

API_START_SECONDS = 30.0  # binding a socket takes milliseconds; this only bounds a hang


def api_server(app: Any, host: str, port: int, access_log: bool = False) -> uvicorn.Server:
    """uvicorn serving ``app``. Its loggers are left without handlers of their own, so its
    lines (a request line, an exception in the application) go through the node's handler
    and are escaped like every other (:data:`node.core.logs.SERVER_LOGGERS`)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        log_config=None,
    )
    return uvicorn.Server(config)


@dataclass
class NodeService:
    settings: Settings
    _stoppers: list[Callable[[], object]] = field(default_factory=list)

    def start(self) -> None:
        settings = self.settings
        settings.ensure_dirs()
        upgrade(settings.effective_database_url)
        catalogue = Catalogue(settings.effective_database_url)
        self._stoppers.append(catalogue.dispose)
        sources = SourceSettingsView(catalogue, settings)  # per sender, changed without restart

        from pipelines.jobs.celery_app import STAGES, create_app, queue_name
        from pipelines.jobs.runtime import run_key_for

        app = create_app(settings)
        if settings.pipeline.embedded_worker:
            from pipelines.jobs.embedded_worker import EmbeddedWorker

            runtime = app.curia_runtime()
            # Load the model now: a bad weights folder stops the node at start, not later.
            log.info("model: %s", runtime.backbone.identity.name)
            worker = EmbeddedWorker(app, [queue_name(settings, stage) for stage in STAGES])
            worker.start()
            self._stoppers.append(worker.stop)

        prepare_task = app.tasks["curia.prepare_series"]
        dispatch_task = app.tasks["curia.dispatch_result"]
        # What an earlier run left in the ingest journal is filed before anything reads.
        guard = DiskGuard(settings.data_path, settings.dicom.min_free_mb * 1024 * 1024)
        spool = spool_for(settings)
        ingestor = Ingestor(
            spool,
            catalogue,
            guard,
            settings.dicom.duplicate_policy,
            journal=Journal(settings.spool_dir / JOURNAL_DIR),
            filing_process=True,
        )
        self._stoppers.append(ingestor.close)
        watcher = CompletionWatcher(
            catalogue,
            enqueue=lambda run_id, priority: prepare_task.apply_async((run_id,), priority=priority),
            run_key=run_key_for(settings),
            router=Router(catalogue, settings.spool_dir),
            policy=settings.completion,
            enqueue_delivery=dispatch_task.delay,
            signals=Signals(settings.spool_dir, sources.signals),
        )
        watcher.start()
        self._stoppers.append(watcher.stop)

        policy = SourcePolicy(catalogue, accept_any=settings.dicom.accept_any_source)
        if settings.dicom.accept_any_source:
            log.warning("dicom.accept_any_source is on: any sender may store into this node")
        paths = ReturnPaths(
            catalogue, settings.dicom.commitment, settings.spool_dir, report_to=sources.reports
        )
        reporter = CommitmentReporter(
            catalogue,
            settings.dicom.commitment,
            settings.spool_dir,
            calling_ae_title=settings.dicom.ae_title,
            paths=paths,
            report_to=sources.reports,
        )
        paths.on_change.append(reporter.wake)  # a requester's association ended
        reporter.start()  # pending requests from before a restart are answered now
        self._stoppers.append(reporter.stop)
        forward = settings.dicom.mpps_forward
        if forward is not None:
            forwarder = MppsForwarder(catalogue, forward, settings.dicom.ae_title)
            forwarder.start()
            self._stoppers.append(forwarder.stop)
        services: dict[str, NormalisedService] = {
            MPPS_SOP_CLASS: PerformedSteps(catalogue, forward=forward is not None),
            STORAGE_COMMITMENT_SOP_CLASS: CommitmentRequests(
                catalogue,
                settings.dicom.commitment,
                on_request=[reporter.wake],
                report_to=sources.reports,
            ),
        }
        server = start_listener(
            settings.dicom,
            ingestor,
            policy,
            services,
            sources.signals,
            on_signal=watcher.wake,
            return_paths=paths,
        )
        self._stoppers.append(server.shutdown)

        if settings.api.enabled:
            self._start_api(catalogue, app.tasks["curia.dispatch_result"].delay, ingestor)

    def _start_api(
        self, catalogue: Catalogue, enqueue_dispatch: Callable[[int], object], ingestor: Ingestor
    ) -> None:
        from node.web.app import create_api

        api = create_api(self.settings, catalogue, enqueue_dispatch, ingestor)
        server = api_server(api, self.settings.api.host, self.settings.api.port)
        thread = threading.Thread(target=server.run, name="api", daemon=True)
        thread.start()
        # "ready" must mean the API answers: wait for uvicorn's socket, and fail the start
        # if it could not listen (uvicorn ends its thread instead of raising).
        deadline = time.monotonic() + API_START_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise OSError(
                    f"the HTTP API could not listen on {self.settings.api.host}:"
                    f"{self.settings.api.port} (the reason is logged above)"
                )
            time.sleep(0.02)

        def stop_api() -> None:
            server.should_exit = True
            thread.join(timeout=5)

        self._stoppers.append(stop_api)
        log.info("HTTP API on http://%s:%d", self.settings.api.host, self.settings.api.port)

    def stop(self) -> None:
        for stop in reversed(self._stoppers):
            try:
                stop()
            except Exception:
                log.exception("error while stopping")
        self._stoppers.clear()

    def run_forever(self) -> None:
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            self.start()
            settle_collector()
            log.info("Curia Node ready")
            done.wait()
        finally:
            self.stop()
