"""The one-pass structure check (:mod:`node.store.structure`) and the header read from it.

The header :func:`node.store.header.read_header` builds from the scan must be the one pydicom's
reader gives (:func:`parse_header` then :func:`header_from`), refusals included: the tests
compare the two over pydicom's test files and over values and bytes changed on purpose.
"""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node.core.status import CANNOT_UNDERSTAND
from node.store.header import (
    _ASCII_CHARSETS,
    _HEADER_TAG_SET,
    _HEADER_TAGS,
    InstanceHeader,
    RejectedInstance,
    _quick_header,
    header_ahead,
    header_from,
    parse_header,
    read_header,
)
from node.store.structure import MAX_NESTING, Malformed, scan
from tests.support.encoding import (
    IDENTITY,
    IDENTITY_IMPLICIT,
    ITEM,
    ITEM_END,
    LONG_VRS,
    PYDICOM_FILES,
    SEQUENCE_END,
    SOP_INSTANCE,
    UNDEFINED,
    explicit,
    implicit,
    item,
    meta_and_data_set,
    part10,
)
from tests.support.fuzzing import changed_at_random, element_map


def refused(data: bytes | Path) -> bool:
    try:
        scan(data)
    except Malformed:
        return True
    return False


# --- well-formed streams ---------------------------------------------------------------------


def test_a_native_data_set_is_well_formed_and_its_header_elements_kept() -> None:
    pixels = explicit(0x7FE00010, "OW", b"\x00\x01" * 8)
    found = scan(part10(IDENTITY + pixels), _HEADER_TAG_SET)
    assert (found.transfer_syntax, found.implicit, found.little_endian) == (
        ExplicitVRLittleEndian,
        False,
        True,
    )
    assert found.plain
    assert found.elements == {
        0x00080016: (b"UI", CTImageStorage.encode()),
        0x00080018: (b"UI", SOP_INSTANCE.encode() + b"\x00"),
        0x00080060: (b"CS", b"CT"),
    }


def test_elements_after_the_pixel_data_are_checked_but_not_kept() -> None:
    """pydicom's header stops at the pixel data: so does what the scan keeps."""
    tail = explicit(0x7FE00010, "OW", b"\x00" * 4) + explicit(0xFFFCFFFC, "OB", b"\x00" * 2)
    found = scan(part10(IDENTITY + tail + explicit(0x00080060, "CS", b"MR")), _HEADER_TAG_SET)
    assert found.elements[0x00080060] == (b"CS", b"CT")
    assert refused(part10(IDENTITY + tail + explicit(0x00080060, "CS", b"MR", length=40)))


def test_odd_lengths_are_read_as_declared() -> None:
    assert not refused(part10(IDENTITY + explicit(0x00100010, "PN", b"ABC")))
    data = part10(IDENTITY_IMPLICIT + implicit(0x00100010, b"ABC"), ImplicitVRLittleEndian)
    assert not refused(data)


def test_sequences_of_defined_and_undefined_length() -> None:
    inner = explicit(0x00081150, "UI", CTImageStorage.encode())
    defined = explicit(0x00081140, "SQ", item(inner) + item(inner))
    undefined = explicit(0x00081115, "SQ", item(inner, False) + item(inner), UNDEFINED)
    assert not refused(part10(IDENTITY + defined + undefined + SEQUENCE_END))
    empty = explicit(0x00081140, "SQ", b"", UNDEFINED) + SEQUENCE_END
    assert not refused(part10(IDENTITY + empty))


def test_an_implicit_vr_data_set() -> None:
    sequence = implicit(0x00081140, item(implicit(0x00081150, b"1.2\x00"), False), UNDEFINED)
    data = part10(IDENTITY_IMPLICIT + sequence + SEQUENCE_END, ImplicitVRLittleEndian)
    found = scan(data, _HEADER_TAG_SET)
    assert found.implicit and found.plain
    assert [vr for vr, _ in found.elements.values()] == [None, None, None]


def test_a_big_endian_data_set() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Rows = CTImageStorage, SOP_INSTANCE, 2
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = False, False
    write_dataset(buffer, ds)
    data = part10(buffer.getvalue(), ExplicitVRBigEndian)
    found = scan(data, _HEADER_TAG_SET)
    assert not found.little_endian and found.plain
    assert str(parse_header(data).SOPInstanceUID) == SOP_INSTANCE


