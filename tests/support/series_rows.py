"""Catalogue rows and spool files for a series, without a network: headers, multi-frame
stacks, and a receiving series of them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node.catalogue.db import Catalogue
from node.catalogue.models import Instance, Series, SeriesState, Study

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def header(sop_class: str = CT, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    for name, value in values.items():
        setattr(ds, name, value)
    return ds


def stack(frames: int, positions: list[tuple[int, ...]] | None = None) -> Dataset:
    """An enhanced multi-frame header whose frames carry ``positions`` as their Dimension
    Index Values (a full 1..frames stack unless given)."""
    positions = positions or [(1, n) for n in range(1, frames + 1)]
    groups = []
    for index in positions:
        content = Dataset()
        content.DimensionIndexValues = list(index)
        group = Dataset()
        group.FrameContentSequence = [content]
        groups.append(group)
    dimensions = []
    for pointer in (0x00209056, 0x00209057):  # Stack ID, In-Stack Position Number
        item = Dataset()
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x00209111
        dimensions.append(item)
    return header(
        ENHANCED_CT,
        NumberOfFrames=frames,
        PerFrameFunctionalGroupsSequence=groups,
        DimensionIndexSequence=dimensions,
    )


def add_series(
    catalogue: Catalogue,
    spool: Path,
    files: list[Dataset],
    ae: str | None = "CT1",
    ago: float = 1.0,
    count: int | None = None,
    *,
    study: str | None = None,
    state: SeriesState = SeriesState.RECEIVING,
    modality: str = "CT",
) -> str:
    """A series of ``files`` (written to the spool, with its series and study UIDs) last
    received ``ago`` s before NOW, in ``state`` (completed then, unless receiving); in
    ``study`` when given (joined if catalogued already), else in a new study. Its UID is the
    first file's Series Instance UID, if it has one."""
    uid = str(files[0].get("SeriesInstanceUID") or generate_uid()) if files else generate_uid()
    study = study or generate_uid()
    when = NOW - timedelta(seconds=ago)
    with catalogue.session() as session:
        known = session.scalar(select(Study).where(Study.study_instance_uid == study))
        series = Series(
            series_instance_uid=uid,
            study=known or Study(study_instance_uid=study),
            modality=modality,
            calling_ae_title=ae,
            instance_count=len(files) if count is None else count,
            state=state,
            first_received_at=when - timedelta(seconds=5),
            last_received_at=when,
            completed_at=when if state != SeriesState.RECEIVING else None,
        )
        session.add(series)
        for ds in files:
            ds.SeriesInstanceUID, ds.StudyInstanceUID = uid, study
            path = f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(spool / path, enforce_file_format=True)
            session.add(
                Instance(
                    sop_instance_uid=ds.SOPInstanceUID,
                    series=series,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=path,
                    size=1,
                    sha256="0" * 64,
                    received_at=when,
                )
            )
    return uid
