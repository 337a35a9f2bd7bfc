"""The MPPS and Storage Commitment SCPs in-process, against a pynetdicom SCU: answers to
malformed or unserviceable requests, and nothing recorded for them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import CommitmentRequest, PerformedStep
from node.core.settings import CommitmentSettings, DicomSettings, ReportAddress
from node.dimse.allow_list import SourcePolicy
from node.dimse.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    CommitmentRequests,
)
from node.dimse.listener import start_listener
from node.dimse.mpps import MPPS_SOP_CLASS, PerformedSteps
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.modality import step_in_progress
from tests.support.peers import free_port


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


@pytest.fixture
def scu(catalogue: Catalogue, tmp_path: Path) -> Iterator[tuple[Association, PerformedSteps]]:
    """An association with an in-process listener serving MPPS and Storage Commitment."""
    steps = PerformedSteps(catalogue)
    commitments = CommitmentRequests(
        catalogue, CommitmentSettings(report_to={"SCU": ReportAddress(port=free_port())})
    )
    services = {MPPS_SOP_CLASS: steps, STORAGE_COMMITMENT_SOP_CLASS: commitments}
    ingestor = Ingestor(Spool(tmp_path / "spool", tmp_path / "quarantine"), catalogue)
    port = free_port()
    server = start_listener(
        DicomSettings(host="127.0.0.1", port=port, accept_any_source=True),
        ingestor,
        SourcePolicy(catalogue, accept_any=True),
        services,
    )
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MPPS_SOP_CLASS)
    ae.add_requested_context(STORAGE_COMMITMENT_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established
    try:
        yield assoc, steps
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()


def count(catalogue: Catalogue, model: type) -> int:
    with catalogue.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def commitment_request(transaction: str | None, uid: str = "1.2.3.4") -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = uid
    ds.ReferencedSOPSequence = [ref]
    return ds


def test_bad_mpps_requests_get_their_status_and_record_nothing(
    scu: tuple[Association, PerformedSteps], catalogue: Catalogue
) -> None:
    assoc, _ = scu
    finished = step_in_progress(generate_uid())
    finished.PerformedProcedureStepStatus = "COMPLETED"
    status, _ = assoc.send_n_create(finished, MPPS_SOP_CLASS, generate_uid())
    assert status.Status == 0x0106, "a new step must be IN PROGRESS"
    odd = step_in_progress(generate_uid())
    odd.PerformedProcedureStepStatus = "HALFWAY"
    status, _ = assoc.send_n_create(odd, MPPS_SOP_CLASS, generate_uid())
    assert status.Status == 0x0106
    assert count(catalogue, PerformedStep) == 0
    status, _ = assoc.send_n_create(step_in_progress(generate_uid()), MPPS_SOP_CLASS, None)
    assert status.Status == 0x0000, "the SCP may create the step's UID"
    with catalogue.session() as session:
        (created,) = session.scalars(select(PerformedStep.sop_instance_uid)).all()
    assert created.startswith("2.25.")


def test_bad_commitment_requests_get_their_status_and_record_nothing(
    scu: tuple[Association, PerformedSteps], catalogue: Catalogue
) -> None:
    assoc, _ = scu
    instance = STORAGE_COMMITMENT_INSTANCE
    cases = [
        (commitment_request(None), 1, instance, 0x0120),  # no Transaction UID
        (commitment_request("1.02.3"), 1, instance, 0x0106),  # an invalid one
        (commitment_request(generate_uid(), uid="x.y"), 1, instance, 0x0106),
        (commitment_request(generate_uid()), 2, instance, 0x0123),  # no such action type
    ]
    for dataset, action, sop_instance, expected in cases:
        status, _ = assoc.send_n_action(dataset, action, STORAGE_COMMITMENT_SOP_CLASS, sop_instance)
        assert status.Status == expected
    assert count(catalogue, CommitmentRequest) == 0
    transaction = generate_uid()
    for _ in range(2):  # a repeated request of one transaction is kept once
        status, _ = assoc.send_n_action(
            commitment_request(transaction), 1, STORAGE_COMMITMENT_SOP_CLASS, instance
        )
        assert status.Status == 0x0000
    assert count(catalogue, CommitmentRequest) == 1


def test_a_step_while_the_catalogue_is_down_fails_without_a_traceback(
    scu: tuple[Association, PerformedSteps], caplog: pytest.LogCaptureFixture
) -> None:
    assoc, steps = scu
    steps.catalogue = Catalogue(f"postgresql+psycopg://curia@127.0.0.1:{free_port()}/curia")
    with caplog.at_level(logging.ERROR):
        status, _ = assoc.send_n_create(
            step_in_progress(generate_uid()), MPPS_SOP_CLASS, generate_uid()
        )
    assert status.Status == 0x0110
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(r.exc_info is None for r in errors), "one line, no traceback"