def test_un_of_undefined_length_is_read_as_implicit_vr_items() -> None:
    content = item(implicit(0x00081150, b"1.2\x00"), False)
    un = explicit(0x00091010, "UN", content, UNDEFINED) + SEQUENCE_END
    found = scan(part10(IDENTITY + un), _HEADER_TAG_SET)
    assert not found.plain  # pydicom may read UN items otherwise: it reads this header itself
    assert str(parse_header(part10(IDENTITY + un)).Modality) == "CT"


def test_a_transfer_syntax_pydicom_does_not_know_is_explicit_vr_little_endian() -> None:
    assert not refused(part10(IDENTITY, "1.2.3.4.5.6"))
    assert refused(part10(IDENTITY_IMPLICIT, "1.2.3.4.5.6"))


# --- damaged streams -------------------------------------------------------------------------


def test_every_cut_inside_an_element_is_refused() -> None:
    sequence = explicit(
        0x00081115, "SQ", item(explicit(0x00081150, "UI", b"1.2\x00"), False), UNDEFINED
    )
    dataset = IDENTITY + sequence + SEQUENCE_END + explicit(0x7FE00010, "OW", b"\x01" * 32)
    data = part10(dataset)
    start = len(data) - len(dataset)
    boundaries = {start + e.start for e in element_map(dataset, implicit=False)} | {len(data)}
    # the file meta may end after its transfer syntax: no data set is a well-formed one
    meta = element_map(data[132:start], implicit=False)
    boundaries |= {132 + e.end for e in meta if e.tag >= 0x00020010}
    for cut in range(len(data)):
        assert refused(data[:cut]) != (cut in boundaries), f"cut at {cut}"


@pytest.mark.parametrize(
    "dataset",
    [
        IDENTITY + explicit(0x00100010, "PN", b"AB", length=3),  # one byte past the end
        IDENTITY + explicit(0x00100010, "PN", b"ABC", length=2),  # one byte left over
        IDENTITY + explicit(0x00100010, "PN", b"ABCD", length=3) + IDENTITY,  # misread after
        IDENTITY + explicit(0x7FE00010, "OW", b"\x00" * 4, length=0x7FFFFFFF),
        IDENTITY + explicit(0x00100010, "zz", b"AB"),  # no VR
        IDENTITY + explicit(0x00100010, "LO", b"", length=0xFFFF) + b"\xff\xff",
        IDENTITY + explicit(0x00080060, "UT", b"CT", length=UNDEFINED),  # undefined, not a SQ
        IDENTITY + explicit(0x00081140, "SQ", explicit(0x00081150, "UI", b"1.2\x00")),  # no item
        IDENTITY + explicit(0x00081140, "SQ", item(b"", False), UNDEFINED),  # no delimiter
        IDENTITY + explicit(0x00081140, "SQ", ITEM + b"\xff" * 4, UNDEFINED) + SEQUENCE_END,
        IDENTITY + explicit(0x00081140, "SQ", item(b"\x00" * 9)),  # item of garbage
        IDENTITY + explicit(0x00081140, "SQ", ITEM + struct.pack("<L", 40) + b"\x00" * 8),
        IDENTITY + ITEM_END,  # a delimiter among elements
        IDENTITY + SEQUENCE_END,
        IDENTITY + b"\x08\x00",  # half an element header
    ],
)
def test_damaged_lengths_and_values_are_refused(dataset: bytes) -> None:
    assert refused(part10(dataset))


def test_explicit_vr_bytes_under_implicit_vr_are_refused() -> None:
    assert refused(part10(IDENTITY, ImplicitVRLittleEndian))


def test_sequences_nested_past_the_limit_are_refused() -> None:
    def nested(depth: int) -> bytes:
        opening = explicit(0x00091099, "SQ", b"", UNDEFINED) + ITEM + b"\xff" * 4
        return IDENTITY + opening * depth + (ITEM_END + SEQUENCE_END) * depth

    assert not refused(part10(nested(MAX_NESTING)))
    assert refused(part10(nested(MAX_NESTING + 1)))
    assert refused(part10(nested(20000)))  # no RecursionError


