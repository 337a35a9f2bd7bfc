"""The end of an association as a completion signal, for senders known to send each series
whole on one association.

When such a sender releases its association, every series it stored on it is recorded as
signalled; the completion watcher completes it at once unless an instance of it arrived
after the signal. An aborted association says nothing: the sender may try again.
"""

from __future__ import annotations

from collections.abc import Mapping

from node.catalogue.db import Catalogue
from node.catalogue.models import CompletionSignal, utcnow
from node.core.settings import SourceSignals
from node.dimse.association import Association

ASSOCIATION_END = "association-end"


def record_association_end(
    catalogue: Catalogue,
    association: Association,
    outcome: str,
    sources: Mapping[str, SourceSignals],
) -> int:
    """Record the signal for each series stored on a released association from a sender
    with ``association_end`` on; return how many were recorded."""
    source = sources.get(association.requestor.calling_ae_title)
    if outcome != "released" or source is None or not source.association_end:
        return 0
    if not association.series_uids:
        return 0
    now = utcnow()
    with catalogue.session() as session:
        session.add_all(
            CompletionSignal(
                series_instance_uid=uid,
                signal=ASSOCIATION_END,
                at=now,
                source=association.requestor.calling_ae_title[:64],
            )
            for uid in sorted(association.series_uids)
        )
    return len(association.series_uids)
