"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled quickly.

kombu hands every transport option to ``create_engine``, so the stock transport cannot be
given a polling interval; this subclass takes it as a class attribute instead. Messages
live in a SQLite database in the data folder and survive restarts.

The stock transport is first-in first-out; this one honours message priority (0-9, as
RabbitMQ does with ``x-max-priority``), so a STAT series overtakes routine ones waiting
in the same queue. Among equal priorities the order stays first-in first-out.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as SqlAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SqlAlchemyTransport
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

SCHEME = "curia-sqla"
POLLING_INTERVAL = 0.1
#: How many waiting messages are looked at to find the most urgent one.
PRIORITY_WINDOW = 500


class Channel(SqlAlchemyChannel):
    def _get_or_create(self, queue: str) -> Any:
        """kombu checks, then inserts, guarded only by a lock of its own process: two
        workers starting on one broker file can both miss the queue's row, and the second
        insert fails on the unique name. The loser reads the winner's row instead of dying."""
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        obj = self._get_or_create(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            waiting = (
                self.session.query(self.message_cls)
                .with_for_update()
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible != False)  # noqa: E712 (SQL expression)
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(PRIORITY_WINDOW)
                .all()
            )
            if not waiting:
                raise Empty()
            payloads = [loads(bytes_to_str(msg.payload)) for msg in waiting]
            best = max(
                range(len(waiting)),
                key=lambda i: (self._get_message_priority(payloads[i]), -i),
            )
            waiting[best].visible = False
            message: dict[str, Any] = payloads[best]
            return message
        finally:
            self.session.commit()


class Transport(SqlAlchemyTransport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL


def register() -> None:
    """Make ``curia-sqla+sqlite:///path`` URLs resolve to this transport."""
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
