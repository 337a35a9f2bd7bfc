"""Engine, sessions and schema upgrades for the catalogue (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# The Alembic scripts ship as package data beside ``node``, so an installed node upgrades
# its catalogue without the source tree.
MIGRATIONS_PACKAGE = "migrations"


def make_engine(url: str, **options: Any) -> Engine:
    """Create an engine tuned for durability (``options``: more of ``create_engine``'s).

    SQLite runs in WAL mode with ``synchronous=FULL`` so a committed row survives a power
    cut, and a busy timeout so the listener, watcher and worker threads can share it. Its
    pooled connections are not pinged on checkout: a file database has no server that
    could have dropped them, and the ping would cost every short transaction a query.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **options
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    settings: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
    return create_engine(url, **(settings | options))


@contextmanager
def migrations_dir() -> Iterator[Path]:
    """The migration scripts as a folder on disk, wherever the node is installed."""
    with resources.as_file(resources.files(MIGRATIONS_PACKAGE)) as folder:
        yield folder


def alembic_config(url: str, script_location: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Bring the schema to the newest revision; the node calls this on every start."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with migrations_dir() as scripts:
        command.upgrade(alembic_config(url, scripts), "head")


class Catalogue:
    """A session factory bound to one database; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
