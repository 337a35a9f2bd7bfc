"""The node's DIMSE sends: associations to a real Orthanc."""

from __future__ import annotations

import socket

from pynetdicom import AE

from node.delivery.dimse import DimseDestination
from tests.support.peers import Orthanc


def test_sends_with_nagle_off(orthanc: Orthanc) -> None:
    destination = DimseDestination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    ae = AE(ae_title="CURIA")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = destination.associate(ae)
    try:
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
