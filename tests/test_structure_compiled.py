"""The compiled walk over element headers (``node/store/_scan.c``) answers as the Python walk.

:mod:`node.store.structure` walks a data set by the compiled walk where it is built and by
its Python walk where it is not; both must answer the same of any bytes: the same elements
kept, the same ``plain``, the same end of pixel data past a start, the same refusal in the
same words. Compared here over pydicom's test files, whole and cut to every kind of start,
over bytes changed at random, and over the encodings built by hand that few files have.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from node.store import structure
from node.store.header import _HEADER_TAG_SET
from node.store.structure import MAX_NESTING, Malformed, scan, scan_head
from tests.support.encoding import (
    IDENTITY_IMPLICIT,
    PYDICOM_FILES,
    SEQUENCE_END,
    explicit,
    implicit,
    item,
    meta_and_data_set,
    part10,
)
from tests.support.fuzzing import changed_at_random

_scan = pytest.importorskip("node.store._scan", reason="the compiled walk is not built here")

UNKNOWN_SYNTAX = "1.2.826.0.1.3680043.8.498.99"
WANTED = [
    frozenset(),
    _HEADER_TAG_SET,
    frozenset({0x00280010, 0x00081140, 0x00540016}),
    # every top-level tag of a CT header, and more: as many as a caller may want
    frozenset(int(element.tag) for element in dcmread(get_testdata_file("CT_small.dcm")))
    | frozenset(range(0x00091000, 0x00091100)),
]
# A private sequence (unknown to pydicom's dictionary) and a dictionary one, for the implicit
# VR elements of undefined length whose reading depends on that dictionary.
PRIVATE, REFERENCED = 0x00091010, 0x00081140


@contextmanager
def in_python() -> Iterator[None]:
    compiled = structure._scan
    structure._scan = None
    try:
        yield
    finally:
        structure._scan = compiled


def outcome(walk: Callable[[], object]) -> object:
    try:
        return walk()
    except Malformed as exc:
        return ("malformed", str(exc))


def same_scan(data: bytes, wanted: frozenset[int] = _HEADER_TAG_SET) -> object:
    """The whole stream's scan by both walks, which must agree; returns it."""
    compiled = outcome(lambda: scan(data, wanted))
    with in_python():
        python = outcome(lambda: scan(data, wanted))
    assert compiled == python
    return compiled


def same_start(data_set: bytes, syntax: str, wanted: frozenset[int] = _HEADER_TAG_SET) -> object:
    """A data set's start read by both walks (:func:`scan_head`), which must agree."""
    compiled = scan_head(data_set, syntax, wanted)
    with in_python():
        python = scan_head(data_set, syntax, wanted)
    assert compiled == python
    return compiled


def part10_implicit(data_set: bytes) -> bytes:
    return part10(data_set, ImplicitVRLittleEndian)


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda path: path.name)
def test_pydicoms_test_files_are_walked_alike_whole_and_from_every_start(path: Path) -> None:
    data = path.read_bytes()
    for wanted in WANTED:
        same_scan(data, wanted)
    try:
        syntax, data_set = meta_and_data_set(data)
    except Malformed:
        return
    for cut in sorted({*range(0, min(len(data_set), 600), 37), *range(0, len(data_set), 997)}):
        same_start(data_set[:cut], syntax)
    same_start(data_set, syntax)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm"]
)
def test_bytes_changed_at_random_are_walked_alike(name: str) -> None:
    base = Path(get_testdata_file(name)).read_bytes()
    syntax, data_set = meta_and_data_set(base)
    rng = random.Random(20261207)
    refused = 0
    for _ in range(400):
        data = changed_at_random(data_set, rng)
        found = same_scan(base[: len(base) - len(data_set)] + data)
        refused += isinstance(found, tuple)
        same_start(data[: rng.choice([512, 2048, 8192])], syntax)
    assert refused > 50  # the changes reached the walk's refusals, not only its values


def test_implicit_sequences_of_undefined_length_ask_pydicoms_dictionary() -> None:
    """An implicit VR element of undefined length is read as items by both walks; whether
    pydicom reads it so too (``plain``) depends on its dictionary, asked by both alike."""
    pixels = implicit(0x7FE00010, b"\x00\x01" * 8)
    empty_item = item(b"", defined=False)
    for tag in (REFERENCED, PRIVATE):
        sequence = implicit(tag, empty_item + SEQUENCE_END, 0xFFFFFFFF)
        found = same_scan(part10_implicit(IDENTITY_IMPLICIT + sequence + pixels))
        assert not isinstance(found, tuple)
        assert found.plain == (tag == REFERENCED)
        # nested in a sequence of the dictionary's: asked there too
        outer = implicit(REFERENCED, item(sequence, defined=False) + SEQUENCE_END, 0xFFFFFFFF)
        assert same_scan(part10_implicit(IDENTITY_IMPLICIT + outer + pixels)).plain == (
            tag == REFERENCED
        )
        start = same_start(IDENTITY_IMPLICIT + sequence + pixels[:-4], ImplicitVRLittleEndian)
        assert start is not None and start[0].plain == (tag == REFERENCED)