def test_the_file_meta_is_checked() -> None:
    good = part10(IDENTITY)
    assert refused(good[:100])
    assert refused(b"\x00" * 128 + b"DICN" + good[132:])
    meta_end = len(good) - len(IDENTITY)
    assert refused(good[: meta_end - 5])  # cut inside the transfer syntax's group
    no_syntax = b"\x00" * 128 + b"DICM" + explicit(0x00020001, "OB", b"\x00\x01") + IDENTITY
    assert refused(no_syntax)
    bad_syntax = b"\x00" * 128 + b"DICM" + explicit(0x00020010, "UI", b"1.2.x\x00") + IDENTITY
    assert refused(bad_syntax)
    bad_vr = good[:132] + explicit(0x00020001, "QQ", b"\x00\x01") + good[132:]
    assert refused(bad_vr)


# --- deflated and encapsulated ---------------------------------------------------------------


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def test_a_deflated_data_set_is_checked_inflated() -> None:
    pixels = explicit(0x7FE00010, "OW", b"\x00\x01" * 8)
    data = part10(deflate(IDENTITY + pixels), DeflatedExplicitVRLittleEndian)
    found = scan(data, _HEADER_TAG_SET)
    assert found.deflated and not found.plain  # pydicom reads a deflated header itself
    assert str(parse_header(data).Modality) == "CT"
    assert refused(data[:-4])  # the deflate stream cut short
    assert refused(part10(IDENTITY + pixels, DeflatedExplicitVRLittleEndian))  # not deflated
    damaged = deflate(IDENTITY + explicit(0x7FE00010, "OW", b"\x00" * 4, length=16))
    assert refused(part10(damaged, DeflatedExplicitVRLittleEndian))


def test_a_real_deflated_file() -> None:
    path = Path(get_testdata_file("image_dfl.dcm"))
    assert not refused(path)
    assert parse_header(path).SOPInstanceUID == dcmread(path).SOPInstanceUID


def encapsulated(*frames: bytes) -> bytes:
    return explicit(0x7FE00010, "OB", encapsulate(list(frames)), UNDEFINED) + SEQUENCE_END


def test_encapsulated_pixel_data() -> None:
    good = part10(IDENTITY + encapsulated(b"\x01\x02", b"\x03\x04\x05\x06"), JPEG2000Lossless)
    assert not refused(good)
    assert refused(good[:-8])  # no sequence delimiter
    assert refused(good[:-10])  # a fragment cut short
    # native pixel data where the transfer syntax says encapsulated, and the other way round
    assert refused(part10(IDENTITY + explicit(0x7FE00010, "OB", b"\x00" * 4), RLELossless))
    native = part10(IDENTITY + encapsulated(b"\x01\x02"), ExplicitVRLittleEndian)
    assert refused(native)
    # a fragment of undefined length, or something other than a fragment
    bad = explicit(0x7FE00010, "OB", ITEM + b"\xff" * 4, UNDEFINED) + SEQUENCE_END
    assert refused(part10(IDENTITY + bad, JPEG2000Lossless))
    odd = explicit(0x7FE00010, "OB", ITEM + struct.pack("<L", 0) + b"\x01" * 8, UNDEFINED)
    assert refused(part10(IDENTITY + odd + SEQUENCE_END, JPEG2000Lossless))


# --- the sources it reads, and what it hands pydicom -----------------------------------------


def test_a_file_is_read_in_place_and_a_stream_left_where_it_was(tmp_path: Path) -> None:
    data = part10(IDENTITY)
    path = tmp_path / "part.dcm"
    path.write_bytes(data)
    assert scan(path, _HEADER_TAG_SET).elements == scan(data, _HEADER_TAG_SET).elements
    path.write_bytes(b"")
    assert refused(path)
    path.write_bytes(data[:-1])
    assert refused(path)
    stream = BytesIO(b"junk" + data)
    stream.seek(4)
    scan(stream)
    assert stream.tell() == 4
    assert not refused(bytearray(data)) and not refused(memoryview(data))


