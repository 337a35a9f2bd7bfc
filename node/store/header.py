"""The header of a received instance: what the node reads of it, and whether it is a
well-formed Part 10 stream at all.

One pass of :func:`node.store.structure.scan` checks the structure and keeps the raw
values of the header's attributes; plain ASCII values are decoded here, the rest by
pydicom. A stream that cannot be read is refused with the status that says why
(:class:`RejectedInstance`), before anything is stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileDataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)

from node.core.status import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS
from node.core.uids import InvalidUID, is_valid_uid, validate_uid
from node.store.structure import Buffer, Malformed, Scan, scan, scan_data_set, scan_head


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    # str() of the descriptive attributes (_TEXTS) present and not empty, by keyword
    texts: dict[str, str]
    instance_number: int | None


class RejectedInstance(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- is it a well-formed Part 10 stream? ---------------------------------------------------

_CHARSET = 0x00080005
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TEXTS = (  # descriptive attributes kept for the study and series rows
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
)
_HEADER_TAGS = [*_UIDS, *_TEXTS, "InstanceNumber"]  # what the node reads of a header
_HEADER_TAG_SET = frozenset(int(Tag(name)) for name in _HEADER_TAGS) | {_CHARSET}
# (tag, keyword, VR) of each header value :func:`_quick_header` decodes itself.
_QUICK = tuple(
    (int(Tag(name)), name, dictionary_VR(name).encode())
    for name in (*_UIDS, *_TEXTS, "InstanceNumber")
)
# Character sets whose decoders read printable ASCII as ASCII, as pydicom names them:
# values of LO and SH made of such bytes decode the same under each.
_ASCII_CHARSETS = frozenset(
    {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 144", "ISO_IR 192", "GB18030", "GBK"}
)
_INTEGER = re.compile(r" *[+-]?[0-9]+")


def check_structure(source: bytes | bytearray | Path | BinaryIO) -> None:
    """Refuse (0xC000) a stream that is not a well-formed Part 10 file in the transfer
    syntax its file meta names (:func:`node.store.structure.scan`)."""
    _scan(source, frozenset())


def _scan(source: bytes | bytearray | Path | BinaryIO, wanted: frozenset[int]) -> Scan:
    try:
        return scan(source, wanted)
    except Malformed as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a well-formed DICOM file: {exc}") from None
    except OSError as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc


def parse_header(source: bytes | bytearray | Path | BinaryIO, whole: bool = True) -> Dataset:
    """The header (no pixel data) of Part 10 bytes or a file, or why it cannot be read.

    The whole stream is checked first (:func:`check_structure`): pydicom reads only the
    header, and reads damaged bytes leniently, so without the check a file cut inside its
    pixel data, or one whose lengths or VRs are garbage, could be stored as received.
    ``whole=False`` skips the check, for bytes known to be cut and refused anyway (a STOW-RS
    part over the size limit), whose header still names the instance in the answer.
    """
    in_memory = isinstance(source, bytes | bytearray)
    if whole:
        check_structure(source)
    try:
        ds = dcmread(
            BytesIO(source) if isinstance(source, bytes | bytearray) else source,
            stop_before_pixels=True,
            specific_tags=_HEADER_TAGS,
        )
    except Exception as exc:  # whatever the parser trips on, these bytes are not readable
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    if in_memory and isinstance(ds, FileDataset):
        ds.buffer = None  # read in full already; keep no copy of the instance's bytes
    return ds


def header_from(ds: Dataset) -> InstanceHeader:
    """The identifying attributes of a parsed header, every UID validated."""
    try:
        for _ in ds:  # decode every value read now: a bad one is refused, not met later
            pass
    except Exception as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    try:
        tsuid = validate_uid(str(ds.file_meta.get("TransferSyntaxUID", "")), "TransferSyntaxUID")
        sop_class, sop_instance, study, series = [
            validate_uid(str(ds.get(name, "") or ""), name) for name in _UIDS
        ]
    except InvalidUID as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    texts = {}
    for name in _TEXTS:
        value = ds.get(name)
        if value not in (None, ""):
            texts[name] = str(value)
    return InstanceHeader(
        sop_class,
        sop_instance,
        study,
        series,
        transfer_syntax_uid=tsuid,
        texts=texts,
        instance_number=_instance_number(ds),
    )


def read_header(data: bytes) -> InstanceHeader:
    """Parse the identifying attributes of a Part 10 byte string, validating every UID.

    One pass checks the structure and keeps the header's raw values; those that are plain
    ASCII in an encoding pydicom reads the same way are decoded here (pydicom would decode
    them to the same strings), anything else is left to pydicom's reader."""
    found = _scan(data, _HEADER_TAG_SET)
    header = _quick_header(found)
    if header is not None:
        return header
    return header_from(parse_header(data, whole=False))  # the structure is checked already


