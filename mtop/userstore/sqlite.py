"""Users in SQLite, through ``twisted.enterprise.adbapi``.

The database is opened read-write but never created: a missing file is an
error the operator should see (``mtopctl db init`` creates it).
"""

from __future__ import annotations

import sqlite3
from urllib.parse import quote

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from mtop.logs import logger
from mtop.userstore import StoreUnavailable, UserRecord

LOOKUP_SQL = "SELECT username, salt, password FROM mtop_user WHERE username = ?"


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(
        f"file:{quote(path)}?mode=rw", uri=True, check_same_thread=False, timeout=5.0
    )
    # Another process (mtopctl, the operator's tools) writes concurrently.
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


class _SQLiteModule:
    """What adbapi needs from a DB-API module, opening by path the way
    `_connect` does."""

    paramstyle = "qmark"
    threadsafety = 1
    Error = sqlite3.Error
    connect = staticmethod(_connect)


class SQLiteUserStore(Service):
    """`UserStore` over a SQLite file; a Service owning its thread pool."""

    _log = logger()

    def __init__(self, path: str):
        self.path = path
        self.pool: adbapi.ConnectionPool | None = None

    def startService(self) -> None:
        super().startService()
        self.pool = adbapi.ConnectionPool(
            "sqlite3", self.path, cp_min=1, cp_max=1, cp_noisy=False, cp_reconnect=True
        )
        # Connect with _connect(path), not sqlite3.connect(path), so the
        # file is never created by accident.
        self.pool.dbapi = _SQLiteModule
        self.check()

    def stopService(self) -> None:
        super().stopService()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def check(self) -> Deferred:
        """Log whether the user table can be read (at start-up)."""
        d = self.pool.runQuery("SELECT COUNT(*) FROM mtop_user")

        def ok(rows):
            self._log.info("users: SQLite {path} has {count} users", path=self.path, count=rows[0][0])

        def bad(failure):
            self._log.error(
                "users: cannot read mtop_user in SQLite {path}: {error}; "
                "create it with 'mtopctl db init'",
                path=self.path,
                error=failure.getErrorMessage(),
            )

        return d.addCallbacks(ok, bad)

    def lookup(self, username: str) -> Deferred[UserRecord | None]:
        if self.pool is None:
            raise StoreUnavailable("the SQLite user store is not running")
        d = self.pool.runQuery(LOOKUP_SQL, (username,))

        def row(rows):
            if not rows:
                return None
            name, salt, password = rows[0]
            return UserRecord(name, salt or "", password or "")

        def failed(failure):
            failure.trap(sqlite3.Error)
            raise StoreUnavailable(f"SQLite {self.path}: {failure.getErrorMessage()}")

        return d.addCallbacks(row, failed)
