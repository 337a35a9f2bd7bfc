"""What every result object (SR and SEG) says the same way: errors, demo wording, sources.

A Segmentation and the SR that references it describe one analysis, so they check their
sources alike, warn about demo weights in the same words and cut their descriptions to
the same lengths; those pieces live here, once.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from pipelines.findings import CodeRef
from pipelines.reporting.templates import CodeSpec

__all__ = [
    "DEMO_STATEMENT",
    "LO_MAX",
    "ReportError",
    "concept",
    "is_uid",
    "prepare_sources",
    "result_series_description",
]

#: Longest value of a LO (Long String) attribute.
LO_MAX = 64

# Shown in the SR whenever demo weights made the result (see notes.document_notes for
# where), and in a demo Segmentation's segment description.
DEMO_STATEMENT = (
    "DEMO RESULT - NOT A DIAGNOSIS: produced with demo (random, untrained) model weights. "
    "Not for clinical use."
)
_DEMO_SERIES_SUFFIX = " - DEMO, NOT FOR DIAGNOSIS"

# Type 2 attributes highdicom copies from the first source: a source may lack them, and
# highdicom then fails; they must exist (empty) on the copy it gets.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class ReportError(ValueError):
    """Findings, sources and templates that cannot make a correct SR together."""


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (checked without pydicom's warning on bad input)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def concept(code: CodeRef | CodeSpec) -> hd.sr.CodedConcept:
    """A head card's or template's code as the coded concept highdicom writes."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def result_series_description(base: str, demo: bool) -> str:
    """SeriesDescription (LO, 64 chars) that keeps the demo warning when it must cut."""
    if not demo:
        return base[:LO_MAX]
    return base[: LO_MAX - len(_DEMO_SERIES_SUFFIX)] + _DEMO_SERIES_SUFFIX


def prepare_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources as highdicom can use them, checked, never touching the originals.

    The caller's datasets are often cached or about to be stored: mutating them would
    change what the archive receives. highdicom copies patient and study attributes
    from the first instance only and needs its type 2 ones present (empty is fine), so
    only that instance is copied and completed; the others are passed on as they are,
    since highdicom only reads them (copying hundreds of headers used to cost more than
    building the rest of the document).
    """
    if not sources:
        raise ReportError("no source instances given: a result must reference what it describes")
    for i, ds in enumerate(sources):
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                raise ReportError(f"source #{i} has no {keyword}; it cannot be referenced")
    first = copy.deepcopy(sources[0])
    for keyword in _TYPE2_COPIED:
        if keyword not in first:
            setattr(first, keyword, None)
    prepared = [first, *sources[1:]]
    studies = {str(ds.StudyInstanceUID) for ds in prepared}
    if len(studies) != 1:
        raise ReportError(f"sources span several studies {sorted(studies)}; one SR per study")
    patients = {str(ds.PatientID or "") for ds in prepared}
    if len(patients) != 1:
        raise ReportError(f"sources carry several PatientIDs {sorted(patients)}")
    return prepared
