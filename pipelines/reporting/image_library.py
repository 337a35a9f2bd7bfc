"""The SR's TID 1600 Image Library: every source image and what it is.

highdicom would build the library from the evidence, one full TID 1602 per image, through
the SR constructor's deep copy and re-parse of the whole content tree; for a few hundred
slices that was most of an SR's build time. Here each distinct descriptor item is built
once and shared, descriptors common to a group are stated once for it, and the finished
library is attached to the document after highdicom has built it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.reporting.content import ReportError

__all__ = ["attach_image_library", "image_library"]

_ACQ_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


@dataclass(frozen=True)
class _Descriptor:
    """One TID 1602/1603/1604 row: its concept (and unit, for NUM), built once.

    A CodedConcept is validated on construction, and a library needs thousands of them.
    """

    concept: hd.sr.CodedConcept
    key: str  # the concept's code value, so cache keys need no highdicom property access
    unit: hd.sr.CodedConcept | None = None


def _descriptor(code: Code, unit: hd.sr.CodedConcept | None = None) -> _Descriptor:
    return _Descriptor(concept=hd.sr.CodedConcept.from_code(code), key=code.value, unit=unit)


# Units exactly as highdicom writes them in its Image Library.
_PIXELS = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
_COSINE = hd.sr.CodedConcept(value="{-1:1}", scheme_designator="UCUM", meaning="{-1:1}")
_MM = hd.sr.CodedConcept.from_code(codes.UCUM.Millimeter)
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")
_MODALITY = _descriptor(codes.DCM.Modality)
_FRAME_OF_REFERENCE = _descriptor(codes.DCM.FrameOfReferenceUID)
_ROWS = _descriptor(codes.DCM.PixelDataRows, _PIXELS)
_COLUMNS = _descriptor(codes.DCM.PixelDataColumns, _PIXELS)
_HORIZONTAL_SPACING = _descriptor(codes.DCM.HorizontalPixelSpacing, _MM)
_VERTICAL_SPACING = _descriptor(codes.DCM.VerticalPixelSpacing, _MM)
_SPACING_BETWEEN_SLICES = _descriptor(codes.DCM.SpacingBetweenSlices, _MM)
_SLICE_THICKNESS = _descriptor(codes.DCM.SliceThickness, _MM)
_ORIENTATION_ROW = _descriptor(codes.DCM.PatientOrientationRow)
_ORIENTATION_COLUMN = _descriptor(codes.DCM.PatientOrientationColumn)
_POSITION = tuple(
    _descriptor(c, _MM)
    for c in (
        codes.DCM.ImagePositionPatientX,
        codes.DCM.ImagePositionPatientY,
        codes.DCM.ImagePositionPatientZ,
    )
)
_ORIENTATION = tuple(
    _descriptor(c, _COSINE)
    for c in (
        codes.DCM.ImageOrientationPatientRowX,
        codes.DCM.ImageOrientationPatientRowY,
        codes.DCM.ImageOrientationPatientRowZ,
        codes.DCM.ImageOrientationPatientColumnX,
        codes.DCM.ImageOrientationPatientColumnY,
        codes.DCM.ImageOrientationPatientColumnZ,
    )
)
# Which descriptor template (TID 1604 or 1603) applies, by Modality, as in highdicom.
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _coded_modalities() -> dict[str, Code]:
    """Modality codes (CID 29 acquisition, else CID 32 other) by their Modality value."""
    coded: dict[str, Code] = {}
    for cid in (codes.cid32, codes.cid29):  # CID 29 wins where both define a value
        for name in cid.dir():
            code = getattr(cid, name)
            coded[code.value] = code
    return coded


_CODED_MODALITIES = _coded_modalities()


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` numbers from a DS/IS attribute value, or None if absent or malformed."""
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