def header_ahead(start: Buffer, transfer_syntax: str) -> tuple[InstanceHeader, int] | None:
    """What :func:`read_header` would make of a Part 10 stream in ``transfer_syntax``
    whose data set begins with ``start``, and the data set's length for which that holds
    (:func:`node.store.structure.scan_head`); None where the start does not settle it, or
    its header needs pydicom, or would be refused: :func:`read_header` of the whole then
    says so, after its last byte."""
    head = scan_head(start, transfer_syntax, _HEADER_TAG_SET)
    if head is None:
        return None
    try:
        header = _quick_header(head[0])
    except RejectedInstance:
        return None
    return None if header is None else (header, head[1])


def header_of_data_set(data_set: Buffer, transfer_syntax: str) -> InstanceHeader | None:
    """What :func:`read_header` would make of a Part 10 stream whose file meta, well
    formed, names ``transfer_syntax`` and is followed by ``data_set``, read without
    joining the two (:func:`node.store.structure.scan_data_set`): for a data set whose
    start did not settle its header (:func:`header_ahead`: encapsulated pixel data,
    elements after the pixel data). None where the data set would be refused, or its
    header needs pydicom, or it starts with group 0002: :func:`read_header` of the whole
    then says so."""
    if not _valid(transfer_syntax):
        return None
    try:
        found = scan_data_set(data_set, transfer_syntax, _HEADER_TAG_SET)
        return None if found is None else _quick_header(found)
    except (Malformed, RejectedInstance):
        return None


def _quick_header(found: Scan) -> InstanceHeader | None:
    """The header :func:`header_from` would make of pydicom's reading of the same bytes,
    or None where decoding it needs pydicom (an encoding pydicom could read otherwise, a
    character set or value outside plain ASCII, a VR other than the dictionary's, a
    multi-valued or non-integer value)."""
    if not found.plain:
        return None
    if (found.implicit, found.little_endian) != _pydicom_encoding(found.transfer_syntax):
        return None
    elements = found.elements
    charset = elements.get(_CHARSET)
    if charset is not None:
        vr, raw = charset
        if vr not in (None, b"CS") or _plain(raw) not in _ASCII_CHARSETS:
            return None
    values: dict[str, str] = {}
    for tag, name, expected in _QUICK:
        element = elements.get(tag)
        if element is None:
            continue
        vr, raw = element
        if vr is not None and vr != expected:
            return None
        text = _plain(raw)
        if text is None:
            return None
        values[name] = text.strip() if expected == b"UI" else text  # as pydicom's UID()
    number = values.get("InstanceNumber", "")
    instance_number: int | None = None
    if number.strip():
        if not _INTEGER.fullmatch(number):
            return None
        instance_number = int(number)
    try:
        tsuid = _repeated_uid(found.transfer_syntax, "TransferSyntaxUID")
        sop_class = _repeated_uid(values.get("SOPClassUID", ""), "SOPClassUID")
        sop_instance = validate_uid(values.get("SOPInstanceUID", ""), "SOPInstanceUID")
        study = _repeated_uid(values.get("StudyInstanceUID", ""), "StudyInstanceUID")
        series = _repeated_uid(values.get("SeriesInstanceUID", ""), "SeriesInstanceUID")
    except InvalidUID as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    texts = {name: values[name] for name in _TEXTS if values.get(name)}
    return InstanceHeader(
        sop_class,
        sop_instance,
        study,
        series,
        transfer_syntax_uid=tsuid,
        texts=texts,
        instance_number=instance_number,
    )


@lru_cache(maxsize=1024)
def _valid(uid: str) -> bool:
    return is_valid_uid(uid)


def _repeated_uid(value: str, name: str) -> str:
    """:func:`validate_uid` for a UID that most instances share with the one before
    (a series', a study's, a SOP class, a transfer syntax): remembered once valid."""
    return value if _valid(value) else validate_uid(value, name)


def _plain(raw: bytes) -> str | None:
    """A value as pydicom decodes a single-valued UI, CS, DA, IS, SH or LO (trailing
    padding and NULs removed), if it is printable ASCII without a backslash; else None."""
    try:
        text = raw.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        return None
    # Printable ASCII is 0x20-0x7E, exactly what str.isprintable() allows of ASCII.
    return text if text.isprintable() and "\\" not in text else None


def _pydicom_encoding(syntax: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) as pydicom's reader takes them from a file meta's
    transfer syntax; None where it inflates, or knows a private syntax."""
    if syntax == DeflatedExplicitVRLittleEndian or syntax in PrivateTransferSyntaxes:
        return None
    if syntax == ImplicitVRLittleEndian:
        return True, True
    if syntax == ExplicitVRBigEndian:
        return False, False
    return False, True  # explicit VR little endian, and every other syntax


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
