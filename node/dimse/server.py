"""The listening socket: connections admitted through the gate, each served by an acceptor.

:mod:`node.dimse.acceptor` serves one association; this module owns the socket, the threads
that serve connections, the connection gate (:mod:`node.dimse.connections`) and shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from pynetdicom.presentation import PresentationContext

from node.core.logs import Throttle
from node.dimse.acceptor import AssociationAcceptor
from node.dimse.association import Limits, Service
from node.dimse.connections import ConnectionGate, Ticket
from node.dimse.pdu import Connection
from node.dimse.report_channels import ReturnPaths

log = logging.getLogger(__name__)


class Listener:
    """Accepts connections on one address and serves each in its own thread.

    ``shutdown()`` stops accepting, then aborts the associations still open (an instance
    being stored finishes first: its handler runs to the end, only its answer is lost).
    """

    def __init__(
        self,
        address: tuple[str, int],
        supported_contexts: list[PresentationContext],
        service: Service,
        limits: Limits,
        ssl_context: ssl.SSLContext | None = None,
        also_accept: Callable[[list[PresentationContext]], list[PresentationContext]] | None = None,
        return_paths: ReturnPaths | None = None,
    ) -> None:
        self.supported_contexts = supported_contexts
        self.also_accept = also_accept
        self.service = service
        self.limits = limits
        self.ssl_context = ssl_context
        self.return_paths = return_paths  # requesters' associations that carry their reports
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.create_server(address, family=family)
        self._socket.settimeout(0.5)
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, socket.socket] = {}
        self.gate = ConnectionGate(
            limits.max_connections, limits.max_connections_per_address, limits.max_associations
        )
        self.throttle = Throttle(log)
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener")
        self._thread.daemon = True

    def start(self) -> Listener:
        self._thread.start()
        return self

    def contexts_for(self, requested: list[PresentationContext]) -> list[PresentationContext]:
        """What the node accepts of ``requested``: its supported contexts, and those
        ``also_accept`` adds for this request (unknown storage classes, when allowed)."""
        if self.also_accept is None:
            return self.supported_contexts
        return self.supported_contexts + self.also_accept(requested)

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            # A second's grace past acse_timeout: the reader's own deadline normally ends
            # them first; this catches a connection stuck elsewhere (a TLS handshake).
            self.gate.expire(self.limits.acse_timeout + 1.0)
            try:
                sock, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("cannot accept a connection")
                time.sleep(0.1)
                continue
            admission = self.gate.admit(address[0], sock)
            for evicted in admission.evicted:
                self.throttle.log(
                    logging.WARNING,
                    f"evicted:{evicted.address}",
                    "closed a connection from %s that had not associated after %.1f s:"
                    " connections are at their limit",
                    evicted.address,
                    time.monotonic() - evicted.opened,
                )
            if admission.ticket is None:
                self.throttle.log(
                    logging.WARNING,
                    f"closed:{address[0]}",
                    "closed a new connection from %s at once: %s",
                    address[0],
                    admission.why,
                )
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            thread = threading.Thread(
                target=self._serve,
                args=(sock, address, admission.ticket),
                name=f"association-{address[0]}",
            )
            thread.daemon = True
            with self._lock:
                self._active[thread] = sock
            thread.start()

    def _serve(self, sock: socket.socket, address: tuple[str, int], ticket: Ticket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.limits.acse_timeout)
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS handshake with %s failed: %s", address[0], exc)
                    return
                with self._lock:
                    self._active[threading.current_thread()] = sock
            connection = Connection(sock)
            try:
                AssociationAcceptor(connection, (address[0], address[1]), self, ticket).run()
            finally:
                connection.close()
        except Exception:
            log.exception("an association from %s failed", address[0])
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            self.gate.close(ticket)
            with self._lock:
                self._active.pop(threading.current_thread(), None)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._socket.close()
        self._thread.join(timeout)
        with self._lock:
            active = dict(self._active)
        for sock in active.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
