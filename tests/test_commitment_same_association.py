"""Storage commitment reports on the requester's own association (PS3.4 J.3.3), against a
pynetdicom SCU that holds its association open with an N-EVENT-REPORT handler on it; and
the fall-back to a new association when the requester refuses it there or leaves first."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import (
    CommitmentRequest,
    CommitmentState,
    Delivery,
    DeliveryState,
    Series,
    utcnow,
)
from node.core.settings import CommitmentSettings, DicomSettings, ReportAddress, TlsSettings
from node.delivery.commitment_reports import CommitmentReporter
from node.dimse.allow_list import SourcePolicy
from node.dimse.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    CommitmentRequests,
)
from node.dimse.listener import start_listener
from node.dimse.report_channels import ReturnPaths
from node.dimse.server import Listener
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.commitments import request_row
from tests.support.peers import free_port, wait_for
from tests.support.series_rows import CT, add_series, header
from tests.support.tls import make_pki

REQUESTER = "MODALITY"


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


@dataclass
class Node:
    """An in-process listener serving Storage Commitment, with its new-association reporter."""

    catalogue: Catalogue
    spool: Path
    settings: CommitmentSettings
    listener: Listener
    reporter: CommitmentReporter
    paths: ReturnPaths

    @property
    def port(self) -> int:
        return int(self.listener.server_address[1])


@pytest.fixture
def start_node(catalogue: Catalogue, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(address: ReportAddress, tls: TlsSettings | None = None, **options: object) -> Node:
        settings = CommitmentSettings(report_to={REQUESTER: address}, **options)  # type: ignore[arg-type]
        spool = tmp_path / "spool"
        spool.mkdir(exist_ok=True)
        paths = ReturnPaths(catalogue, settings, spool)
        reporter = CommitmentReporter(catalogue, settings, spool, "CURIA", timeout=5, paths=paths)
        paths.on_change.append(reporter.wake)
        commitments = CommitmentRequests(catalogue, settings, on_request=[reporter.wake])
        ingestor = Ingestor(Spool(spool, tmp_path / "quarantine"), catalogue)
        listener = start_listener(
            DicomSettings(
                host="127.0.0.1",
                port=free_port(),
                accept_any_source=True,
                tls=tls or TlsSettings(),
            ),
            ingestor,
            SourcePolicy(catalogue, accept_any=True),
            {STORAGE_COMMITMENT_SOP_CLASS: commitments},
            return_paths=paths,
        )
        reporter.start()
        node = Node(catalogue, spool, settings, listener, reporter, paths)
        started.append(node)
        return node

    yield start
    for node in started:
        node.listener.shutdown()
        node.reporter.stop()


@dataclass
class Requester:
    """A modality: asks for commitment, and counts the reports it takes, and where."""

    status: int = 0x0000  # what it answers a report with on its own association
    on_association: list[Dataset] = field(default_factory=list)
    on_new: list[Dataset] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def same(self, event: evt.Event) -> tuple[int, None]:
        self.on_association.append(event.event_information)
        self.arrived.set()
        return self.status, None

    def new(self, event: evt.Event) -> tuple[int, None]:
        self.on_new.append(event.event_information)
        self.arrived.set()
        return 0x0000, None

    def associate(
        self, node: Node, tls: ssl.SSLContext | None = None, max_pdu: int = 16382
    ) -> Association:
        ae = AE(ae_title=REQUESTER)
        ae.maximum_pdu_size = max_pdu
        ae.add_requested_context(STORAGE_COMMITMENT_SOP_CLASS)
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title="CURIA",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.same)],
            tls_args=None if tls is None else (tls, "localhost"),
        )
        assert assoc.is_established
        return assoc

    def listen(self, port: int) -> Callable[[], None]:
        """Its own SCP, for reports on a new association (it accepts the SCP role)."""
        ae = AE(ae_title=REQUESTER)
        ae.add_supported_context(STORAGE_COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.new)]
        )
        return server.shutdown


def ask(assoc: Association, uids: list[str]) -> str:
    transaction = generate_uid()
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    status, _ = assoc.send_n_action(
        ds, 1, STORAGE_COMMITMENT_SOP_CLASS, STORAGE_COMMITMENT_INSTANCE
    )
    assert status is not None and status.Status == 0x0000
    return transaction


def stored(node: Node, count: int = 2) -> list[str]:
    files = [header() for _ in range(count)]
    add_series(node.catalogue, node.spool, files)
    return [str(f.SOPInstanceUID) for f in files]


def answered(catalogue: Catalogue, transaction: str) -> CommitmentRequest:
    return wait_for(
        lambda: (r := request_row(catalogue, transaction)).state == CommitmentState.ANSWERED and r,
        15,
        "the request is answered",
    )


def test_the_report_comes_on_the_open_association(start_node: Callable[..., Node]) -> None:
    node = start_node(ReportAddress(association="same_association"))
    uids = stored(node)
    requester = Requester()
    assoc = requester.associate(node)
    try:
        unknown = generate_uid()
        transaction = ask(assoc, [*uids, unknown])
        assert requester.arrived.wait(10), "the report came on the requester's association"
        row = answered(node.catalogue, transaction)
    finally:
        assoc.release()
    (report,) = requester.on_association
    assert report.TransactionUID == transaction
    assert [r.ReferencedSOPInstanceUID for r in report.ReferencedSOPSequence] == uids
    assert [(r.ReferencedSOPInstanceUID, r.FailureReason) for r in report.FailedSOPSequence] == [
        (unknown, 0x0112)
    ]
    assert row.outcome is not None and row.outcome["committed"] == 2
    assert requester.on_new == []


def test_a_long_report_is_cut_to_the_requesters_maximum_pdu(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(ReportAddress(association="same_association"))
    uids = stored(node, 150)  # about 20 KB of event information
    requester = Requester()
    assoc = requester.associate(node, max_pdu=4096)
    try:
        transaction = ask(assoc, uids)
        assert requester.arrived.wait(10)
        answered(node.catalogue, transaction)
    finally:
        assoc.release()
    (report,) = requester.on_association
    assert [r.ReferencedSOPInstanceUID for r in report.ReferencedSOPSequence] == uids


def test_after_archived_the_report_follows_on_the_association_still_open(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(
        ReportAddress(association="same_association"), after_archived=True, poll_seconds=0.1
    )
    uids = stored(node, 1)
    requester = Requester()
    assoc = requester.associate(node)
    try:
        transaction = ask(assoc, uids)
        time.sleep(0.5)
        assert not requester.arrived.is_set(), "not archived yet: no report"
        assert request_row(node.catalogue, transaction).state == CommitmentState.PENDING
        with node.catalogue.session() as session:  # the series reaches the archive
            series_id = session.scalar(sa.select(Series.id))
            session.add(Delivery(series_id=series_id, destination="pacs", state=DeliveryState.SENT))
        assert requester.arrived.wait(10), "archived: the report came on the same association"
        answered(node.catalogue, transaction)
    finally:
        assoc.release()
    assert [
        r.ReferencedSOPInstanceUID for r in requester.on_association[0].ReferencedSOPSequence
    ] == uids


def test_a_refused_report_goes_on_a_new_association_once(start_node: Callable[..., Node]) -> None:
    port = free_port()
    node = start_node(
        ReportAddress(association="same_then_new", host="127.0.0.1", port=port),
        retry_seconds=0.2,
    )
    uids = stored(node)
    requester = Requester(status=0x0110)  # takes nothing on its own association
    stop = requester.listen(port)
    assoc = requester.associate(node)
    try:
        transaction = ask(assoc, uids)
        row = answered(node.catalogue, transaction)
        assert len(requester.on_association) == 1, "tried once on the association"
        assert len(requester.on_new) == 1, "then delivered on a new association"
        assert assoc.is_established, "the association itself goes on"
    finally:
        assoc.release()
        stop()
    assert requester.on_new[0].TransactionUID == transaction
    assert row.attempts == 2
    time.sleep(0.5)
    assert len(requester.on_new) == 1, "answered once, never sent again"


def test_a_requester_that_leaves_at_once_gets_it_on_a_new_association(
    start_node: Callable[..., Node],
) -> None:
    port = free_port()
    node = start_node(
        ReportAddress(association="same_then_new", host="127.0.0.1", port=port),
        after_archived=True,
        poll_seconds=0.1,
    )
    uids = stored(node, 1)
    requester = Requester()
    stop = requester.listen(port)
    try:
        assoc = requester.associate(node)
        transaction = ask(assoc, uids)
        assoc.release()  # before the instances are archived
        with node.catalogue.session() as session:
            series_id = session.scalar(sa.select(Series.id))
            session.add(Delivery(series_id=series_id, destination="pacs", state=DeliveryState.SENT))
        answered(node.catalogue, transaction)
    finally:
        stop()
    assert requester.on_association == []
    assert [r.TransactionUID for r in requester.on_new] == [transaction]


def test_same_association_only_waits_for_the_requesters_next_association(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(
        ReportAddress(association="same_association"), after_archived=True, poll_seconds=0.1
    )
    uids = stored(node, 1)
    requester = Requester()
    assoc = requester.associate(node)
    transaction = ask(assoc, uids)
    assoc.release()
    with node.catalogue.session() as session:
        series_id = session.scalar(sa.select(Series.id))
        session.add(Delivery(series_id=series_id, destination="pacs", state=DeliveryState.SENT))
        session.execute(
            sa.update(CommitmentRequest).values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
    time.sleep(0.5)
    pending = request_row(node.catalogue, transaction)
    assert pending.state == CommitmentState.PENDING, "no new association for this requester"
    assert pending.attempts == 0

    again = requester.associate(node)  # the modality comes back
    try:
        assert requester.arrived.wait(10), "the report came on its next association"
        answered(node.catalogue, transaction)
    finally:
        again.release()
    assert [r.TransactionUID for r in requester.on_association] == [transaction]


def test_new_association_is_the_default() -> None:
    assert ReportAddress(port=104).association == "new_association"
    with pytest.raises(ValueError, match="port is needed"):
        ReportAddress(association="same_then_new")
    assert ReportAddress(association="same_association").port is None


def test_over_tls_the_report_waits_and_comes_on_the_same_association(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The acceptor's wait for the requester's next bytes, between looks at the catalogue,
    leaves a TLS connection intact."""
    pki = make_pki(tmp_path / "pki")
    tls = TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=pki.server_key)
    node = start_node(
        ReportAddress(association="same_association"),
        tls=tls,
        after_archived=True,
        poll_seconds=0.1,
    )
    uids = stored(node, 1)
    requester = Requester()
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    assoc = requester.associate(node, client)
    try:
        transaction = ask(assoc, uids)
        time.sleep(0.5)  # several waits on the socket while the series is not archived
        assert not requester.arrived.is_set()
        with node.catalogue.session() as session:
            series_id = session.scalar(sa.select(Series.id))
            session.add(Delivery(series_id=series_id, destination="pacs", state=DeliveryState.SENT))
        assert requester.arrived.wait(10), "the report came on the TLS association"
        answered(node.catalogue, transaction)
        requester.arrived.clear()
        second = ask(assoc, uids)  # the association still carries requests, and reports
        assert requester.arrived.wait(10)
        answered(node.catalogue, second)
    finally:
        assoc.release()
    assert [r.TransactionUID for r in requester.on_association] == [transaction, second]
