"""Users in PostgreSQL, through txpostgres (psycopg2's asynchronous mode on
the reactor, no threads).

Each pooled connection has txpostgres' dead-connection detector: when the
database goes away, queries on it fail at once (the login is refused as
"store unavailable") while it reconnects in the background with backoff
(1 s up to 10 s); when the database is back, lookups work again with no
restart.

`watch` adds one more connection that ``LISTEN``s on ``mtop_user``: the
trigger `mtop.database` installs sends the username of every changed row,
so a change takes effect at once rather than within the cache time.  The
listening connection is pinged, reconnects like the others and, once back,
listens again and reports every user changed (notifications sent while it
was away are lost).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mtop.database import NOTIFY_CHANNEL
from mtop.dsn import describe_dsn
from mtop.logs import logger
from mtop.userstore import StoreUnavailable
from mtop.userstore.sql import SQLUserStore, UsageFlush

POOL_SIZE = 3
#: Seconds between pings of the listening connection.
LISTEN_PING_INTERVAL = 10.0
#: What `watch` callbacks receive when any user may have changed.
ALL_USERS = None


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
        self._watchers: list[Callable[[str | None], None]] = []
        self._listener: Any = None
        self._ping: LoopingCall | None = None

    def _connection_class(self) -> type:
        from txpostgres import reconnection, txpostgres

        store = self

        class Connection(txpostgres.Connection):
            def __init__(self, reactor: Any = None, cooperator: Any = None):
                detector = reconnection.DeadConnectionDetector(reactor=reactor)
                detector.addRecoveryHandler(store._recovered)
                super().__init__(reactor, cooperator, detector=detector)

        return Connection

    def _start_pool(self) -> None:
        from txpostgres import txpostgres

        reactor = self.reactor
        Connection = self._connection_class()

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
        if self._watchers:
            self._start_listening()

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

    # Change notifications

    def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(username)`` when a row changes, and
        ``on_change(None)`` when notifications may have been missed."""
        self._watchers.append(on_change)
        if self.running and self._listener is None:
            self._start_listening()

    def _start_listening(self) -> None:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        self._listener = self._connection_class()(reactor)
        self._listener.addNotifyObserver(self._notified)
        self._listener.detector.addRecoveryHandler(self._listen_again)
        d = self._listener.connect(self.dsn)
        d.addCallback(lambda _: self._listen_again())
        d.addErrback(self._connect_failed, self._listener)
        self._ping = LoopingCall(self._ping_listener)
        self._ping.clock = reactor
        self._ping.start(LISTEN_PING_INTERVAL, now=False)

    def _listen_again(self) -> Deferred:
        d = self._listener.runOperation(f"LISTEN {NOTIFY_CHANNEL}")

        def listening(_: Any) -> None:
            self._log.info("users: {store} tells this server of row changes (LISTEN {channel})", store=self.description, channel=NOTIFY_CHANNEL)
            self._changed(ALL_USERS)

        return d.addCallbacks(listening, lambda f: None)

    def _ping_listener(self) -> None:
        if self._listener is not None and not self._listener.detector.connectionIsDead:
            self._listener.runOperation("SELECT 1").addErrback(lambda f: None)

    def _notified(self, notify: Any) -> None:
        if notify.channel == NOTIFY_CHANNEL:
            self._changed(notify.payload)

    def _changed(self, username: str | None) -> None:
        for on_change in self._watchers:
            on_change(username)

    def _stop_pool(self) -> Deferred | None:
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        self._ping = None
        listener, self._listener = self._listener, None
        if self.pool is None:
            return None
        pool, self.pool = self.pool, None
        closing = []
        for connection in [*pool.connections, *([listener] if listener is not None else [])]:
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

    def _transaction(self, flush: UsageFlush) -> Deferred[bool]:
        # One statement, so one transaction on txpostgres' autocommit
        # connections, and no interaction whose rollback can fail on a dead
        # connection.  Data-modifying CTEs all run, once; the updates only
        # if the ledger row is new.
        rows = ", ".join(["(%s, %s::bigint, %s::bigint, %s::timestamp)"] * len(flush.usage))
        statement = (
            "WITH ledger AS (INSERT INTO mtop_usage_flush (server_id, seq) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING RETURNING 1), "
            "counted AS (UPDATE mtop_user AS u SET bytes_up = u.bytes_up + v.up, bytes_down = u.bytes_down + v.down, "
            f"last_seen = COALESCE(v.seen, u.last_seen) FROM (VALUES {rows}) AS v(username, up, down, seen) "
            "WHERE u.username = v.username AND EXISTS (SELECT 1 FROM ledger) RETURNING 1), "
            "pruned AS (DELETE FROM mtop_usage_flush WHERE server_id = %s AND seq < %s "
            "AND EXISTS (SELECT 1 FROM ledger) RETURNING 1) "
            "SELECT (SELECT count(*) FROM ledger)"
        )
        params = (
            flush.server_id,
            flush.seq,
            *(value for name, u in flush.usage for value in (name, u.up, u.down, u.last_seen)),
            flush.server_id,
            flush.seq,
        )
        return self._query(statement, params).addCallback(lambda result: bool(result[0][0]))

    def _is_database_error(self, failure: Failure) -> bool:
        import psycopg2
        from txpostgres import reconnection, txpostgres

        return bool(
            failure.check(psycopg2.Error, reconnection.ConnectionDead, txpostgres.AlreadyConnected, txpostgres.RollbackFailed)
        )