def test_headers_pydicom_could_read_otherwise_are_left_to_pydicom() -> None:
    private = implicit(0x00091010, item(implicit(0x00081150, b"1.2\x00"), False), UNDEFINED)
    data = part10(IDENTITY_IMPLICIT + private + SEQUENCE_END, ImplicitVRLittleEndian)
    assert not scan(data, _HEADER_TAG_SET).plain  # a private tag: pydicom guesses its VR
    command = explicit(0x00000002, "UI", CTImageStorage.encode()) + IDENTITY
    assert not scan(part10(command), _HEADER_TAG_SET).plain  # read as a command set
    assert not scan(part10(b""), _HEADER_TAG_SET).plain  # no data set: pydicom guesses


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "rtplan.dcm",
        "JPEG2000.dcm",
        "nested_priv_SQ.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "SC_rgb_rle.dcm",
        "image_dfl.dcm",
    ],
)
def test_the_header_is_what_pydicom_reads(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    ours = parse_header(data)
    theirs = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    assert [(e.tag, e.VR, e.value) for e in ours] == [(e.tag, e.VR, e.value) for e in theirs]
    assert ours.file_meta == theirs.file_meta
    assert identity(ours) == identity(theirs)


def identity(ds: Dataset) -> tuple[object, ...]:
    try:
        header = header_from(ds)
    except RejectedInstance as exc:
        return (exc.status, exc.reason)
    return (header.sop_instance_uid, header.transfer_syntax_uid, header.instance_number)


def test_a_value_pydicom_cannot_decode_is_refused_as_before() -> None:
    """Decoding is pydicom's, on the same raw elements: what it refuses, the node refuses."""
    bad_charset = IDENTITY + explicit(0x00080005, "CS", b"ISO_IR 999")
    assert parse_header(part10(bad_charset)).SOPInstanceUID == SOP_INSTANCE  # a warning
    data = part10(IDENTITY + explicit(0x00100020, "US", b"abc"))  # 3 bytes of US
    assert scan(data, _HEADER_TAG_SET).plain
    with pytest.raises(RejectedInstance) as refusal:
        header_from(parse_header(data))
    assert refusal.value.status == CANNOT_UNDERSTAND
    with pytest.raises(Exception, match="even multiple"):
        header_from(dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS))


def test_no_file_meta_is_refused() -> None:
    with pytest.raises(RejectedInstance) as refusal:
        parse_header(b"\x00" * 128 + b"DICM" + IDENTITY)
    assert refusal.value.status == CANNOT_UNDERSTAND


# --- the header read without pydicom is pydicom's ------------------------------------------


def outcome(read: Callable[[bytes], InstanceHeader]) -> Callable[[bytes], tuple[object, ...]]:
    def run(data: bytes) -> tuple[object, ...]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = read(data)
        except RejectedInstance as exc:
            return ("refused", exc.status, exc.reason)
        return (
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            header.series_instance_uid,
            header.transfer_syntax_uid,
            header.texts,
            header.instance_number,
        )

    return run


quick = outcome(read_header)
pydicoms = outcome(lambda data: header_from(parse_header(data)))


def same_as_pydicom(data: bytes) -> None:
    assert quick(data) == pydicoms(data)


def took_the_quick_path(data: bytes) -> bool:
    return _quick_header(scan(data, _HEADER_TAG_SET)) is not None


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda path: path.name)
def test_pydicoms_test_files_read_as_pydicom_reads_them(path: Path) -> None:
    same_as_pydicom(path.read_bytes())


def test_the_common_case_needs_no_pydicom() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        assert took_the_quick_path(data), name
        same_as_pydicom(data)


STUDY, SERIES = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


def header_with(changes: dict[int, tuple[str, bytes] | None]) -> dict[int, tuple[str, bytes]]:
    """A complete identifying header (tag -> (VR, value)) with ``changes`` (None removes)."""
    elements = {
        0x00080016: ("UI", CTImageStorage.encode()),
        0x00080018: ("UI", SOP_INSTANCE.encode() + b"\x00"),
        0x00080020: ("DA", b"20260101"),
        0x00080050: ("SH", b"ACC1"),
        0x00080060: ("CS", b"CT"),
        0x0008103E: ("LO", b"HEAD W/O "),
        0x00100020: ("LO", b"PAT-1 "),
        0x00180015: ("CS", b"HEAD"),
        0x0020000D: ("UI", STUDY.encode()),
        0x0020000E: ("UI", SERIES.encode()),
        0x00200013: ("IS", b"7 "),
    }
    for tag, change in changes.items():
        if change is None:
            elements.pop(tag, None)
        else:
            elements[tag] = change
    return dict(sorted(elements.items()))


