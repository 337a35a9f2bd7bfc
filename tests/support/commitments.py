"""Storage commitment requests as the catalogue holds them, read back for assertions."""

from __future__ import annotations

import sqlalchemy as sa

from node.catalogue.db import Catalogue
from node.catalogue.models import CommitmentRequest


def request_row(catalogue: Catalogue, transaction: str) -> CommitmentRequest:
    """The request with this Transaction UID, detached from its session."""
    with catalogue.session() as session:
        row = session.scalar(
            sa.select(CommitmentRequest).where(CommitmentRequest.transaction_uid == transaction)
        )
        assert row is not None
        session.expunge(row)
        return row
