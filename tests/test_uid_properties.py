"""Properties of UID validation and of the spool paths built from UIDs (hypothesis).

The reference below is the PS3.5 9.1 grammar written out by hand, character by character,
so the node's regular expression is checked against something that is not a regular
expression: components of ASCII digits, no leading zero unless the component is "0",
separated by single dots, 64 characters at most.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.uids import InvalidUID, is_valid_uid, validate_uid
from node.store.spool import Spool

# Deterministic (CI runs the same examples every time) and no example database written
# into the working tree.
PROPERTY = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def reference(value: object) -> bool:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    for component in value.split("."):
        if component == "" or any(char not in string.digits for char in component):
            return False
        if len(component) > 1 and component[0] == "0":
            return False
    return True


component = st.one_of(
    st.just("0"),
    st.builds(
        lambda first, rest: first + rest,
        st.sampled_from("123456789"),
        st.text(string.digits, max_size=20),
    ),
)
valid_uids = (
    st.lists(component, min_size=1, max_size=12).map(".".join).filter(lambda uid: len(uid) <= 64)
)
# Text close to a UID: digits and dots with the characters that break UIDs and paths.
uid_like = st.text(
    alphabet=st.sampled_from(list("0123456789....") + list("/\\ \x00\n-a_+~%:") + ["٣", "²"]),
    max_size=80,
)
anything = st.one_of(uid_like, st.text(max_size=80), valid_uids)


@pytest.mark.slow
@PROPERTY
@given(valid_uids)
def test_the_grammar_is_accepted(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid, "SOPInstanceUID") == uid


@PROPERTY
@given(anything)
def test_validation_agrees_with_the_grammar(value: str) -> None:
    expected = reference(value)
    assert is_valid_uid(value) is expected
    if expected:
        assert validate_uid(value) == value
    else:
        with pytest.raises(InvalidUID):
            validate_uid(value)


@PROPERTY
@given(valid_uids, st.integers(min_value=0), st.sampled_from(["00", "01", "007", "0000"]))
def test_zero_padded_components_are_refused(uid: str, where: int, padded: str) -> None:
    components = uid.split(".")
    components.insert(where % (len(components) + 1), padded)
    candidate = ".".join(components)
    assert not is_valid_uid(candidate)
    with pytest.raises(InvalidUID):
        validate_uid(candidate)


@pytest.mark.slow
@PROPERTY
@given(valid_uids.filter(lambda uid: len(uid) < 64), st.data())
def test_one_foreign_character_spoils_a_uid(uid: str, data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(uid)))
    char = data.draw(st.characters().filter(lambda c: c not in string.digits + "."))
    candidate = uid[:position] + char + uid[position:]
    assert not is_valid_uid(candidate)
    with pytest.raises(InvalidUID):
        validate_uid(candidate)


@PROPERTY
@given(
    st.builds(
        lambda uid, size: f"{uid}.{'1' * max(1, size - len(uid) - 1)}",
        valid_uids,
        st.integers(min_value=65, max_value=300),
    )
)
def test_longer_than_64_characters_is_refused(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match="longer than 64"):
        validate_uid(uid)


@pytest.mark.slow
@PROPERTY
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(valid_uids)))
def test_only_strings_are_uids(value: object) -> None:
    assert not is_valid_uid(value)
    with pytest.raises(InvalidUID):
        validate_uid(value)


# --- the spool: paths from UIDs ------------------------------------------------------------


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Spool:
    root = tmp_path_factory.mktemp("spool")
    return Spool(root / "spool", root / "quarantine")


def inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


@pytest.mark.slow
@PROPERTY
@given(valid_uids, valid_uids, valid_uids)
def test_valid_uids_give_a_path_inside_the_spool(
    spool: Spool, study: str, series: str, sop: str
) -> None:
    relative = spool.relative_path(study, series, sop)
    assert relative == f"{study}/{series}/{sop}.dcm"
    assert Path(relative).parts == (study, series, f"{sop}.dcm")
    assert inside(spool.absolute(relative), spool.root)
    assert spool.absolute(relative).parent.parent.parent == spool.root


@pytest.mark.slow
@PROPERTY
@given(anything, anything, anything)
def test_no_triple_escapes_the_spool(spool: Spool, study: str, series: str, sop: str) -> None:
    """Either every UID is valid and the path stays in the spool, or nothing is built."""
    if reference(study) and reference(series) and reference(sop):
        assert inside(spool.absolute(spool.relative_path(study, series, sop)), spool.root)
    else:
        with pytest.raises(InvalidUID):
            spool.relative_path(study, series, sop)


@settings(PROPERTY, max_examples=60)
@given(
    st.tuples(valid_uids, valid_uids, valid_uids),
    st.integers(min_value=0, max_value=2),
    st.one_of(uid_like, st.text(max_size=80)).filter(lambda value: not reference(value)),
)
def test_a_refused_uid_stores_nothing(
    spool: Spool, uids: tuple[str, str, str], which: int, bad: str
) -> None:
    before = sorted(spool.root.rglob("*")) if spool.root.exists() else []
    triple = list(uids)
    triple[which] = bad
    with pytest.raises(InvalidUID):
        spool.store(*triple, b"DICM")
    after = sorted(spool.root.rglob("*")) if spool.root.exists() else []
    assert after == before, "no file or folder is made for a refused UID"


@settings(PROPERTY, max_examples=40)
@given(st.tuples(valid_uids, valid_uids, valid_uids), st.binary(max_size=64))
def test_a_stored_file_is_where_its_uids_say(
    spool: Spool, uids: tuple[str, str, str], data: bytes
) -> None:
    stored = spool.store(*uids, data)
    path = spool.absolute(stored.relative_path)
    assert inside(path, spool.root)
    assert path.relative_to(spool.root).parts == (uids[0], uids[1], f"{uids[2]}.dcm")
    assert path.read_bytes() == data


@settings(PROPERTY, max_examples=40)
@given(st.text(max_size=200), st.one_of(st.none(), st.text(max_size=40)))
def test_quarantine_names_are_the_nodes_own(
    spool: Spool, reason: str, calling_ae: str | None
) -> None:
    """What a sender says (its AE title, the reason quoting its bad UID) never names a
    quarantined file."""
    kept = spool.quarantine(b"not DICOM".ljust(200, b"!"), reason, calling_ae)
    assert inside(kept, spool.quarantine_root)
    assert kept.parent.parent == spool.quarantine_root
    assert kept.stem.isascii() and all(c in string.hexdigits for c in kept.stem)
    assert (kept.parent / "index.jsonl").is_file()