def encoded(elements: dict[int, tuple[str, bytes]], syntax: str) -> bytes:
    little = syntax != ExplicitVRBigEndian
    order = "<" if little else ">"
    out = b""
    for tag, (vr, value) in elements.items():
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if syntax == ImplicitVRLittleEndian:
            out += head + struct.pack("<L", len(value)) + value
        elif vr in LONG_VRS:
            out += head + vr.encode() + b"\x00\x00" + struct.pack(order + "L", len(value)) + value
        else:
            out += head + vr.encode() + struct.pack(order + "H", len(value)) + value
    return part10(out, syntax)


CHANGES: list[dict[int, tuple[str, bytes] | None]] = [
    {},
    {0x00080060: ("CS", b"CT\\MR")},  # multi-valued
    {0x00080060: ("CS", b" CT")},  # leading space kept
    {0x00080060: ("CS", b"C\x00T")},  # a NUL inside
    {0x00080060: ("CS", b"")},
    {0x00080060: ("CS", b"    ")},
    {0x00080060: ("LO", b"CT")},  # another VR than the dictionary's
    {0x00080060: None},
    {0x0008103E: ("LO", "Tête".encode("latin-1"))},
    {0x0008103E: ("LO", "Tête".encode("latin-1")), 0x00080005: ("CS", b"ISO_IR 100")},
    {0x0008103E: ("LO", "Tête".encode()), 0x00080005: ("CS", b"ISO_IR 192")},
    {0x0008103E: ("LO", b"Head ~ neck"), 0x00080005: ("CS", b"ISO_IR 13")},
    {0x0008103E: ("LO", b"Head"), 0x00080005: ("CS", b"ISO_IR 100 ")},
    {0x0008103E: ("LO", b"Head"), 0x00080005: ("CS", b"\\ISO 2022 IR 87")},
    {0x0008103E: ("LO", b"Head"), 0x00080005: ("CS", b"ISO 2022 IR 100")},
    {0x0008103E: ("LO", b"Head"), 0x00080005: ("CS", b"ISO_IR 999")},
    {0x0008103E: ("LO", b"Head"), 0x00080005: ("LO", b"ISO_IR 100")},
    {0x0008103E: ("LO", b"Head\x1b$B")},  # an escape sequence
    {0x0008103E: ("LO", b"x" * 80)},  # longer than the column
    {0x00100020: ("LO", b"PAT\\2")},
    {0x00100020: ("US", b"abc")},  # pydicom cannot decode it
    {0x00200013: ("IS", b"12")},
    {0x00200013: ("IS", b" +12 ")},
    {0x00200013: ("IS", b"-3")},
    {0x00200013: ("IS", b"1.0 ")},
    {0x00200013: ("IS", b"1.5 ")},
    {0x00200013: ("IS", b"1e3 ")},
    {0x00200013: ("IS", b"abc ")},
    {0x00200013: ("IS", b"")},
    {0x00200013: ("IS", b"  ")},
    {0x00200013: ("IS", b"99999999999999")},
    {0x00200013: ("IS", b"1\\2 ")},
    {0x00200013: ("US", b"\x07\x00")},
    {0x00200013: None},
    {0x00080018: ("UI", SOP_INSTANCE.encode() + b" ")},
    {0x00080018: ("UI", b" " + SOP_INSTANCE.encode())},
    {0x00080018: ("UI", b"1.2.3\\1.2.4")},
    {0x00080018: ("UI", b"1.2.x\x00")},
    {0x00080018: ("UI", b"1.02.3\x00")},
    {0x00080018: ("UI", b"1." + b"2" * 70)},
    {0x00080018: ("UI", b"")},
    {0x00080018: ("LO", SOP_INSTANCE.encode())},
    {0x00080018: None},
    {0x0020000D: ("UI", b"\x00\x00")},
    {0x0020000E: ("UI", "1.2.é".encode("latin-1"))},
    {0x00080020: ("DA", b"2026-01-01")},
    {0x00080020: ("DA", b"20260101\\20260102")},
]


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, "1.2.3.4"]
)
@pytest.mark.parametrize("changes", CHANGES, ids=range(len(CHANGES)))
def test_values_read_as_pydicom_reads_them(
    changes: dict[int, tuple[str, bytes] | None], syntax: str
) -> None:
    same_as_pydicom(encoded(header_with(changes), syntax))


