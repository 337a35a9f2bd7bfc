"""Data sets encoded by hand, for the tests of the structure walk and the header read.

Little endian unless asked: elements in explicit or implicit VR, items, the identity of a
CT instance, a Part 10 stream around a data set, and pydicom's own test files.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom.data
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.store.structure import _Walk
from tests.support.fuzzing import file_meta

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1"
UNDEFINED = 0xFFFFFFFF
ITEM = b"\xfe\xff\x00\xe0"
ITEM_END = b"\xfe\xff\x0d\xe0" + b"\x00" * 4
SEQUENCE_END = b"\xfe\xff\xdd\xe0" + b"\x00" * 4
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
PYDICOM_FILES = sorted(
    path
    for path in (Path(pydicom.data.__file__).parent / "test_files").glob("*")
    if path.is_file() and path.read_bytes()[128:132] == b"DICM"
)


def explicit(
    tag: int, vr: str, value: bytes, length: int | None = None, big: bool = False
) -> bytes:
    length = len(value) if length is None else length
    order = ">" if big else "<"
    head = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_VRS:
        return head + b"\x00\x00" + struct.pack(f"{order}L", length) + value
    return head + struct.pack(f"{order}H", length) + value


def implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length) + value


def item(content: bytes, defined: bool = True) -> bytes:
    if defined:
        return ITEM + struct.pack("<L", len(content)) + content
    return ITEM + b"\xff" * 4 + content + ITEM_END


IDENTITY = (
    explicit(0x00080016, "UI", CTImageStorage.encode())
    + explicit(0x00080018, "UI", SOP_INSTANCE.encode() + b"\x00")
    + explicit(0x00080060, "CS", b"CT")
)
IDENTITY_IMPLICIT = (
    implicit(0x00080016, CTImageStorage.encode())
    + implicit(0x00080018, SOP_INSTANCE.encode() + b"\x00")
    + implicit(0x00080060, b"CT")
)


def part10(dataset: bytes, syntax: str = ExplicitVRLittleEndian) -> bytes:
    return file_meta(CTImageStorage, SOP_INSTANCE, syntax) + dataset


def meta_and_data_set(data: bytes) -> tuple[str, bytes]:
    """A Part 10 stream's transfer syntax and its data set (what a receiver gets)."""
    meta_end, syntax = _Walk(data, frozenset())._meta()
    return syntax, data[meta_end:]
