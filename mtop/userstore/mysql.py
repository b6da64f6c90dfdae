"""Users in MySQL or MariaDB, through ``twisted.enterprise.adbapi`` and
PyMySQL.

adbapi runs the blocking driver in its thread pool.  With ``cp_reconnect``
a connection that fails is dropped and the next query opens a new one, so
the store recovers by itself when the database comes back.
"""

from __future__ import annotations

from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mtop.dsn import describe_dsn, parse_mysql_dsn
from mtop.userstore.sql import SQLUserStore

POOL_SIZE = 4


class MySQLUserStore(SQLUserStore):
    """Users in a MySQL/MariaDB database named by a Go-style or URL DSN."""

    driver = "mysql"

    def __init__(self, dsn: str, query_timeout: float = 5.0):
        super().__init__(describe_dsn("mysql", dsn))
        self.kwargs: dict[str, Any] = parse_mysql_dsn(dsn)
        # A dead server must not hang a lookup thread for long.
        timeout = max(1, int(query_timeout))
        self.kwargs.setdefault("connect_timeout", timeout)
        self.kwargs.setdefault("read_timeout", timeout)
        self.kwargs.setdefault("write_timeout", timeout)
        self.kwargs["autocommit"] = True
        self.pool: adbapi.ConnectionPool | None = None

    def _start_pool(self) -> None:
        self.pool = adbapi.ConnectionPool(
            "pymysql", cp_min=1, cp_max=POOL_SIZE, cp_noisy=False, cp_reconnect=True, **self.kwargs
        )

    def _stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        return self.pool.runQuery(sql, params or None)

    def _is_database_error(self, failure: Failure) -> bool:
        import pymysql

        return bool(failure.check(pymysql.Error, adbapi.ConnectionLost))
