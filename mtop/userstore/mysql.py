"""Users in MySQL or MariaDB, through ``twisted.enterprise.adbapi`` and
PyMySQL.

adbapi runs the blocking driver in its thread pool (see
`mtop.userstore.sql.AdbapiUserStore`).  There is no connection to watch
between queries, so an outage is noticed by the queries: one failing
because the server cannot be reached starts it, the next one answered ends
it.
"""

from __future__ import annotations

from typing import Any

from twisted.enterprise import adbapi
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.dsn import describe_dsn, parse_mysql_dsn
from mtop.userstore import IPresence, IQuotaLeases, IUsageSink, IUserStore
from mtop.userstore.sql import AdbapiUserStore, QuietConnectionPool

POOL_SIZE = 4

#: Server errors that mean "not serving this client now" rather than a
#: fault of the query: too many connections, shutting down, connection
#: killed (MariaDB).  Client-side errors (2000-2999: cannot connect, server
#: gone, connection lost) mean the same.
_OUTAGE_ERRORS = frozenset({1040, 1053, 1927})


@implementer(IUserStore, IUsageSink, IQuotaLeases, IPresence)
class MySQLUserStore(AdbapiUserStore):
    """Users in a MySQL/MariaDB database named by a Go-style or URL DSN
    (`IUserStore`, `IUsageSink`; no change feed: a change shows at the
    next lookup, and the sessions recheck open tunnels periodically)."""

    driver = "mysql"
    begin = "START TRANSACTION"
    lease_begin = "START TRANSACTION"

    def __init__(self, dsn: str, query_timeout: float = 5.0):
        super().__init__(describe_dsn("mysql", dsn))
        self.kwargs: dict[str, Any] = parse_mysql_dsn(dsn)
        # A dead server must not hang a lookup thread for long.
        timeout = max(1, int(query_timeout))
        self.kwargs.setdefault("connect_timeout", timeout)
        self.kwargs.setdefault("read_timeout", timeout)
        self.kwargs.setdefault("write_timeout", timeout)
        self.kwargs["autocommit"] = True

    def _start_pool(self) -> None:
        self.pool = QuietConnectionPool(
            "pymysql", cp_min=1, cp_max=POOL_SIZE, cp_noisy=False, cp_reconnect=True, **self.kwargs
        )

    def _is_database_error(self, failure: Failure) -> bool:
        import pymysql

        return bool(failure.check(pymysql.Error, adbapi.ConnectionLost))

    def _is_outage(self, failure: Failure) -> bool:
        import pymysql

        if failure.check(adbapi.ConnectionLost, pymysql.err.InterfaceError):
            return True
        if failure.check(pymysql.err.OperationalError, pymysql.err.InternalError):
            code = failure.value.args[0] if failure.value.args else None
            return isinstance(code, int) and (2000 <= code < 3000 or code in _OUTAGE_ERRORS)
        return False