class _DescriptorItems:
    """Descriptor content items, each distinct (row, value) built once and then shared.

    Within a series nearly every descriptor is the same on every slice (modality, frame
    of reference, matrix, spacing, thickness, orientation) and only the position
    changes; building each distinct item once, with highdicom's own content item classes
    (so the encoding is highdicom's), and sharing it is what keeps a 300-slice library
    cheap. Items are never changed after they are built.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], hd.sr.ContentItem] = {}

    def num(self, row: _Descriptor, value: int | float) -> hd.sr.ContentItem:
        # Integers (the matrix size) carry no float value, as highdicom writes them.
        key = (row.key, isinstance(value, int), float(value).hex())
        item = self._items.get(key)
        if item is None:
            if row.unit is None:
                raise TypeError(f"descriptor {row.key} has no unit: it is not a NUM row")
            item = hd.sr.NumContentItem(
                name=row.concept, value=value, unit=row.unit, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def text(self, row: _Descriptor, value: str) -> hd.sr.ContentItem:
        key = (row.key, value)
        item = self._items.get(key)
        if item is None:
            item = hd.sr.TextContentItem(
                name=row.concept, value=value, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def uid(self, row: _Descriptor, value: str) -> hd.sr.ContentItem:
        key = (row.key, value)
        item = self._items.get(key)
        if item is None:
            item = hd.sr.UIDRefContentItem(
                name=row.concept, value=value, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def modality(self, index: int, modality: str) -> hd.sr.ContentItem:
        key = (_MODALITY.key, modality)
        item = self._items.get(key)
        if item is None:
            code = _CODED_MODALITIES.get(modality)
            if code is None:
                raise ReportError(
                    f"source #{index} has Modality {modality!r}, which has no code in "
                    "CID 29/32: its Image Library entry cannot state it"
                )
            item = hd.sr.CodeContentItem(
                name=_MODALITY.concept, value=code, relationship_type=_ACQ_CONTEXT
            )
            self._items[key] = item
        return item

    def for_source(self, index: int, ds: Dataset) -> list[hd.sr.ContentItem]:
        """TID 1602 rows for one source, then TID 1604 or 1603, in template order.

        Rows whose attribute is absent are left out (all are optional in the templates).
        """
        if "Rows" not in ds or "Columns" not in ds:
            raise ReportError(f"source #{index} has no Rows/Columns: it is not an image")
        modality = str(ds.get("Modality", "") or "")
        items = [self.modality(index, modality)]
        frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")
        if frame_of_reference:
            items.append(self.uid(_FRAME_OF_REFERENCE, frame_of_reference))
        items.append(self.num(_ROWS, int(ds.Rows)))
        items.append(self.num(_COLUMNS, int(ds.Columns)))
        if modality in _CROSS_SECTIONAL:
            items += self._cross_sectional(ds)
        elif modality in _PROJECTION:
            items += self._projection(ds)
        return items

    def _cross_sectional(self, ds: Dataset) -> list[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        spacing = _numbers(ds.get("PixelSpacing"), 2)
        if spacing is not None:
            items.append(self.num(_HORIZONTAL_SPACING, spacing[1]))
            items.append(self.num(_VERTICAL_SPACING, spacing[0]))
        for row, keyword in (
            (_SPACING_BETWEEN_SLICES, "SpacingBetweenSlices"),
            (_SLICE_THICKNESS, "SliceThickness"),
        ):
            value = _numbers(ds.get(keyword), 1)
            if value is not None:
                items.append(self.num(row, value[0]))
        position = _numbers(ds.get("ImagePositionPatient"), 3)
        if position is not None:
            items += [self.num(r, v) for r, v in zip(_POSITION, position, strict=True)]
        orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
        if orientation is not None:
            items += [self.num(r, v) for r, v in zip(_ORIENTATION, orientation, strict=True)]
        return items

    def _projection(self, ds: Dataset) -> list[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        orientation = ds.get("PatientOrientation")
        if orientation is not None and len(orientation) == 2:
            items.append(self.text(_ORIENTATION_ROW, str(orientation[0])))
            items.append(self.text(_ORIENTATION_COLUMN, str(orientation[1])))
        spacing = _numbers(ds.get("ImagerPixelSpacing"), 2)
        if spacing is not None:
            items.append(self.num(_HORIZONTAL_SPACING, spacing[1]))
            items.append(self.num(_VERTICAL_SPACING, spacing[0]))
        return items


def _library_group(
    entries: list[tuple[Dataset, list[hd.sr.ContentItem]]],
) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library Group: shared descriptors once, then one entry per source.

    A descriptor every entry of the group has (modality, frame of reference, matrix,
    spacing, orientation...) is stated once for the group (TID 1600 row 3, which
    applies to all its entries); an entry keeps only what is its own (typically its
    position). Same information as a full TID 1602 per entry, a fraction of the size.
    """
    first = entries[0][1]
    others = [{id(item) for item in items} for _, items in entries[1:]]
    shared = [item for item in first if all(id(item) in ids for ids in others)]
    shared_ids = {id(item) for item in shared}
    content: list[hd.sr.ContentItem] = list(shared)
    for ds, items in entries:
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type=_CONTAINS,
        )
        own = [item for item in items if id(item) not in shared_ids]
        if own:
            image.ContentSequence = DicomSequence(own)
        content.append(image)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS
    )
    group.ContentSequence = DicomSequence(content)
    return group


def image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: an entry for every source, one group per modality and frame of reference."""
    descriptors = _DescriptorItems()
    groups: dict[tuple[str, str], list[tuple[Dataset, list[hd.sr.ContentItem]]]] = {}
    for i, ds in enumerate(sources):
        key = (str(ds.get("Modality", "") or ""), str(ds.get("FrameOfReferenceUID", "") or ""))
        groups.setdefault(key, []).append((ds, descriptors.for_source(i, ds)))
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = DicomSequence(
        [_library_group(entries) for entries in groups.values()]
    )
    return library


def attach_image_library(sr: hd.sr.Comprehensive3DSR, library: hd.sr.ContainerContentItem) -> None:
    """Put the library where TID 1500 has it (row 5, before Imaging Measurements).

    It is attached after highdicom has built the document, not passed in with the
    content: the SR constructor deep-copies and re-parses the whole content tree and
    searches it for references, which for a few hundred entries was most of an SR's
    build time. Nothing that check would catch is skipped: every library entry is a
    source, and every source is evidence. It goes into both the dataset and highdicom's
    parsed view of it (``sr.content``) so that the two agree.
    """
    for tree in (sr.ContentSequence, sr.content[0].ContentSequence):
        names = [item.name for item in tree]
        tree.insert(names.index(codes.DCM.ImagingMeasurements), library)
