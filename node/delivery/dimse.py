"""A DIMSE destination: C-STORE to a peer AE (optionally over TLS), C-ECHO to check it."""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from node.core.status import STORE_KEPT, SUCCESS
from node.delivery.responses import keep_responses
from node.delivery.transport import DispatchError

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class DimseDestination:
    """A peer AE (title, host, port) that takes C-STORE; the node calls it as
    ``calling_ae_title``."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "CURIA"
    timeout: float = 30.0
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def where(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port}{' TLS' if self.tls else ''})"

    def associate(self, ae: AE) -> Association:
        """Request an association; over TLS when configured (server certificate verified
        against ``ca_file`` when given, the system store otherwise)."""
        tls_args = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            tls_args = (context, self.host)
        return ae.associate(
            self.host,
            self.port,
            ae_title=self.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )

    def send(self, paths: list[Path]) -> None:
        """C-STORE every file in one association; each must be answered with Success or a
        Storage warning."""
        datasets = [dcmread(path) for path in paths]
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for context in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
            ae.add_requested_context(*context)
        where = self.where()
        assoc = self._associate(ae, where)
        if not assoc.is_established:
            raise DispatchError(f"association with {where} was rejected or failed")
        keep_responses(assoc)  # several C-STOREs in a row: none may lose its answer
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code not in STORE_KEPT:
                    shown = "no response" if code is None else f"0x{code:04X}"
                    raise DispatchError(f"{where} answered C-STORE with {shown}")
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("sent %d object(s) to %s", len(datasets), where)

    def check(self) -> str:
        """C-ECHO the destination."""
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(self.timeout, 10.0)
        ae.add_requested_context(VERIFICATION)
        where = self.where()
        assoc = self._associate(ae, where)
        if not assoc.is_established:
            raise DispatchError(f"association with {where} was rejected or failed")
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        code = getattr(status, "Status", None)
        if code != SUCCESS:
            shown = "no response" if code is None else f"0x{code:04X}"
            raise DispatchError(f"{where} answered C-ECHO with {shown}")
        return f"C-ECHO to {where}: Success"

    def _associate(self, ae: AE, where: str) -> Association:
        try:
            return self.associate(ae)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise DispatchError(f"cannot set up the association with {where}: {exc}") from exc


def _no_delay(event: Event) -> None:
    """Turn Nagle's algorithm off: a C-STORE waits for its response before the next one, so
    delayed small writes cost a round of delayed ACKs per instance (measured here against
    Orthanc: 77-82 ms per 512x512 instance with Nagle, 54 ms without)."""
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
