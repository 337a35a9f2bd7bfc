"""completion signals: MPPS steps, storage commitment requests, which signal completed a series

Modalities report their performed procedure steps (MPPS, forwarded to a RIS/PACS when
configured) and ask for storage commitment; all are kept so that a restart loses none. A series records the signal that completed
it, and a sender's own signals (the end of its association) are kept until read.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completed_by", sa.String(length=32), nullable=True))

    op.create_table(
        "performed_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("performed_series", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index(
        "ix_performed_steps_study_instance_uid", "performed_steps", ["study_instance_uid"]
    )
    op.create_index("ix_performed_steps_ended_at", "performed_steps", ["ended_at"])

    op.create_table(
        "mpps_forwards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_uid", sa.String(length=64), nullable=False),
        sa.Column("command", sa.String(length=16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_mpps_forwards_step_uid", "mpps_forwards", ["step_uid"])
    op.create_index("ix_mpps_forwards_sent_at", "mpps_forwards", ["sent_at"])

    op.create_table(
        "commitment_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("instances", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("transaction_uid"),
    )
    op.create_index("ix_commitment_requests_state", "commitment_requests", ["state"])

    op.create_table(
        "completion_signals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("signal", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expected", sa.JSON(), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_completion_signals_series_instance_uid",
        "completion_signals",
        ["series_instance_uid"],
    )


def downgrade() -> None:
    op.drop_index("ix_completion_signals_series_instance_uid", table_name="completion_signals")
    op.drop_table("completion_signals")
    op.drop_index("ix_mpps_forwards_sent_at", table_name="mpps_forwards")
    op.drop_index("ix_mpps_forwards_step_uid", table_name="mpps_forwards")
    op.drop_table("mpps_forwards")
    op.drop_index("ix_commitment_requests_state", table_name="commitment_requests")
    op.drop_table("commitment_requests")
    op.drop_index("ix_performed_steps_ended_at", table_name="performed_steps")
    op.drop_index("ix_performed_steps_study_instance_uid", table_name="performed_steps")
    op.drop_table("performed_steps")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("completed_by")
