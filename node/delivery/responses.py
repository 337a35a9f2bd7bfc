"""Answers to a pynetdicom requestor's requests reach the call that waits for them.

pynetdicom (3.0) runs a reactor thread beside every association it requests. ``send_c_store``
and the other ``send_*`` calls pause that reactor before sending and wait for the answer
themselves, but the pause can be missed: the reactor marks itself paused before it waits on
its checkpoint and unmarks itself only after waking, so a request sent just after the previous
one's answer sees the stale mark, and the reactor, running again, can take the new answer off
the message queue first. It then drops it as "unexpected" (a warning on the ``pynetdicom``
logger, silent by default) and the request waits for ``dimse_timeout``, while the peer, which
has answered, waits for the next request until its own timeout aborts the association.

The load benchmark (20 senders x 300 C-STOREs on two shared cores) met it 0-2 times a run,
and the DIMSE fuzz test 4 times in 6,000 C-STOREs on a loaded machine. :func:`keep_responses`
hands such an answer back to the queue the waiting call reads, so the call gets it as if the
reactor had never seen it. Requests of the association
itself (the peer's, which the reactor is there to serve) are served as before.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.association import Association

log = logging.getLogger(__name__)


class ResponseKeeper:
    """Installed on one association: answers its reactor takes go back to the queue."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.handed_back = 0  # answers the reactor took and this keeper returned
        self._serve = assoc._serve_request

    def __call__(self, msg: Any, context_id: int) -> None:
        if msg.is_valid_response and not msg.is_valid_request:
            # Only a call of ours that waits for it can use an answer; put it where it looks.
            self.handed_back += 1
            log.debug("an answer taken by the association's reactor was handed back")
            self.assoc.dimse.msg_queue.put((context_id, msg))
            return
        self._serve(msg, context_id)


def keep_responses(assoc: Association) -> ResponseKeeper:
    """Make ``assoc`` (just established, as a requestor) deliver every answer to the
    ``send_*`` call waiting for it. For requests answered by one response (C-STORE, C-ECHO,
    N-services); returns the keeper, whose ``handed_back`` counts the answers it saved."""
    keeper = ResponseKeeper(assoc)
    assoc._serve_request = keeper  # type: ignore[method-assign]
    return keeper
