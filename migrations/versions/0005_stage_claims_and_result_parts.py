"""stage claims on runs and deliveries, result parts unique per run

A run or a delivery is worked on by one execution of its stage at a time: the claim columns
say which one and since when (renewed while it works). Results are unique per
(run, kind, part), so a stage executed twice records its SRs and SEGs once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim_stage", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("part", sa.String(length=64), nullable=True))
    # Results recorded before parts existed keep their own id as part: unique, and never
    # mistaken for one a new run records (those are small indexes or head names).
    results = sa.table("results", sa.column("id", sa.Integer), sa.column("part", sa.String))
    op.execute(
        results.update().values(part="legacy-" + sa.cast(results.c.id, sa.String(length=20)))
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.alter_column("part", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint("uq_results_run_kind_part", ["run_id", "kind", "part"])


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_constraint("uq_results_run_kind_part", type_="unique")
        batch_op.drop_column("part")

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("claim_token")

    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("claim_token")
        batch_op.drop_column("claim_stage")
