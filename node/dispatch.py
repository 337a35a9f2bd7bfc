"""Dispatch: sending DICOM objects to destinations.

One handler per destination type, looked up in a registry, so new transports (STOW-RS,
Orthanc REST) slot in without touching callers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE

log = logging.getLogger(__name__)

# C-STORE statuses that mean the archive kept the object (Success and the Warnings).
ACCEPTED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class DispatchError(RuntimeError):
    """Sending failed; the message says where and why, without patient data."""


@dataclass(frozen=True)
class DimseDestination:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "CURIA"
    timeout: float = 30.0


Handler = Callable[[Any, list[Path]], None]
_HANDLERS: dict[type, Handler] = {}


def handler_for(kind: type) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        _HANDLERS[kind] = func
        return func

    return register


def send(destination: Any, paths: list[Path]) -> None:
    """Send every file in ``paths`` to ``destination`` or raise :class:`DispatchError`."""
    try:
        handler = _HANDLERS[type(destination)]
    except KeyError:
        raise DispatchError(
            f"no handler for destination type {type(destination).__name__}"
        ) from None
    handler(destination, paths)


@handler_for(DimseDestination)
def send_dimse(destination: DimseDestination, paths: list[Path]) -> None:
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
    for context in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(*context)
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DispatchError(f"association with {where} was rejected or failed")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in ACCEPTED_STATUSES:
                shown = "no response" if code is None else f"0x{code:04X}"
                raise DispatchError(f"{where} answered C-STORE with {shown}")
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d object(s) to %s", len(datasets), where)
