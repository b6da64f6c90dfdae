"""Users in PostgreSQL, through txpostgres (psycopg2's asynchronous mode on
the reactor, no threads).

Each pooled connection has txpostgres' dead-connection detector: when the
database goes away, queries on it fail at once (the login is refused as
"store unavailable") while it reconnects in the background with backoff
(1 s up to 10 s); when the database is back, lookups work again with no
restart.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure

from mtop.dsn import describe_dsn
from mtop.logs import logger
from mtop.userstore import StoreUnavailable
from mtop.userstore.sql import SQLUserStore

POOL_SIZE = 3


class PostgresUserStore(SQLUserStore):
    """Users in a PostgreSQL database named by a libpq DSN (URI or
    keywords)."""

    driver = "postgres"
    _log = logger()

    def __init__(self, dsn: str, reactor: Any = None, pool_size: int = POOL_SIZE):
        super().__init__(describe_dsn("postgres", dsn))
        self.dsn = dsn
        self.reactor = reactor
        self.pool_size = pool_size
        self.pool: Any = None
        self._waiting: list[Deferred] | None = None

    def _start_pool(self) -> None:
        from txpostgres import reconnection, txpostgres

        reactor = self.reactor
        store = self

        class Connection(txpostgres.Connection):
            def __init__(self, reactor: Any = None, cooperator: Any = None):
                detector = reconnection.DeadConnectionDetector(reactor=reactor)
                detector.addRecoveryHandler(store._recovered)
                super().__init__(reactor, cooperator, detector=detector)

        class Pool(txpostgres.ConnectionPool):
            connectionFactory = Connection

        if reactor is not None:
            Pool.reactor = reactor
        self.pool = Pool(None, self.dsn, min=self.pool_size)
        self._waiting: list[Deferred] | None = []
        attempts = [
            connection.connect(self.dsn).addErrback(self._connect_failed, connection)
            for connection in self.pool.connections
        ]
        DeferredList(attempts).addCallback(self._first_connect_done)

    def _first_connect_done(self, _: Any) -> None:
        """Queries asked for before the first connection attempts ended run
        now (and fail as unavailable if the database was not reachable)."""
        waiting, self._waiting = self._waiting, None
        for d in waiting or ():
            d.callback(None)

    def _connect_failed(self, failure: Failure, connection: Any) -> None:
        self._log.error(
            "users: cannot connect to {store}: {error}; retrying", store=self.description, error=failure.getErrorMessage().strip()
        )
        connection.detector.checkForDeadConnection(failure)

    def _recovered(self) -> None:
        self._log.info("users: connected to {store} again", store=self.description)

    def _stop_pool(self) -> Deferred | None:
        if self.pool is None:
            return None
        pool, self.pool = self.pool, None
        closing = []
        for connection in list(pool.connections):
            try:
                d = connection.close()
            except Exception:
                continue
            if isinstance(d, Deferred):
                closing.append(d)
        return DeferredList(closing, consumeErrors=True) if closing else None

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        if self._waiting is not None:
            d: Deferred = Deferred()
            self._waiting.append(d)
            return d.addCallback(lambda _: self._query(sql, params))
        if self.pool is None:
            return fail(StoreUnavailable(f"the user store {self.description} is not running"))
        return self.pool.runQuery(sql, params or None)

    def _is_database_error(self, failure: Failure) -> bool:
        import psycopg2
        from txpostgres import reconnection, txpostgres

        return bool(failure.check(psycopg2.Error, reconnection.ConnectionDead, txpostgres.AlreadyConnected))
