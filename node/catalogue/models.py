"""Catalogue tables.

Rows describe files in the spool (instances), their grouping (series, studies), and the
node's work on them (pipeline runs, results, deliveries), plus peers and an audit trail.
Patient-identifying values are kept only where the node needs them to answer queries.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # quiet period over, pipeline queued
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    #: Nothing a head applies to (not an image, a localizer, a stack no head accepts):
    #: terminal and not a failure; ``Series.state_reason`` says why.
    NOT_ANALYSED = "not_analysed"


class RunState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    REPORTED = "reported"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: Ended without analysis because no head applies to the series (not a failure).
    NOT_ANALYSED = "not_analysed"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, values_callable=lambda e: [m.value for m in e], native_enum=False, length=20)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING)
    state_reason: Mapped[str | None] = mapped_column(
        Text, doc="why the series is in its state, e.g. why it was not analysed"
    )
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[datetime | None]
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="0 routine .. 9 stat")
    routing: Mapped[dict[str, Any] | None] = mapped_column(
        doc="what the routing rules decided for this series, and why"
    )
    completed_by: Mapped[str | None] = mapped_column(
        String(32), doc="the signal that completed it: quiet, mpps, association-end, ..."
    )

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    runs: Mapped[list[PipelineRun]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None]
    path: Mapped[str] = mapped_column(Text, doc="relative to the spool folder")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(
        String(64), doc="of the stored file; None until first needed (filed from the journal)"
    )
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class PipelineRun(Base):
    """One analysis of one series by one backbone and head set.

    ``run_key`` (series, backbone version, heads) is unique: the same result is never
    computed, reported or delivered twice unless a re-run is asked for explicitly.
    """

    __tablename__ = "pipeline_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    run_key: Mapped[str] = mapped_column(String(200), unique=True)
    rerun_of: Mapped[int | None] = mapped_column(
        ForeignKey("pipeline_runs.id"), doc="the run whose results this one supersedes"
    )
    requested_by: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[RunState] = mapped_column(_enum(RunState), default=RunState.QUEUED)
    backbone: Mapped[str | None] = mapped_column(String(200))
    heads: Mapped[str | None] = mapped_column(Text)
    findings: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    inferred_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    claim_stage: Mapped[str | None] = mapped_column(
        String(16), doc="the stage that holds the run now (prepare, analyse, report)"
    )
    claim_token: Mapped[str | None] = mapped_column(
        String(32), doc="who holds it: one execution of that stage, nobody else may finish it"
    )
    claimed_at: Mapped[datetime | None] = mapped_column(
        doc="renewed while the holder works; a claim older than the lease may be taken over"
    )

    series: Mapped[Series] = relationship(back_populates="runs")
    results: Mapped[list[Result]] = relationship(back_populates="run")


class Result(Base):
    """A DICOM object the node wrote (an SR or a SEG), kept under the results folder.

    Unique per (run, kind, part): a run's report or segmentation is recorded once, however
    often its stage is executed.
    """

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("run_id", "kind", "part", name="uq_results_run_kind_part"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    part: Mapped[str] = mapped_column(
        String(64),
        default="0",
        doc="which of the run's objects of this kind: SR part index, SEG head name",
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="relative to the results folder")
    summary: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[PipelineRun] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Peer(Base):
    """A DICOM or HTTP peer: a source allowed to send, or a destination to send to."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # source | destination
    protocol: Mapped[str] = mapped_column(String(16), default="dimse")
    ae_title: Mapped[str | None] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    url: Mapped[str | None] = mapped_column(Text)
    options: Mapped[dict[str, Any] | None] = mapped_column(
        doc="protocol-specific settings of a destination (TLS, credentials, result routing)"
    )
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None]


