"""DIMSE messages as bytes: command sets (group 0000, implicit VR little endian, PS3.7 E)
encoded and parsed with ``struct``, and the file meta that makes a received data set a Part
10 file (PS3.10 7.1) without decoding it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import node
from node.core.status import SUCCESS
from node.dimse.pdu import ABORT_INVALID_PARAMETER, AssociationAborted

IMPLEMENTATION_CLASS_UID = "2.25.137921735641477805350619179463649102399"
IMPLEMENTATION_VERSION_NAME = f"CURIA_NODE_{node.__version__.replace('.', '')}"[:16]

# DIMSE command fields, and the Command Data Set Type of a message without one (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101

# DIMSE-N requests the node serves as an SCP (PS3.7 10.3): MPPS and Storage Commitment
N_SET_RQ, N_ACTION_RQ, N_CREATE_RQ = 0x0120, 0x0130, 0x0140
NORMALISED_REQUESTS = frozenset((N_SET_RQ, N_ACTION_RQ, N_CREATE_RQ))


def _element(element: int, value: bytes) -> bytes:
    """A command element, implicit VR little endian, padded to even length."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def us(value: int) -> bytes:
    """A US command element's value (unsigned 16-bit, little endian)."""
    return struct.pack("<H", value)


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set: its elements behind the (0000,0000) group length."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def response(request: dict[int, bytes], status: int, comment: str = "") -> bytes:
    """The response to a request command: same SOP class, instance and message ID."""
    elements = [
        (0x0100, us(us_value(request, 0x0100) | 0x8000)),
        (0x0120, request.get(0x0110, us(0))),
        (0x0800, us(NO_DATA_SET)),
        (0x0900, us(status)),
    ]
    for tag in (0x0002, 0x1000):  # Affected SOP Class / Instance UID
        if tag in request:
            elements.append((tag, request[tag]))
    if comment and status != SUCCESS:
        text = comment.encode("ascii", "replace")[:64]
        elements.append((0x0902, text if len(text) % 2 == 0 else text + b" "))
    return command_set(elements)


def normalised_response(
    request: dict[int, bytes], status: int, comment: str = "", instance_uid: str = ""
) -> bytes:
    """The response to an N-CREATE, N-SET or N-ACTION (PS3.7 10.3), without a data set.

    Its Affected SOP Class / Instance UID are the request's Requested ones (N-SET,
    N-ACTION) or Affected ones (N-CREATE), or ``instance_uid`` where the SCP created it.
    """
    command = us_value(request, 0x0100)
    sop_class = request.get(0x0002) or request.get(0x0003, b"")
    sop_instance = instance_uid.encode() or request.get(0x1000) or request.get(0x1001, b"")
    elements = [
        (0x0002, sop_class),
        (0x0100, us(command | 0x8000)),
        (0x0120, request.get(0x0110, us(0))),
        (0x0800, us(NO_DATA_SET)),
        (0x0900, us(status)),
    ]
    if sop_instance:
        elements.append((0x1000, sop_instance))
    if command == N_ACTION_RQ and 0x1008 in request:
        elements.append((0x1008, request[0x1008]))  # Action Type ID
    if comment and status != SUCCESS:
        text = comment.encode("ascii", "replace")[:64]
        elements.append((0x0902, text if len(text) % 2 == 0 else text + b" "))
    return command_set(elements)


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set (group 0000, implicit VR little endian)."""
    elements: dict[int, bytes] = {}
    offset, size = 0, len(data)
    while offset < size:
        if offset + 8 > size:
            raise AssociationAborted("a command element is cut short", ABORT_INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > size:
            raise AssociationAborted("a malformed command set", ABORT_INVALID_PARAMETER)
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    if 0x0100 not in elements:
        raise AssociationAborted("a command set without a command field", ABORT_INVALID_PARAMETER)
    return elements


def us_value(elements: dict[int, bytes], tag: int) -> int:
    value = elements.get(tag, b"")
    if len(value) < 2:
        raise AssociationAborted(
            f"command element (0000,{tag:04X}) is not a US", ABORT_INVALID_PARAMETER
        )
    return int(struct.unpack_from("<H", value)[0])


def uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One file meta element, explicit VR little endian (UI padded with NUL, text with a
    space)."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


_IMPLEMENTATION = _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()) + (
    _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode())
)


def file_meta(sop_class: bytes, sop_instance: bytes, syntax: str, source_ae: str) -> bytes:
    """The preamble and file meta (PS3.10 7.1) for a data set received over the network.

    The UIDs are written as the command carried them: whether they are valid is for the
    ingest checks to say, with their own status codes.
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", sop_class.rstrip(b"\x00 ")),
            _meta_element(0x0003, b"UI", sop_instance.rstrip(b"\x00 ")),
            _meta_element(0x0010, b"UI", syntax.encode()),
            _IMPLEMENTATION,
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
        )
    )
    group = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(elements))
    return _PREAMBLE + group + elements