def test_encodings_few_files_have_are_walked_alike() -> None:
    pixels = explicit(0x7FE00010, "OW", b"\x00\x01" * 8)
    explicit_identity = explicit(0x00080016, "UI", CTImageStorage.encode()) + explicit(
        0x00080060, "CS", b"CT"
    )
    un_items = b"\x09\x00\x10\x10UN\x00\x00\xff\xff\xff\xff" + item(
        implicit(0x00100010, b"NAME"), defined=False
    )
    fragments = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    cases = [
        part10(explicit_identity + un_items + SEQUENCE_END + pixels, ExplicitVRLittleEndian),
        part10(explicit_identity + un_items + pixels, ExplicitVRLittleEndian),  # no end
        part10(explicit_identity + fragments + SEQUENCE_END, JPEG2000Lossless),
        part10(explicit_identity + fragments, JPEG2000Lossless),  # no delimiter
        part10(explicit_identity + pixels, JPEG2000Lossless),  # not encapsulated
        part10(explicit_identity + fragments + SEQUENCE_END, ExplicitVRLittleEndian),
        # a syntax pydicom does not know: pixel data encapsulated or not
        part10(explicit_identity + pixels, UNKNOWN_SYNTAX),
        part10(explicit_identity + fragments + SEQUENCE_END, UNKNOWN_SYNTAX),
        part10(explicit_identity + b"\x10\x00\x10\x00PN\xff\xff", ExplicitVRLittleEndian),
        part10(explicit_identity + b"\x10\x00\x10\x00\x00\xffAB", ExplicitVRLittleEndian),
        part10(explicit_identity + b"\x10\x00\x10\x00'\"AB", ExplicitVRLittleEndian),
        part10(
            explicit_identity + b"\x10\x00\x10\x00UT\x00\x00\xff\xff\xff\xff",
            ExplicitVRLittleEndian,
        ),
        part10(explicit_identity + b"\xfe\xff\x00\xe0\x00\x00\x00\x00", ExplicitVRLittleEndian),
        part10(
            explicit(0x00080016, "UI", CTImageStorage.encode(), big=True)
            + explicit(0x7FE00010, "OW", b"\x01\x00" * 8, big=True),
            ExplicitVRBigEndian,
        ),
        part10_implicit(b"\x00\x00\x00\x00" + IDENTITY_IMPLICIT),  # a command group
        part10_implicit(IDENTITY_IMPLICIT[:-3]),  # cut inside a value
    ]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(explicit_identity + pixels) + deflater.flush()
    cases.append(part10(deflated, DeflatedExplicitVRLittleEndian))
    for data in cases:
        for wanted in WANTED:
            same_scan(data, wanted)
        for cut in range(0, len(data) - 132, 3):
            try:
                syntax, data_set = meta_and_data_set(data)
            except Malformed:
                break
            same_start(data_set[:cut], syntax)


def test_sequences_nested_to_the_limit_and_past_it_are_walked_alike() -> None:
    def nested(depth: int) -> bytes:
        content = implicit(0x00100010, b"NAME")
        for _ in range(depth):
            content = implicit(REFERENCED, item(content, defined=False) + SEQUENCE_END, 0xFFFFFFFF)
        return content

    pixels = implicit(0x7FE00010, b"\x00\x01" * 8)
    assert not isinstance(
        same_scan(part10_implicit(IDENTITY_IMPLICIT + nested(MAX_NESTING) + pixels)), tuple
    )
    found = same_scan(part10_implicit(IDENTITY_IMPLICIT + nested(MAX_NESTING + 1) + pixels))
    assert found == ("malformed", f"sequences nested more than {MAX_NESTING} deep")


def test_a_long_walk_without_the_interpreter_lock_answers_alike() -> None:
    """A data set past a megabyte is walked with the interpreter lock let go (its values
    copied out after): the same answer, from bytes and from a bytearray."""
    many = b"".join(implicit(0x00091000 | (i & 0xFF), b"ABCD") for i in range(120_000))
    data = part10_implicit(IDENTITY_IMPLICIT + many + implicit(0x7FE00010, b"\x00" * 16))
    assert len(data) > 1 << 20
    found = same_scan(data, _HEADER_TAG_SET)
    assert not isinstance(found, tuple) and found.elements[0x00080060] == (None, b"CT")
    assert same_scan(bytearray(data), _HEADER_TAG_SET) == found
    cut = same_scan(data[:-5], _HEADER_TAG_SET)
    assert isinstance(cut, tuple)
