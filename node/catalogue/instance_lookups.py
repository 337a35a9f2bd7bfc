"""Which SOP Instance UIDs the catalogue holds already, and with what bytes: the lookups
ingest makes before storing (one instance, or a batch), built once so that an instance
costs their execution, not their construction."""

from __future__ import annotations

import contextlib
import queue
from typing import Any

from sqlalchemy import Table, bindparam, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from node.catalogue.db import make_engine
from node.catalogue.models import Instance

try:  # optional: where it is not built, every question goes through the driver
    from node.catalogue import _uid_lookup  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _uid_lookup = None

INSTANCES: Table = Instance.__table__  # type: ignore[assignment]

#: (sop_instance_uid, id, sha256, path) of catalogued instances; sha256 is None for one
#: filed from the ingest journal whose digest nothing has needed yet (computed from the
#: file at ``path`` when first needed)
KNOWN = select(INSTANCES.c.sop_instance_uid, INSTANCES.c.id, INSTANCES.c.sha256, INSTANCES.c.path)
KNOWN_ONE = KNOWN.where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
#: a row's id if ``uid`` is catalogued (the column is unique): whether it is
IS_CATALOGUED = select(INSTANCES.c.id).where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
KNOWN_ANY = KNOWN.where(INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))


class UidLookup:
    """Whether a SOP Instance UID is catalogued, asked on connections kept for it alone.

    Every instance received asks this once, on its association's thread, while its data
    set arrives. Asked through the catalogue's engine, each question cost a pool checkout
    (a ping, on PostgreSQL), a compiled statement's execution and a rollback on return:
    0.07 ms of interpreter time in isolation, and 0.25 ms (median) on a listener receiving
    one series while its journal was filed behind it. Here it is the statement compiled
    once, run on a connection that holds no transaction (autocommit: every question sees
    the latest commit, and giving the connection back costs no rollback).

    The connections are the engine's, detached from its pool once made and kept in a
    queue of their own: the pool's checkout and return (its locks and conditions, and the
    bookkeeping of a proxied connection) were a tenth of what ten associations' threads
    spent holding the interpreter lock, and each contended lock is a hand-off between
    threads."""

    def __init__(self, url: str, connections: int = 16) -> None:
        # As many connections kept as associations commonly receive at once: past that,
        # a question opens a connection of its own, closed after it.
        self.engine = make_engine(url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
        compiled = IS_CATALOGUED.compile(dialect=self.engine.dialect)
        self._sql = str(compiled)
        self._positional = compiled.positional
        self._error = self.engine.dialect.loaded_dbapi.Error
        self._kept = connections
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._disposed = False
        self._compiled = _compiled_lookup(url, self._sql)

    @property
    def compiled(self) -> bool:
        """Whether questions are asked by the compiled lookup first."""
        return self._compiled is not None

    def __call__(self, uid: str) -> bool:
        """True if a row of ``uid`` is committed; :class:`sqlalchemy.exc.DBAPIError`
        where the catalogue cannot be read (that connection is then closed).

        The connections kept are not pinged before each question (the pool pinged
        PostgreSQL's on every checkout): one the server has dropped (a restart) fails its
        question, which is then asked once more on a new connection, every other kept
        connection closed, as stale as it."""
        if self._compiled is not None:
            try:
                return bool(self._compiled(uid))
            except _uid_lookup.LookupFailed:
                pass  # asked below, which waits for SQLite, or says why it cannot answer
        params: tuple[str] | dict[str, str] = (uid,) if self._positional else {"uid": uid}
        for retry in (False, True):
            connection = self._connection()
            try:
                cursor = connection.cursor()
                try:
                    cursor.execute(self._sql, params)
                    found = cursor.fetchone() is not None
                finally:
                    cursor.close()
            except self._error as exc:
                _close(connection)
                if not retry and self.engine.dialect.is_disconnect(exc, connection, None):
                    self._close_idle()
                    continue
                raise DBAPIError.instance(self._sql, params, exc, self._error) from exc
            except BaseException:
                _close(connection)
                raise
            if not self._disposed and self._idle.qsize() < self._kept:
                self._idle.put(connection)
            else:
                _close(connection)
            return found
        raise AssertionError("unreachable: the second try returns or raises")

    def _connection(self) -> Any:
        """An idle connection, or a new one (the engine's settings applied, then detached
        from its pool: ours to keep or close)."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            proxied = self.engine.raw_connection()
            proxied.detach()
            return proxied.dbapi_connection

    def _close_idle(self) -> None:
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                return

    def dispose(self) -> None:
        self._disposed = True  # a question still being answered closes its connection
        if self._compiled is not None:
            self._compiled.close()  # a question after this goes the usual way
        self._close_idle()
        self.engine.dispose()


def _compiled_lookup(url: str, sql: str) -> Any:
    """The compiled lookup of ``sql`` on the SQLite catalogue file at ``url``; None for
    another database, one in memory, or where the module is not built or cannot open it."""
    parsed = make_url(url)
    if _uid_lookup is None or parsed.get_backend_name() != "sqlite":
        return None
    path = parsed.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    try:
        return _uid_lookup.Catalogued(path, sql)
    except _uid_lookup.LookupFailed:
        return None


def _close(connection: Any) -> None:
    with contextlib.suppress(Exception):  # closing what failed may fail too
        connection.close()
