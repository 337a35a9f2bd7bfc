"""Bad instances made from real ones: a seeded mutator of the sample CT for the fuzz tests.

Every mutant starts from a real file (the TotalSegmentator CT, as stored JPEG 2000 lossless,
or decoded and re-encoded as native explicit or implicit VR little endian) with a SOP
Instance UID of its own, so each one can be traced through the node. The mutations are
byte surgery on the encoded data set, guided by a map of its elements, and each records
its kind and what the node may answer to it:

- ``control``: the real instance, unchanged: Success, and stored.
- ``truncate-meta`` (STOW-RS only: DIMSE sends no file meta), ``truncate-header``,
  ``truncate-pixels``: the bytes end inside an element, its header or its value (or, in
  the file meta, between two elements after the transfer syntax: a readable file with no
  data set, so no UIDs).
- ``length-odd``: a value length one more or less than the value, so that whatever follows
  is read from the wrong offset (chosen where that offset cannot be read as an element).
- ``length-overrun``, ``length-huge``: a value length that runs past the end of the data set
  (huge: 0x7FFFFFFF and up, 0xFFFFFFFF excluded).
- ``length-undefined``: 0xFFFFFFFF where it is not allowed (a value that is not a sequence,
  or a value turned into UT with undefined length).
- ``bad-vr``: an explicit VR that is no VR at all.
- ``wrong-ts``: a transfer syntax in the file meta (over DIMSE: the presentation context)
  that does not match the encoding of the data set.
- ``bad-uid``: a Study, Series, SOP Instance or SOP Class UID that is too long, has letters,
  is empty, has zero-padded or empty components, path tricks or NUL bytes; sometimes in
  the request too.
- ``missing-uid``: one of those four UIDs removed.
- ``deep-nesting``: a well-formed private sequence nested deeper than the node reads
  (:data:`node.store.ingest.MAX_NESTING`).
- ``byte-flip``: random bytes of the data set changed. The node cannot tell every such
  instance from a real one (a flipped pixel is still a picture): any answer but a crash.

The expected answers: 0x0000 for controls; 0xC000 (Cannot understand) for bytes that are
not a well-formed data set in their transfer syntax (or nested too deep to read); 0xA900
(Data set does not match SOP class) for a well-formed data set whose identifying UIDs are
missing or invalid.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from node.store.ingest import MAX_NESTING
from tests.support.testdata import repaired_ct_series

SUCCESS = 0x0000
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
ANY_ANSWER = frozenset({SUCCESS, DATASET_DOES_NOT_MATCH, CANNOT_UNDERSTAND})

VR_32 = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
VRS = VR_32 | {
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN",
    "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US",
}  # fmt: skip
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
UID_TAGS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
BAD_UIDS = [
    "1." + ".".join(["123456789"] * 7),  # 71 characters
    "1.2.840." + "9" * 60,
    "1.2.abc.3",
    "1.2.3a",
    "",
    "1.2.03.4",
    "01.2.3",
    "1.2.00",
    "1..2",
    ".1.2",
    "1.2.",
    "../../etc/passwd",
    "..",
    "1.2/3",
    "1.2.3/../../4",
    "/tmp/x",
    "1.2\\1.3",  # two values
    "1.2\x003.4",
    "1.2.3\x00\x00.4",
    "1.2.3\n4",
    "1.2 .3",
    "1.2.\xb2",  # a character str.isdigit() accepts
    "1.2.\u0663",  # an Arabic-Indic digit
    "1.2.3" + "4" * 1000,
]  # fmt: skip

KINDS = (
    "control",
    "truncate-meta",
    "truncate-header",
    "truncate-pixels",
    "length-odd",
    "length-overrun",
    "length-huge",
    "length-undefined",
    "bad-vr",
    "wrong-ts",
    "bad-uid",
    "missing-uid",
    "deep-nesting",
    "byte-flip",
)
# Relative frequencies; STOW-RS gets every kind, DIMSE all but truncate-meta.
WEIGHTS = {
    "control": 8,
    "truncate-meta": 3,
    "truncate-header": 8,
    "truncate-pixels": 8,
    "length-odd": 8,
    "length-overrun": 7,
    "length-huge": 7,
    "length-undefined": 7,
    "bad-vr": 7,
    "wrong-ts": 8,
    "bad-uid": 12,
    "missing-uid": 6,
    "deep-nesting": 3,
    "byte-flip": 10,
}


@dataclass(frozen=True)
class Element:
    """One encoded element of a well-formed data set (offsets into its bytes)."""

    tag: int
    vr: str | None
    start: int  # its first byte
    length_at: int  # where its length field is
    length_size: int  # 2 or 4
    length: int  # as declared (UNDEFINED for undefined length)
    value_at: int
    end: int  # the byte after it (after its delimiter, for undefined length)
    items: tuple[Element, ...] = ()  # items of a sequence, fragments of pixel data


class _Reader:
    """Maps a well-formed data set; raises on anything else (it reads only the bases)."""

    def __init__(self, data: bytes, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit

    def elements(self, start: int, end: int | None, implicit: bool) -> tuple[list[Element], int]:
        found: list[Element] = []
        pos = start
        while end is None or pos < end:
            if end is None and pos >= len(self.data):
                break
            group, elem = struct.unpack_from("<HH", self.data, pos)
            tag = group << 16 | elem
            if tag == ITEM_END:
                return found, pos + 8
            if implicit:
                vr, length_at, size = None, pos + 4, 4
            else:
                vr = self.data[pos + 4 : pos + 6].decode("ascii")
                if vr not in VRS:
                    raise ValueError(f"not a VR at {pos}: {vr!r}")
                length_at, size = (pos + 8, 4) if vr in VR_32 else (pos + 6, 2)
            length = int.from_bytes(self.data[length_at : length_at + size], "little")
            value_at = length_at + size
            items: tuple[Element, ...] = ()
            if length == UNDEFINED:
                items_implicit = implicit or vr == "UN"
                item_list, after = self.items(value_at, None, items_implicit)
                items = tuple(item_list)
            else:
                after = value_at + length
                if vr == "SQ":
                    items = tuple(self.items(value_at, after, implicit)[0])
            found.append(Element(tag, vr, pos, length_at, size, length, value_at, after, items))
            pos = after
        return found, pos

    def items(self, start: int, end: int | None, implicit: bool) -> tuple[list[Element], int]:
        found: list[Element] = []
        pos = start
        while end is None or pos < end:
            tag = struct.unpack_from("<HH", self.data, pos)
            tag_value = tag[0] << 16 | tag[1]
            (length,) = struct.unpack_from("<L", self.data, pos + 4)
            if tag_value == SEQUENCE_END:
                return found, pos + 8
            if tag_value != ITEM:
                raise ValueError(f"not an item at {pos}")
            if length == UNDEFINED:
                _, after = self.elements(pos + 8, None, implicit)
            else:
                after = pos + 8 + length
            found.append(Element(ITEM, None, pos, pos + 4, 4, length, pos + 8, after))
            pos = after
        return found, pos


@dataclass(frozen=True)
class Base:
    """A real instance: its identity, transfer syntax, encoded data set and element map."""

    name: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes
    elements: tuple[Element, ...]

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == ImplicitVRLittleEndian

    @property
    def encapsulated(self) -> bool:
        return self.transfer_syntax == JPEG2000Lossless

    def element(self, tag: int) -> Element:
        return next(e for e in self.elements if e.tag == tag)

    @property
    def pixel_data(self) -> Element:
        return self.element(PIXEL_DATA)


def changed_at_random(data: bytes, rng: random.Random, first: int = 0, span: int = 2500) -> bytes:
    """``data`` with bytes from ``first`` to ``span`` changed blindly: one to three flipped,
    cut there, or up to eight inserted, as the rng picks."""
    changed = bytearray(data)
    action = rng.choice(["flip", "flip", "cut", "insert"])
    end = min(len(changed), span)
    if first >= end:
        return bytes(changed)
    where = rng.randrange(first, end)
    if action == "flip":
        for _ in range(rng.randrange(1, 4)):
            changed[rng.randrange(first, end)] = rng.randrange(256)
    elif action == "cut":
        del changed[where:]
    else:
        changed[where:where] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    return bytes(changed)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group, as a sender writes them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Mutant:
    """One instance to send, with what the node may answer to it."""

    index: int
    kind: str
    detail: str
    base: str
    sop_class_uid: str  # of the request (DIMSE) and the file meta
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # the data set as sent over DIMSE
    expected: frozenset[int]
    meta: bytes | None = None  # the whole Part 10 stream instead, where the meta is mutated
    dataset_sop_instance_uid: str | None = None  # what the data set says, where valid

    @property
    def part10(self) -> bytes:
        if self.meta is not None:
            return self.meta
        head = file_meta(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax)
        return head + self.dataset

    @property
    def dimse(self) -> bool:
        """Whether DIMSE can carry it (the file meta is not part of a C-STORE)."""
        return self.meta is None

    @property
    def must_fail(self) -> bool:
        return SUCCESS not in self.expected


@dataclass
class Mutator:
    """Deterministic: the same seed and bases give the same mutants, in the same order."""

    bases: list[Base]
    seed: int = 20261123
    rng: random.Random = field(init=False)
    counter: int = 0
    dimse: bool = False  # making mutants for DIMSE (no file meta is sent)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def mutants(self, count: int, dimse: bool) -> Iterator[Mutant]:
        self.dimse = dimse
        kinds = [k for k in KINDS if not (dimse and k == "truncate-meta")]
        weights = [WEIGHTS[k] for k in kinds]
        for _ in range(count):
            kind = self.rng.choices(kinds, weights)[0]
            yield self.mutant(kind)

    def mutant(self, kind: str) -> Mutant:
        self.counter += 1
        # Half the real series as stored, half the smaller native copies.
        encoding = self.rng.choice(["j2k", "j2k", "explicit", "implicit"])
        if kind == "bad-vr" and encoding == "implicit":
            encoding = "explicit"  # implicit VR has no VR to spoil
        base = self.rng.choice([b for b in self.bases if b.name.startswith(encoding)])
        sop_uid = unique_uid(base.sop_instance_uid, self.counter)
        data = bytearray(base.dataset)
        uid_element = base.element(UID_TAGS["SOPInstanceUID"])
        encoded = sop_uid.encode().ljust(uid_element.length, b"\x00")
        data[uid_element.value_at : uid_element.end] = encoded
        make = getattr(self, "_" + kind.replace("-", "_"))
        outcome = make(base, bytes(data), sop_uid)
        data_out, expected, detail = outcome[:3]
        extra = outcome[3] if len(outcome) > 3 else {}
        return Mutant(
            index=self.counter,
            kind=kind,
            detail=detail,
            base=base.name,
            sop_class_uid=extra.get("sop_class_uid", base.sop_class_uid),
            sop_instance_uid=extra.get("sop_instance_uid", sop_uid),
            transfer_syntax=extra.get("transfer_syntax", base.transfer_syntax),
            dataset=data_out,
            expected=expected,
            meta=extra.get("meta"),
            dataset_sop_instance_uid=extra.get("dataset_sop_instance_uid", sop_uid),
        )

    # --- the mutations: each returns (data set, expected answers, detail[, extras]) -----

    def _control(self, base: Base, data: bytes, sop: str) -> tuple:
        return data, frozenset({SUCCESS}), "unchanged"

    def _truncate_meta(self, base: Base, data: bytes, sop: str) -> tuple:
        whole = file_meta(base.sop_class_uid, sop, base.transfer_syntax)
        cut = self.rng.choice([0, self.rng.randrange(1, 132), self.rng.randrange(132, len(whole))])
        extra = {"meta": whole[:cut], "dataset_sop_instance_uid": None}
        # Cut between two elements after the transfer syntax, it is a file with an empty
        # data set: readable, and without the UIDs.
        ends = meta_element_ends(whole)
        readable = cut in ends.values() and cut >= ends[0x00020010]
        expected = DATASET_DOES_NOT_MATCH if readable else CANNOT_UNDERSTAND
        return b"", frozenset({expected}), f"cut at {cut} of {len(whole)}", extra

    def _truncate_header(self, base: Base, data: bytes, sop: str) -> tuple:
        # pynetdicom sends a file whose data set is shorter than one element header as one
        # with no data set at all: over DIMSE, keep that much.
        shortest = 8 if self.dimse else 1
        elements = [e for e in base.elements if e.tag != PIXEL_DATA and e.end > shortest]
        element = self.rng.choice(elements)
        cut = self.rng.randrange(max(element.start + 1, shortest), element.end)
        detail = f"cut at {cut} inside ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X})"
        return data[:cut], frozenset({CANNOT_UNDERSTAND}), detail

    def _truncate_pixels(self, base: Base, data: bytes, sop: str) -> tuple:
        pixels = base.pixel_data
        if self.rng.random() < 0.2:
            cut = self.rng.randrange(pixels.start + 1, pixels.value_at + 1)  # its header
        else:
            cut = self.rng.randrange(pixels.value_at + 1, pixels.end)
        return data[:cut], frozenset({CANNOT_UNDERSTAND}), f"cut at {cut} of {len(data)}"

    def _length_odd(self, base: Base, data: bytes, sop: str) -> tuple:
        candidates = []
        for element in [*base.elements, *base.pixel_data.items]:
            if element.length == UNDEFINED:
                continue
            for delta in (1, -1):
                if element.length + delta >= 0 and self._misread(base, data, element, delta):
                    candidates.append((element, delta))
        element, delta = self.rng.choice(candidates)
        detail = f"length {element.length}{delta:+d} at {element.start}"
        return _set_length(data, element, element.length + delta), INVALID, detail

    def _misread(self, base: Base, data: bytes, element: Element, delta: int) -> bool:
        """Whether moving the end of ``element`` by ``delta`` leaves bytes that cannot be
        read as the next element: past the end, a header cut short, an item tag that is
        not one, or (explicit VR) two bytes that are not a VR."""
        container = _container_end(base, element, len(data))
        pos = element.end + delta
        if pos > container or container - pos < 8:
            return True
        tag = int.from_bytes(data[pos : pos + 2], "little") << 16 | int.from_bytes(
            data[pos + 2 : pos + 4], "little"
        )
        if element.tag == ITEM:
            return tag not in (ITEM, SEQUENCE_END)
        if base.implicit:
            return False
        return data[pos + 4 : pos + 6] not in {vr.encode() for vr in VRS}

    def _length_overrun(self, base: Base, data: bytes, sop: str) -> tuple:
        wide = [e for e in [*base.elements, *base.pixel_data.items] if e.length_size == 4]
        element = self.rng.choice([e for e in wide if e.length != UNDEFINED])
        left = len(data) - element.value_at
        length = left + self.rng.choice([1, 2, self.rng.randrange(2, 100_000, 2)])
        detail = f"length {length} at {element.start}, {left} bytes left"
        return _set_length(data, element, length), INVALID, detail

    def _length_huge(self, base: Base, data: bytes, sop: str) -> tuple:
        wide = [e for e in [*base.elements, *base.pixel_data.items] if e.length_size == 4]
        element = self.rng.choice([e for e in wide if e.length != UNDEFINED])
        length = self.rng.choice([0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFF0])
        if self.rng.random() < 0.5:
            length = self.rng.randrange(0x7FFFFFFF, UNDEFINED)
        return _set_length(data, element, length), INVALID, f"length {length:#x}"

    def _length_undefined(self, base: Base, data: bytes, sop: str) -> tuple:
        """0xFFFFFFFF on a value that may not have it: in explicit VR an OB or UT (made
        one, if the element had a short length field); in implicit VR any non-sequence
        value whose first bytes are not an item tag."""
        plain = [e for e in base.elements if e.vr != "SQ" and not e.items and e.tag != PIXEL_DATA]
        if base.implicit:
            plain = [e for e in plain if e.length < 4 or data[e.value_at : e.value_at + 4] not in (
                b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0")]  # fmt: skip
            element = self.rng.choice(plain)
            return _set_length(data, element, UNDEFINED), INVALID, f"at {element.start}"
        element = self.rng.choice(plain)
        if element.length_size == 4:
            return (
                _set_length(data, element, UNDEFINED),
                INVALID,
                f"{element.vr} at {element.start}",
            )
        header = data[element.start : element.start + 4] + b"UT\x00\x00" + b"\xff" * 4
        mutated = data[: element.start] + header + data[element.value_at :]
        return mutated, INVALID, f"{element.vr} made UT at {element.start}"

    def _bad_vr(self, base: Base, data: bytes, sop: str) -> tuple:
        element = self.rng.choice(base.elements)
        vr = self.rng.choice(
            [b"\x00\x00", b"zz", b"A\x00", b"??", b"\xff\xff", b"  ", b"1 ", b"ob", b"QQ"]
        )
        mutated = data[: element.start + 4] + vr + data[element.start + 6 :]
        return mutated, INVALID, f"{vr!r} for {element.vr} at {element.start}"

    def _wrong_ts(self, base: Base, data: bytes, sop: str) -> tuple:
        others = [
            ts
            for ts in (
                ImplicitVRLittleEndian,
                ExplicitVRLittleEndian,
                ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian,
                JPEG2000Lossless,
            )
            if ts != base.transfer_syntax
            # native explicit VR data is also well-formed JPEG 2000 but for its pixel data
        ]
        ts = self.rng.choice(others)
        return (
            data,
            INVALID,
            f"{ts.name} for {UID(base.transfer_syntax).name}",
            {"transfer_syntax": ts},
        )

    def _bad_uid(self, base: Base, data: bytes, sop: str) -> tuple:
        name = self.rng.choice(list(UID_TAGS))
        value = self.rng.choice(BAD_UIDS)
        element = base.element(UID_TAGS[name])
        encoded = value.encode("utf-8")
        if len(encoded) % 2:
            encoded += b"\x00"
        mutated = _replace_value(data, element, encoded, base.implicit)
        extra: dict[str, object] = {}
        if name == "SOPInstanceUID":
            extra["dataset_sop_instance_uid"] = None
            # half the time the request carries it too, where pynetdicom can send it (not
            # empty, at most 64 characters, one value)
            sendable = 0 < len(value) <= 64 and value.isascii() and "\\" not in value
            if sendable and self.rng.random() < 0.5:
                extra["sop_instance_uid"] = value
        detail = f"{name}={value[:40]!r}"
        return mutated, frozenset({DATASET_DOES_NOT_MATCH}), detail, extra

    def _missing_uid(self, base: Base, data: bytes, sop: str) -> tuple:
        name = self.rng.choice(list(UID_TAGS))
        element = base.element(UID_TAGS[name])
        mutated = data[: element.start] + data[element.end :]
        extra = {"dataset_sop_instance_uid": None} if name == "SOPInstanceUID" else {}
        return mutated, frozenset({DATASET_DOES_NOT_MATCH}), name, extra

    def _deep_nesting(self, base: Base, data: bytes, sop: str) -> tuple:
        """A private sequence of sequences, each in the one before, deeper than the node
        reads (a recursive reader runs out of stack on it)."""
        depth = self.rng.choice([MAX_NESTING + 1, 200, 2000, 20000])
        vr = b"" if base.implicit else b"SQ\x00\x00"
        opening = b"\x09\x00\x99\x10" + vr + b"\xff" * 4 + b"\xfe\xff\x00\xe0" + b"\xff" * 4
        closing = b"\xfe\xff\x0d\xe0" + b"\x00" * 4 + b"\xfe\xff\xdd\xe0" + b"\x00" * 4
        after = next(e for e in base.elements if e.tag > 0x00091099)
        nested = opening * depth + closing * depth
        mutated = data[: after.start] + nested + data[after.start :]
        return mutated, INVALID, f"{depth} levels"

    def _byte_flip(self, base: Base, data: bytes, sop: str) -> tuple:
        mutated = bytearray(data)
        offsets = [self.rng.randrange(len(data)) for _ in range(self.rng.randint(1, 8))]
        for offset in offsets:
            mutated[offset] ^= self.rng.randrange(1, 256)
        extra = {"dataset_sop_instance_uid": None}  # a flip may have changed it
        return bytes(mutated), ANY_ANSWER, f"at {sorted(offsets)}", extra


INVALID = frozenset({CANNOT_UNDERSTAND})


def _set_length(data: bytes, element: Element, length: int) -> bytes:
    size = element.length_size
    if size == 2:
        length &= 0xFFFF
    field_ = length.to_bytes(size, "little")
    return data[: element.length_at] + field_ + data[element.length_at + size :]


def _replace_value(data: bytes, element: Element, value: bytes, implicit: bool) -> bytes:
    """``element`` with a new value and a length field to match (a 2-byte length field
    holds at most 65534 bytes, so a longer value is cut there)."""
    if element.length_size == 2:
        value = value[:65534]
    header = data[element.start : element.length_at]
    field_ = len(value).to_bytes(element.length_size, "little")
    return data[: element.start] + header + field_ + value + data[element.end :]


def _container_end(base: Base, element: Element, size: int) -> int:
    pixels = base.pixel_data
    if element.tag == ITEM and element in pixels.items:
        return pixels.end - 8  # the sequence delimiter ends the fragments
    return size


def unique_uid(model: str, number: int) -> str:
    """A valid UID as long as ``model``, its last component replaced by one made from
    ``number`` (so the encoded data set keeps its layout)."""
    head, _, last = model.rpartition(".")
    digits = str(number)
    if len(last) < len(digits) + 1:
        raise ValueError(f"{model} has too short a last component")
    return f"{head}.9{digits.rjust(len(last) - 1, '0')}"


def meta_element_ends(part10: bytes) -> dict[int, int]:
    """Where each element of the file meta group ends, by tag."""
    ends = {}
    pos = 132
    while pos + 8 <= len(part10) and part10[pos : pos + 2] == b"\x02\x00":
        tag = 0x00020000 | int.from_bytes(part10[pos + 2 : pos + 4], "little")
        vr = part10[pos + 4 : pos + 6].decode("ascii")
        if vr in VR_32:
            pos += 12 + int.from_bytes(part10[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(part10[pos + 6 : pos + 8], "little")
        ends[tag] = pos
    return ends


def dataset_offset(part10: bytes) -> int:
    """Where the data set starts: after the preamble, the prefix and the meta group."""
    return max(meta_element_ends(part10).values(), default=132)


def element_map(dataset: bytes, implicit: bool) -> list[Element]:
    """The top-level elements of a well-formed little endian data set."""
    elements, end = _Reader(dataset, implicit).elements(0, len(dataset), implicit)
    assert end == len(dataset), "not the well-formed data set it should be"
    return elements


def make_base(name: str, path: Path) -> Base:
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    dataset = raw[dataset_offset(raw) :]
    elements = element_map(dataset, ts == ImplicitVRLittleEndian)
    return Base(
        name,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        ts,
        dataset,
        tuple(elements),
    )


def native_copy(source: Path, dest: Path, implicit: bool) -> Path:
    """The real image decoded, every fourth pixel kept (128 x 128), written as native
    explicit or implicit VR little endian."""
    ds = dcmread(source)
    pixels = ds.pixel_array[::4, ::4].copy()
    del ds.PixelData
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(v) * 4 for v in ds.PixelSpacing]
    ds.add_new(PIXEL_DATA, "OW", pixels.tobytes())
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = ts
    for tag in [element.tag for element in ds if element.tag.is_private]:
        del ds[tag]  # private values have no VR to write in implicit VR
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return dest


def make_bases(folder: Path, label: str) -> list[Base]:
    """The real series as stored, plus four slices in each native encoding."""
    series = repaired_ct_series(folder / "ct", label)
    bases = [make_base(f"j2k-{i}", path) for i, path in enumerate(series)]
    for i, path in enumerate(series[::5]):
        for implicit in (False, True):
            kind = "implicit" if implicit else "explicit"
            copy = native_copy(path, folder / kind / path.name, implicit)
            bases.append(make_base(f"{kind}-{i}", copy))
    return bases
