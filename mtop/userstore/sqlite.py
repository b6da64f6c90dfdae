"""Users in SQLite, through ``twisted.enterprise.adbapi``.

The database is opened read-write but never created: a missing file is an
error the operator should see (``mtopctl db init`` creates it).
"""

from __future__ import annotations

import sqlite3
from urllib.parse import quote

from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.userstore import IPresence, IQuotaLeases, IUsageSink, IUserStore
from mtop.userstore.sql import AdbapiUserStore, QuietConnectionPool


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


@implementer(IUserStore, IUsageSink, IQuotaLeases, IPresence)
class SQLiteUserStore(AdbapiUserStore):
    """Users in a SQLite file (`IUserStore`, `IUsageSink`); one connection
    in adbapi's thread pool.  No change feed: SQLite cannot tell of other
    processes' writes, so a change shows at the next lookup (the sessions
    recheck open tunnels periodically)."""

    driver = "sqlite"
    # Locks the file for writing at once: two processes granting leases
    # never both read before either writes.
    lease_begin = "BEGIN IMMEDIATE"

    def __init__(self, path: str):
        super().__init__(f"SQLite {path}")
        self.path = path

    def _start_pool(self) -> None:
        self.pool = QuietConnectionPool(
            "sqlite3", self.path, cp_min=1, cp_max=1, cp_noisy=False, cp_reconnect=True
        )
        # Connect with _connect(path), not sqlite3.connect(path), so the
        # file is never created by accident.
        self.pool.dbapi = _SQLiteModule

    def _sql(self, sql: str) -> str:
        return sql

    def _is_database_error(self, failure: Failure) -> bool:
        return bool(failure.check(sqlite3.Error))
