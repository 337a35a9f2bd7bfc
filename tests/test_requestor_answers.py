"""A pynetdicom requestor sending request after request gets every answer the node sends.

pynetdicom's reactor thread can miss its pause and take the answer to a ``send_*`` call off
the message queue (see :mod:`node.delivery.responses`). Under load that happens when the
reactor is descheduled between waking from its checkpoint and marking itself unpaused, while
the caller is descheduled between sending and waiting. These tests force that interleaving
(each side is held a fraction of a second at exactly that point) so it happens on every
request, against a real listener on loopback: with :func:`keep_responses` every C-STORE and
C-ECHO is answered at once; the keeper's count proves the reactor really took the answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from node.catalogue.db import Catalogue, upgrade
from node.core.settings import DicomSettings
from node.delivery.responses import keep_responses
from node.dimse.allow_list import SourcePolicy, add_source
from node.dimse.listener import start_listener
from node.dimse.server import Listener
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.peers import free_port

REACTOR_LATE = 0.1  # the reactor, woken, is still marked paused this long
CALLER_LATE = 0.3  # the caller, having sent, starts waiting for the answer this late
DIMSE_TIMEOUT = 10.0


class _LateWake(threading.Event):
    """The reactor's checkpoint: after it opens, the reactor runs on only ``REACTOR_LATE``
    later, as a thread the scheduler leaves waiting."""

    def wait(self, timeout: float | None = None) -> bool:
        opened = super().wait(timeout)
        time.sleep(REACTOR_LATE)
        return opened


def _force_the_race(assoc: Association) -> None:
    checkpoint = _LateWake()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    get_msg = assoc.dimse.get_msg

    def late_get_msg(block: bool = False) -> Any:
        if block:  # the send_* call waiting for its answer
            time.sleep(CALLER_LATE)
        return get_msg(block)

    assoc.dimse.get_msg = late_get_msg  # type: ignore[method-assign]
    time.sleep(2 * REACTOR_LATE)  # the reactor is now in the forced rhythm


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    add_source(catalogue, "scu", "SCU", "127.0.0.1", actor="test")
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    settings = DicomSettings(host="127.0.0.1", port=free_port(), min_free_mb=0)
    server = start_listener(settings, ingestor, SourcePolicy(catalogue, False, 0))
    yield server
    server.shutdown()


def _associate(listener: Listener) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = DIMSE_TIMEOUT
    assoc = ae.associate("127.0.0.1", listener.server_address[1], ae_title="CURIA")
    assert assoc.is_established
    return assoc


def test_every_answer_reaches_its_call_when_the_reactor_takes_it(listener: Listener) -> None:
    assoc = _associate(listener)
    keeper = keep_responses(assoc)
    _force_the_race(assoc)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    try:
        for _ in range(3):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            started = time.monotonic()
            assert assoc.send_c_store(ds).Status == 0x0000
            assert assoc.send_c_echo().Status == 0x0000
            assert time.monotonic() - started < DIMSE_TIMEOUT / 2  # none waited it out
        assert assoc.is_established
        # Every request after the first met the stale pause: the reactor took its answer.
        assert keeper.handed_back >= 4, keeper.handed_back
    finally:
        if assoc.is_established:
            assoc.release()


def test_requests_from_the_peer_are_still_served_by_the_reactor(listener: Listener) -> None:
    """The keeper passes on what is not an answer: the reactor's own work is unchanged."""
    assoc = _associate(listener)
    keeper = keep_responses(assoc)
    served: list[object] = []
    keeper._serve = lambda msg, context_id: served.append(msg)
    request = type("Request", (), {"is_valid_response": False, "is_valid_request": True})()
    keeper(request, 1)
    assert served == [request]
    assert assoc.dimse.msg_queue.empty()
    assoc.release()
