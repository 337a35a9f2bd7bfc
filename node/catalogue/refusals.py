"""Refused association tallies in the catalogue: added to in batches, pruned by age."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import cast

from sqlalchemy import CursorResult, delete, update

from node.catalogue.db import Catalogue
from node.catalogue.models import RefusedAssociations

#: (period start, calling AE title, address, reason)
TallyKey = tuple[datetime, str, str, str]


def add_refusals(catalogue: Catalogue, counts: Mapping[TallyKey, tuple[int, datetime]]) -> None:
    """Add ``counts`` (how many, and when the last one was) to their rows, in one
    transaction; a key seen for the first time gets its row. Only the listener writes
    here, so an UPDATE that finds no row is followed by the INSERT without a race."""
    with catalogue.session() as session:
        for (period, calling, address, reason), (count, last_at) in counts.items():
            table = RefusedAssociations
            result = cast(
                CursorResult[object],
                session.execute(
                    update(table)
                    .where(
                        table.period_start == period,
                        table.calling_ae_title == calling,
                        table.address == address,
                        table.reason == reason,
                    )
                    .values(count=table.count + count, last_at=last_at)
                ),
            )
            if result.rowcount == 0:
                session.add(
                    RefusedAssociations(
                        period_start=period,
                        calling_ae_title=calling,
                        address=address,
                        reason=reason,
                        count=count,
                        last_at=last_at,
                    )
                )


def prune_refusals(catalogue: Catalogue, before: datetime) -> int:
    """Delete the tallies of periods that began before ``before``; how many rows went."""
    with catalogue.session() as session:
        result = cast(
            CursorResult[object],
            session.execute(
                delete(RefusedAssociations).where(RefusedAssociations.period_start < before)
            ),
        )
        return int(result.rowcount or 0)