def test_ascii_values_decode_the_same_in_each_character_set_taken_without_pydicom() -> None:
    printable = bytes(c for c in range(0x20, 0x7F) if c != 0x5C)
    for charset in _ASCII_CHARSETS:
        encodings = convert_encodings(charset)
        assert decode_bytes(printable, encodings, set()) == printable.decode("ascii"), charset


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_bytes_changed_at_random_read_as_pydicom_reads_them(name: str) -> None:
    base = Path(get_testdata_file(name)).read_bytes()
    rng = random.Random(20261123)
    for _ in range(300):
        same_as_pydicom(changed_at_random(base, rng, first=132))


# --- the header read from the start of a data set, as it arrives ----------------------------


def ahead_agrees(data: bytes, start_length: int) -> bool:
    """Whether the header read from the data set's first ``start_length`` bytes, where it
    is read at all, is the one :func:`read_header` reads from the whole (and says so only
    for the length the whole has); True where it is read, False where it is left."""
    syntax, data_set = meta_and_data_set(data)
    ahead = header_ahead(data_set[:start_length], syntax)
    if ahead is None:
        return False
    header, length = ahead
    if length == len(data_set):  # the receiver takes it: it must be what the whole says
        assert header == read_header(data)
    return True


def slice_of(syntax: str) -> bytes:
    """A CT slice as a scanner sends it: its pixel data last."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for element in list(ds):
        if element.tag > 0x7FE00010:
            del ds[element.tag]
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_native_header_is_read_from_the_first_fragment(syntax: str) -> None:
    data = slice_of(syntax)
    _, data_set = meta_and_data_set(data)
    first = header_ahead(data_set[: len(data_set) // 2], syntax)
    assert first == (read_header(data), len(data_set))
    # Every start that reaches into the pixel data reads the same; none before it is read,
    # nor the whole data set (its pixel data's end is then no news: it is all there).
    pixels_at = data_set.index(b"\xe0\x7f\x10\x00")
    header_end = pixels_at + (8 if syntax == ImplicitVRLittleEndian else 12)
    for cut in range(1, len(data_set) + 1, 7):
        assert ahead_agrees(data, cut) == (header_end <= cut < len(data_set)), cut


def test_a_data_set_going_on_past_its_pixel_data_is_read_whole() -> None:
    """CT_small ends with an element after its pixel data: the start's answer names a
    length other than the data set's, so a receiver does not take it."""
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    syntax, data_set = meta_and_data_set(data)
    ahead = header_ahead(data_set[:16384], syntax)
    assert ahead is not None and ahead[1] < len(data_set)


