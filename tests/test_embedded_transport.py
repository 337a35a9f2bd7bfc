"""The embedded broker when two processes open the same broker file at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Connection

from pipelines.jobs import embedded_transport


def test_a_queue_created_by_another_process_meanwhile_is_used_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers starting together both find no row for a queue; the second insert hits
    the unique name. That worker must carry on with the row the first one made."""
    embedded_transport.register()
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    with Connection(f"{embedded_transport.SCHEME}+{url}") as conn:
        channel = conn.default_channel
        channel._get_or_create("warm-up")  # creates the tables
        other = sa.create_engine(url)
        session = channel.session
        real_add = session.add

        def add_after_the_other_process(obj: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(obj, channel.queue_cls):  # the race: the other worker wins here
                with other.begin() as connection:
                    connection.execute(
                        sa.text("INSERT INTO kombu_queue (name) VALUES (:name)"),
                        {"name": obj.name},
                    )
            real_add(obj, *args, **kwargs)

        monkeypatch.setattr(session, "add", add_after_the_other_process)
        queue = channel._get_or_create("curia.report")
        monkeypatch.undo()
        with other.connect() as connection:
            ids = connection.execute(
                sa.text("SELECT id FROM kombu_queue WHERE name = 'curia.report'")
            ).all()
        other.dispose()
        assert [row.id for row in ids] == [queue.id]
        channel._put("curia.report", {"body": "x", "properties": {}})  # the channel still works
        assert channel._size("curia.report") == 1
