"""refused association tallies

Refused association requests are counted per period, calling AE title, address and reason
in one row, instead of one association record each.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refused_associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "period_start", "calling_ae_title", "address", "reason", name="uq_refused_period_key"
        ),
    )
    with op.batch_alter_table("refused_associations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_refused_associations_period_start"), ["period_start"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("refused_associations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_refused_associations_period_start"))
    op.drop_table("refused_associations")
