"""instance digests on demand: an instance filed from the ingest journal has no SHA-256 yet

The digest of a catalogued instance is read only when the same SOP Instance UID arrives
again (the duplicate policy compares bytes) or a journal record is filed again after a
crash. Computing it for every instance as it was filed cost 0.3-0.45 ms of processor time
each, about a fifth of the node's; it is now computed from the stored file the first time
it is needed, and kept.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column("sha256", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    # Rows left without a digest get it before the column is required again; the file is
    # unknown to SQL, so they get a placeholder that matches no bytes (all zeros is not a
    # SHA-256 any input is known to have), and the duplicate policy treats them as differing.
    op.execute("UPDATE instances SET sha256 = '" + "0" * 64 + "' WHERE sha256 IS NULL")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column("sha256", existing_type=sa.String(length=64), nullable=False)
