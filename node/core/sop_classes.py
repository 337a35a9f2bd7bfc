"""Storage SOP classes as the node tells them apart: images a head can read, and the rest.

A study holds more than the CT or MR images the model reads: dose reports, key object
selections, presentation states, RT objects, secondary captures, other modalities' images.
The node stores and forwards them all, but analyses only the classes below; a series made
of nothing else is "not analysed" at completion, with the reason in words (the class names
as PS3.6 gives them), and never starts a run.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

#: The image classes Curia's heads read (single-frame and multi-frame CT and MR).
ANALYSABLE = frozenset(
    {
        CTImageStorage,
        MRImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    }
)

#: Objects whose segments or ROIs a mask-pooled head may read its mask from, with the kind
#: of object each is read as (SEG, Label Map SEG, RT Structure Set): never analysed themselves.
SEGMENTATION_KINDS = {
    SegmentationStorage: "SEG",
    "1.2.840.10008.5.1.4.1.1.66.7": "SEG",  # Label Map Segmentation
    RTStructureSetStorage: "RTSTRUCT",
}
SEGMENTATIONS = frozenset(SEGMENTATION_KINDS)


def name(uid: str) -> str:
    """The class's name without "Storage" (``X-Ray Radiation Dose SR``), or the UID of a
    private class."""
    known = UID(uid).name
    if known == uid:
        return f"private class {uid}"
    return known.removesuffix(" Storage").removesuffix(" Image")


def matches(uid: str, pattern: str) -> bool:
    """Whether a rule's pattern names the class: its UID, its keyword
    (``XRayRadiationDoseSRStorage``) or its name (``X-Ray Radiation Dose SR Storage``),
    case-insensitive, ``*`` and ``?`` as wildcards."""
    value = UID(uid)
    pattern = pattern.strip().upper()
    candidates = {str(value), value.keyword, value.name}
    return any(c and fnmatch.fnmatchcase(c.upper(), pattern) for c in candidates)


def not_analysed_reason(sop_classes: Iterable[str]) -> str | None:
    """Why a series of these classes is not analysed, or None when one of them is an image
    class a head reads (whether a head accepts its stacks is the model's decision)."""
    classes = sorted(set(sop_classes))
    if not classes or any(uid in ANALYSABLE for uid in classes):
        return None
    names = ", ".join(name(uid) for uid in classes)
    return f"{names}: not a CT or MR image, nothing for the heads to read"
