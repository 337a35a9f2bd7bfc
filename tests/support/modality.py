"""A modality played by pynetdicom: C-STORE, and MPPS N-CREATE / N-SET, to a node."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from node.delivery.responses import keep_responses
from tests.support.peers import NodeProcess

MPPS = "1.2.840.10008.3.1.2.3.3"


@contextmanager
def association(
    node: NodeProcess, files: Sequence[Path] = (), ae_title: str = "STORESCU"
) -> Iterator[Association]:
    """An association with the node proposing MPPS and the files' storage classes."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MPPS)
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    for sop_class, syntax in {(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="CURIA")
    assert assoc.is_established, "the node refused the modality's association"
    keep_responses(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store(assoc: Association, files: Sequence[Path]) -> None:
    for path in files:
        status = assoc.send_c_store(dcmread(path))
        assert status.Status == 0x0000, f"C-STORE of {path.name}: 0x{status.Status:04X}"


def step_in_progress(study_uid: str) -> Dataset:
    """The N-CREATE attributes of a step that has just started (PS3.4 F.7.2.1)."""
    ds = Dataset()
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    scheduled.AccessionNumber = ""
    ds.ScheduledStepAttributesSequence = [scheduled]
    ds.PerformedProcedureStepID = "1"
    ds.PerformedStationAETitle = "STORESCU"
    ds.PerformedProcedureStepStartDate = "20261205"
    ds.PerformedProcedureStepStartTime = "060000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def step_ended(status: str, files: Sequence[Path], extra_uids: Sequence[str] = ()) -> Dataset:
    """The N-SET attributes that end a step, listing ``files`` (and ``extra_uids``, never
    sent) in their series."""
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    series = Dataset()
    series.SeriesInstanceUID = headers[0].SeriesInstanceUID
    series.PerformingPhysicianName = ""
    series.ProtocolName = "CHEST"
    series.OperatorsName = ""
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    refs = []
    for sop_class, uid in [(h.SOPClassUID, h.SOPInstanceUID) for h in headers] + [
        (headers[0].SOPClassUID, u) for u in extra_uids
    ]:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series.ReferencedImageSequence = refs
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261205"
    ds.PerformedProcedureStepEndTime = "061000"
    ds.PerformedSeriesSequence = [series]
    return ds


def api_get(node: NodeProcess, path: str) -> object:
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text()
    response = httpx.get(
        f"{node.api_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def series_view(node: NodeProcess, series_uid: str) -> dict | None:
    """The series as ``GET /api/v1/studies`` shows it."""
    for study in api_get(node, "/api/v1/studies"):
        for series in study["series"]:
            if series["series_instance_uid"] == series_uid:
                return series
    return None
