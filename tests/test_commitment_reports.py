"""The storage commitment reporter: what it sends a requester (a pynetdicom SCU that takes
N-EVENT-REPORT), and how it waits for the archive with ``after_archived``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import (
    CommitmentRequest,
    CommitmentState,
    Delivery,
    DeliveryState,
    Series,
    utcnow,
)
from node.core.settings import CommitmentSettings, ReportAddress
from node.delivery.commitment_reports import CommitmentReporter
from node.dimse.commitment import STORAGE_COMMITMENT_SOP_CLASS
from tests.support.commitments import request_row
from tests.support.peers import free_port
from tests.support.series_rows import CT, add_series, header


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def request(catalogue: Catalogue, items: list[list[str]]) -> str:
    transaction = generate_uid()
    with catalogue.session() as session:
        session.add(
            CommitmentRequest(
                transaction_uid=transaction,
                calling_ae_title="MODALITY",
                address="127.0.0.1",
                instances={"items": items},
            )
        )
    return transaction


def test_report_lists_committed_and_failed_instances(catalogue: Catalogue, tmp_path: Path) -> None:
    files = [header() for _ in range(2)]
    add_series(catalogue, tmp_path, files)
    unknown = generate_uid()
    items = [[CT, f.SOPInstanceUID] for f in files] + [[CT, unknown]]
    transaction = request(catalogue, items)

    reports: list[tuple[int, Dataset]] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.request.EventTypeID, event.event_information))
        return 0x0000, None

    port = free_port()
    requester = AE(ae_title="MODALITY")
    requester.add_supported_context(STORAGE_COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)
    server = requester.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    settings = CommitmentSettings(report_to={"MODALITY": ReportAddress(port=port)})
    try:
        reporter = CommitmentReporter(catalogue, settings, tmp_path, calling_ae_title="CURIA")
        assert reporter.report_due() == 1
    finally:
        server.shutdown()
    ((event_type, info),) = reports
    assert event_type == 2, "some failed"
    assert info.TransactionUID == transaction
    assert [r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence] == [
        f.SOPInstanceUID for f in files
    ]
    assert [(r.ReferencedSOPInstanceUID, r.FailureReason) for r in info.FailedSOPSequence] == [
        (unknown, 0x0112)
    ]
    answered = request_row(catalogue, transaction)
    assert answered.state == CommitmentState.ANSWERED
    assert answered.outcome["committed"] == 2
    assert reporter.report_due() == 0, "answered once"


def test_after_archived_waits_for_the_forward_then_gives_up(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    files = [header()]
    series_uid = add_series(catalogue, tmp_path, files)
    transaction = request(catalogue, [[CT, files[0].SOPInstanceUID]])
    unreachable = ReportAddress(port=free_port())  # nothing listens: a send fails
    settings = CommitmentSettings(
        after_archived=True, report_to={"MODALITY": unreachable}, poll_seconds=0.1
    )
    reporter = CommitmentReporter(catalogue, settings, tmp_path, calling_ae_title="CURIA")

    assert reporter.report_due() == 0
    waiting = request_row(catalogue, transaction)
    assert (waiting.state, waiting.attempts) == (CommitmentState.PENDING, 0), "not sent yet"

    with catalogue.session() as session:  # the series reaches the archive
        series = session.scalar(sa.select(Series).where(Series.series_instance_uid == series_uid))
        session.add(Delivery(series_id=series.id, destination="pacs", state=DeliveryState.SENT))
        session.execute(
            sa.update(CommitmentRequest).values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
    assert reporter.report_due() == 0
    tried = request_row(catalogue, transaction)
    assert tried.attempts == 1 and "rejected or failed" in (tried.last_error or ""), (
        "archived: the report is due now (and fails here: the requester is not listening)"
    )
