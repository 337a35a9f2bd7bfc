"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled quickly.

kombu hands every transport option to ``create_engine``, so the stock transport cannot be
given a polling interval; this subclass takes it as a class attribute instead. Messages
live in a SQLite database in the data folder and survive restarts.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SqlAlchemyTransport

SCHEME = "curia-sqla"
POLLING_INTERVAL = 0.1


class Transport(SqlAlchemyTransport):
    polling_interval = POLLING_INTERVAL


def register() -> None:
    """Make ``curia-sqla+sqlite:///path`` URLs resolve to this transport."""
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