class Delivery(Base):
    """Sending one result, or one received series (a routed forward), to one destination.

    Unique per (result, destination) and per (series, destination): routing a series twice
    to the same place is one delivery.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        UniqueConstraint("series_id", "destination", name="uq_deliveries_series_destination"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), index=True)
    series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id"), index=True, doc="set when the original series is forwarded"
    )
    rule: Mapped[str | None] = mapped_column(String(64), doc="the routing rule that asked for it")
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(
        String(32), doc="the one send in progress; nobody else sends while it holds the claim"
    )
    claimed_at: Mapped[datetime | None] = mapped_column(
        doc="renewed while sending; a claim older than the lease may be taken over"
    )
    sent_instances: Mapped[list[int] | None] = mapped_column(
        JSON, doc="a forwarded series: the instances (ids) sent, each sent once"
    )

    result: Mapped[Result | None] = relationship(back_populates="deliveries")
    series: Mapped[Series | None] = relationship()


class ApiToken(Base):
    """A bearer token for the HTTP API; only its SHA-256 is kept, the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | read | store
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class RuleSet(Base):
    """One version of the routing rules; the newest row is the one in force."""

    __tablename__ = "rule_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    document: Mapped[str] = mapped_column(Text, doc="the rules as the admin wrote them (YAML)")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Who did what, when: configuration changes and notable node events."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict[str, Any] | None]


class AssociationRecord(Base):
    """One DIMSE association: who, from where, what happened, how long (no patient data)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    port: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(16))  # released | aborted | rejected
    reason: Mapped[str | None] = mapped_column(String(200))
    stored: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    statuses: Mapped[dict[str, Any] | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    ended_at: Mapped[datetime | None]
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)


class RefusedAssociations(Base):
    """Refused association requests, counted per calling AE title, address and reason in
    each period: a stranger retrying thousands of times costs one row, not thousands."""

    __tablename__ = "refused_associations"
    __table_args__ = (
        UniqueConstraint(
            "period_start", "calling_ae_title", "address", "reason", name="uq_refused_period_key"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    period_start: Mapped[datetime] = mapped_column(index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(200))
    count: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)


class StepStatus(enum.StrEnum):
    """Performed Procedure Step Status (0040,0252), PS3.3 C.4.14."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class PerformedStep(Base):
    """One Modality Performed Procedure Step a modality reported (N-CREATE, then N-SET).

    ``performed_series`` maps each Series Instance UID the step lists to the SOP Instance
    UIDs it lists for it: once the step has ended and every one is stored, that series is
    complete without waiting for its quiet period. No patient data is kept.
    """

    __tablename__ = "performed_steps"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    status: Mapped[StepStatus] = mapped_column(_enum(StepStatus))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    performed_series: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(
        index=True, doc="when it became COMPLETED or DISCONTINUED"
    )


class MppsForward(Base):
    """One accepted MPPS N-CREATE or N-SET, to be forwarded to the configured RIS/PACS.

    Written in the transaction that accepts it, sent in id order (a step's N-SET never
    overtakes its N-CREATE), kept once sent for the record.
    """

    __tablename__ = "mpps_forwards"

    id: Mapped[int] = mapped_column(primary_key=True)
    step_uid: Mapped[str] = mapped_column(String(64), index=True)
    command: Mapped[str] = mapped_column(String(16), doc="n-create | n-set")
    data: Mapped[dict[str, Any]] = mapped_column(doc="the data set as DICOM JSON (PS3.18 F)")
    sent_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CommitmentState(enum.StrEnum):
    PENDING = "pending"  # persisted, N-ACTION answered, report not yet delivered
    ANSWERED = "answered"  # the N-EVENT-REPORT was accepted by the requester


class CommitmentRequest(Base):
    """A Storage Commitment Push Model request (N-ACTION), kept until it is answered.

    Written before the N-ACTION is answered with Success, so a restart never loses one: the
    reporter picks up every pending request and sends its N-EVENT-REPORT.
    """

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64), doc="where the request came from")
    instances: Mapped[dict[str, Any]] = mapped_column(
        doc="{'items': [[SOP Class UID, SOP Instance UID], ...]} as requested"
    )
    state: Mapped[CommitmentState] = mapped_column(
        _enum(CommitmentState), default=CommitmentState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(
        doc="what was reported: committed count, and each failed UID with its reason"
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    answered_at: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_at: Mapped[datetime | None]


class CompletionSignal(Base):
    """A sender's word that a series is whole, recorded by the receiver and read by the
    completion watcher: the end of its association (counts only if no instance of the
    series arrived after it), or an ended MPPS step (counts once every instance in
    ``expected`` is stored)."""

    __tablename__ = "completion_signals"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    signal: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    expected: Mapped[dict[str, Any] | None] = mapped_column(
        doc="{'sop_instance_uids': [...]} the sender listed for the series (MPPS)"
    )
    source: Mapped[str | None] = mapped_column(
        String(64), doc="what gave it: the MPPS SOP Instance UID, or the calling AE title"
    )
