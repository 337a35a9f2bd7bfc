"""The interpreter's cyclic garbage collector, set for a node that runs for months.

Once the node is up it holds several hundred thousand objects that live as long as it does
(pydicom's dictionaries, SQLAlchemy's tables, pynetdicom's contexts, the settings). The
collector walked all of them again on each full pass, and ran a young pass every 700 new
container objects, hundreds per instance received: measured with ``perf`` on the listener
receiving a series, 6.3 % of the node's processor time went to collecting. With what exists
at start-up frozen (it is never garbage) and a young pass every 10,000 new objects, 0.2 %.
Cycles are still collected, less often.
"""

from __future__ import annotations

import gc

YOUNG_PASS_EVERY = 10_000  # new container objects between two young passes (default 700)


def settle_collector() -> None:
    """Collect once, freeze what survives (the node's long-lived objects), and space the
    young passes out. Called once the node has started."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_PASS_EVERY, middle, old)