def test_no_header_is_read_ahead_where_the_start_cannot_settle_it() -> None:
    """Encapsulated or deflated pixel data, a start that ends between elements or inside
    one that is not the pixel data, elements after the pixel data, a start malformed:
    left to the read of the whole."""
    for name in ("JPEG2000.dcm", "image_dfl.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        syntax, data_set = meta_and_data_set(data)
        assert header_ahead(data_set, syntax) is None, name
    pixels = explicit(0x7FE00010, "OW", b"\x00\x01" * 64)
    identity = IDENTITY + b"".join(
        explicit(tag, vr, value) for tag, (vr, value) in header_with({}).items() if tag > 0x00080060
    )
    assert header_ahead(identity, ExplicitVRLittleEndian) is None
    assert header_ahead((identity + pixels)[: len(identity) + 5], ExplicitVRLittleEndian) is None
    description = explicit(0x0008103E, "LO", b"A" * 64)
    assert header_ahead((identity + description)[:-10], ExplicitVRLittleEndian) is None
    damaged = identity + explicit(0x00100010, "XX", b"AB") + pixels
    assert header_ahead(damaged[:-8], ExplicitVRLittleEndian) is None
    # Pixel data that ends within the start, then more: the start says nothing of the rest.
    padded = identity + pixels + explicit(0xFFFCFFFC, "OB", b"\x00" * 8)
    assert header_ahead(padded[:-4], ExplicitVRLittleEndian) is None
    # Pixel data past the start: its length is the data set's, if nothing follows it.
    ahead = header_ahead((identity + pixels)[:-4], ExplicitVRLittleEndian)
    assert ahead is not None and ahead[1] == len(identity + pixels)


def test_a_header_read_ahead_is_never_other_than_the_wholes() -> None:
    """Bytes changed at random before the pixel data: wherever the start is read, the
    whole of that length reads the same (or the start was not read)."""
    base = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    syntax, data_set = meta_and_data_set(base)
    meta = base[: len(base) - len(data_set)]
    rng = random.Random(20261206)
    read = 0
    for _ in range(400):
        changed = bytearray(data_set)
        for _ in range(rng.randrange(1, 4)):
            changed[rng.randrange(0, 2000)] = rng.randrange(256)
        start = rng.choice([2048, 4096, 16384])
        ahead = header_ahead(bytes(changed[:start]), syntax)
        if ahead is None:
            continue
        read += 1
        header, length = ahead
        whole = meta + bytes(changed[:length]) + bytes(max(0, length - len(changed)))
        assert header == read_header(whole)  # well formed, and the same header
    assert read > 50


def test_the_compiled_walk_is_built_where_a_compiler_is() -> None:
    from node.store import structure

    assert structure._scan is not None, "setup.py builds node.store._scan"


def test_a_plain_value_is_printable_ascii_without_a_backslash() -> None:
    """The values decoded without pydicom: every byte tried inside a value (trailing
    spaces and NULs are padding, removed as pydicom removes them)."""
    from node.store.header import _plain

    for byte in range(256):
        printable = 0x20 <= byte <= 0x7E and byte != 0x5C
        expected = f"A{chr(byte)}A" if printable else None
        assert _plain(b"A" + bytes([byte]) + b"A \x00") == expected, byte
    assert _plain(b"") == "" and _plain(b" \x00 ") == ""


def test_a_data_set_read_apart_from_its_file_meta_reads_as_the_whole() -> None:
    """A receiver keeps its own file meta apart from the data set's bytes: the header read
    from the data set alone is the one the whole reads as, wherever it is read, over
    pydicom's test files and bytes changed at random; a data set starting with group 0002
    (which the file meta's walk would read on into) is left to the whole."""
    from node.dimse.messages import file_meta as node_file_meta
    from node.store.header import header_of_data_set

    def agrees(syntax: str, data_set: bytes) -> bool:
        meta = node_file_meta(CTImageStorage.encode(), SOP_INSTANCE.encode(), syntax, "SENDER")
        apart = header_of_data_set(data_set, syntax)
        if apart is not None:
            assert apart == read_header(meta + data_set)
        return apart is not None

    read = 0
    for path in PYDICOM_FILES:
        try:
            syntax, data_set = meta_and_data_set(path.read_bytes())
        except Malformed:
            continue
        read += agrees(syntax, data_set)
    assert read > 20
    for name in ("CT_small.dcm", "JPEG2000.dcm"):  # after the pixel data; encapsulated
        assert agrees(*meta_and_data_set(Path(get_testdata_file(name)).read_bytes())), name
    syntax, data_set = meta_and_data_set(Path(get_testdata_file("JPEG2000.dcm")).read_bytes())
    rng = random.Random(20261207)
    for _ in range(300):
        changed = bytearray(data_set)
        for _ in range(rng.randrange(1, 4)):
            changed[rng.randrange(0, min(len(changed), 3000))] = rng.randrange(256)
        agrees(syntax, bytes(changed))
    group_2 = explicit(0x00020010, "UI", b"1.2.840.10008.1.2\x00") + IDENTITY
    assert header_of_data_set(group_2, ExplicitVRLittleEndian) is None
