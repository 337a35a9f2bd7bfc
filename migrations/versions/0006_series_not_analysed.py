"""series state reason, forwarded instances

A series' state reason says why it was not analysed; a forward records the instances it
sent, so late instances go on their own and nothing goes twice.

A series no head applies to (a dose report, a key object selection, an RT structure set, a
localizer, a stack no head accepts) ends "not analysed", which is not a failure; the reason
says why, in words a radiologist or an administrator understands. The new state values
(series ``not_analysed``, run ``not_analysed``) need no DDL: the state columns are plain
strings of up to 20 characters.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_instances", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("sent_instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("state_reason")
