"""Users in PostgreSQL, through txpostgres (psycopg2's asynchronous mode on
the reactor, no threads).

The store keeps `pool_size` connections and sends each query to the least
busy live one.  Each has a ``Reconnector``, txpostgres' dead-connection
detector with a retry loop of our own: when the database goes away,
queries on a dead connection fail at once (the login is refused as "store
unavailable") while it reconnects in the background with backoff (1 s up
to 10 s); when the database is back, lookups work again with no restart,
and the first connection back makes the others retry at once.

The store is unavailable while none of its connections is alive: that is
one warning when it starts and one line when it ends (see
`mtop.userstore.sql`).  txpostgres itself reports a connection whose
socket dies between queries by raising from the reactor's ``doRead``
(which Twisted logs as "Unhandled Error" with a traceback); our
``Connection`` turns that into an ordinary lost connection instead.

`watch` (`mtop.userstore.IUserChangeFeed`) adds one more connection that
``LISTEN``s on ``mtop_user``: the trigger `mtop.database` installs sends
the username of every changed row, so a change takes effect at once rather
than within the cache time.  The listening connection is pinged,
reconnects like the others and, once back, listens again and reports every
user changed (notifications sent while it was away are lost).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.database import NOTIFY_CHANNEL
from mtop.dsn import describe_dsn
from mtop.logs import logger
from mtop.userstore import ALL_USERS, IPresence, IQuotaLeases, IUsageSink, IUserChangeFeed, IUserStore, StoreUnavailable
from mtop.userstore.sql import HISTORY_CONFLICT, HISTORY_PERIOD, LEDGER_DAYS, NOW, Presence, QuotaLease, SQLUserStore, UsageFlush, error_line
from mtop.timers import cancel

POOL_SIZE = 3
#: Seconds between pings of the listening connection.
LISTEN_PING_INTERVAL = 10.0


@functools.cache
def _connection_class() -> type:
    """Our txpostgres connection class, built on first use so importing
    this module does not import psycopg2."""
    import psycopg2
    from txpostgres import reconnection, txpostgres

    class Reconnector(reconnection.DeadConnectionDetector):
        """txpostgres' detector (it marks the connection dead on a
        connection error, and fails queries at once while it is) with a
        retry loop that can be stopped and hurried, and that tells its
        owner of each death and recovery instead of logging."""

        def __init__(self, reactor: Any, owner: Any):
            super().__init__(reactor=reactor)
            self.owner = owner
            self.stopped = False
            self.last_error = ""
            self._delays: Any = None
            self._next: Any = None

        def startReconnecting(self, failure: Failure) -> None:
            self.last_error = error_line(failure)
            self.owner._connection_died(self.reconnectable, self.last_error)
            if not self.stopped:
                self._delays = self.reconnectionIterator()
                self._schedule()

        def _schedule(self) -> None:
            self._next = self.reactor.callLater(next(self._delays), self._attempt)

        def _attempt(self) -> None:
            self._next = None
            if not self.stopped:
                d = maybeDeferred(self.reconnect).addCallbacks(self._reconnected, self._attempt_failed)
                d.addErrback(self._bug)

        def _bug(self, failure: Failure) -> None:
            self.owner._log.failure("users: after reconnecting to {store}", failure, store=self.owner.description)

        def _attempt_failed(self, failure: Failure) -> None:
            self.last_error = error_line(failure)
            if not self.stopped:
                self._schedule()

        def _reconnected(self, _: Any) -> None:
            if self.stopped:  # the store stopped meanwhile
                self.reconnectable.close()
                return
            self.connectionRecovered()

        def connectionRecovered(self) -> None:
            self.connectionIsDead = False
            self.owner._connection_recovered(self.reconnectable)

        def retry_now(self) -> None:
            """Skip the wait before the next attempt."""
            if self._next is not None and self._next.active():
                self._delays = self.reconnectionIterator()
                self._next.reset(0)

        def stop(self) -> None:
            self.stopped = True
            cancel(self._next)
            self._next = None

    class Connection(txpostgres.Connection):
        """A txpostgres connection whose death between queries is a lost
        connection (and a reconnection), not an exception escaping into
        the reactor."""

        _closing = False

        def __init__(self, reactor: Any, owner: Any):
            super().__init__(reactor, None, detector=Reconnector(reactor, owner))

        @property
        def alive(self) -> bool:
            """Connected and not known to be dead: fit for a query."""
            return (
                not self.detector.connectionIsDead
                and self._connection is not None
                and not self._connection.closed
                and not self._pollingD  # still connecting
            )

        @property
        def load(self) -> int:
            """Queries running or queued on this connection."""
            return int(self.lock.locked) + len(self.lock.waiting)

        def doRead(self) -> Any:
            try:
                return super().doRead()
            except Exception as e:  # psycopg2's error for a dead socket
                return e

        def doWrite(self) -> Any:
            try:
                return super().doWrite()
            except Exception as e:
                return e

        def connectionLost(self, reason: Failure) -> None:
            super().connectionLost(reason)
            # A hang-up seen before the read lands here as a clean close,
            # which txpostgres does not count as death; psycopg2 has closed
            # the connection by now, so it is one.
            if (
                not self._closing
                and self._connection is not None
                and self._connection.closed
                and not self.detector.connectionIsDead
            ):
                self.detector.checkForDeadConnection(
                    Failure(psycopg2.OperationalError(f"connection lost: {reason.getErrorMessage()}"))
                )

        def close(self) -> None:
            if self._connection is None:
                return
            self._closing = True
            try:
                super().close()
            finally:
                self._closing = False

    return Connection


@implementer(IUserStore, IUsageSink, IUserChangeFeed, IQuotaLeases, IPresence)
class PostgresUserStore(SQLUserStore):
    """Users in a PostgreSQL database named by a libpq DSN (URI or
    keywords): `IUserStore`, `IUsageSink`, and `IUserChangeFeed` through
    ``LISTEN``/``NOTIFY``."""

    driver = "postgres"
    _log = logger()

    def __init__(self, dsn: str, reactor: Any = None, pool_size: int = POOL_SIZE):
        super().__init__(describe_dsn("postgres", dsn))
        self.dsn = dsn
        self.reactor = reactor
        self.pool_size = pool_size
        self.connections: list[Any] = []
        self._waiting: list[Deferred] | None = None
        self._watchers: list[Callable[[str | None], None]] = []
        self._listener: Any = None
        self._listen_logged = False
        self._ping: LoopingCall | None = None
        self._last_error = ""

    def _reactor(self) -> Any:
        if self.reactor is not None:
            return self.reactor
        from twisted.internet import reactor

        return reactor

    def _start_pool(self) -> None:
        Connection = _connection_class()
        self.connections = [Connection(self._reactor(), self) for _ in range(self.pool_size)]
        self._waiting = []
        attempts = [
            maybeDeferred(connection.connect, self.dsn).addErrback(self._connect_failed, connection)
            for connection in self.connections
        ]
        DeferredList(attempts).addCallback(self._first_connect_done)
        if self._watchers:
            self._start_listening()

    def _first_connect_done(self, _: Any) -> None:
        """Queries asked for before the first connection attempts ended run
        now (and fail as unavailable if the database was not reachable)."""
        waiting, self._waiting = self._waiting, None
        if self.running:
            if any(connection.alive for connection in self.connections):
                self._came_back()
            else:
                self._went_away(self._last_error or "not connected")
        for d in waiting or ():
            d.callback(None)

    def _connect_failed(self, failure: Failure, connection: Any) -> None:
        if not self.running:
            return  # closed by stopService while it connected
        if connection.detector.deathChecker(failure):
            # Unreachable: reconnect in the background, and report it once.
            connection.detector.checkForDeadConnection(failure)
        else:  # a bad DSN, say: retrying would not help
            self._last_error = error_line(failure)
            self._log.error("users: cannot connect to {store}: {error}", store=self.description, error=self._last_error)

    # What the connections report

    def _connection_died(self, connection: Any, error: str) -> None:
        self._last_error = error
        if connection is self._listener:
            self._log.debug("users: the LISTEN connection to {store} is lost: {error}", store=self.description, error=error)
            return
        if self._waiting is None and self.running and not any(c.alive for c in self.connections):
            self._went_away(error)

    def _connection_recovered(self, connection: Any) -> None:
        if not self.running:
            return
        if connection is self._listener:
            self._listen_again()
            return
        self._came_back()
        for other in self.connections:
            other.detector.retry_now()

    # Change notifications

    def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(username)`` when a row changes, and
        ``on_change(ALL_USERS)`` when notifications may have been missed
        (`IUserChangeFeed`)."""
        self._watchers.append(on_change)
        if self.running and self._listener is None:
            self._start_listening()

    def _start_listening(self) -> None:
        reactor = self._reactor()
        self._listener = _connection_class()(reactor, self)
        self._listener.addNotifyObserver(self._notified)
        d = maybeDeferred(self._listener.connect, self.dsn)
        d.addCallbacks(lambda _: self._listen_again(), self._connect_failed, errbackArgs=(self._listener,))
        self._ping = LoopingCall(self._ping_listener)
        self._ping.clock = reactor
        self._ping.start(LISTEN_PING_INTERVAL, now=False)

    def _listen_again(self) -> Deferred | None:
        if self._listener is None:
            return None
        d = self._listener.runOperation(f"LISTEN {NOTIFY_CHANNEL}")

        def listening(_: Any) -> None:
            # Said once; after a reconnection the outage lines say enough.
            log = self._log.debug if self._listen_logged else self._log.info
            self._listen_logged = True
            log("users: {store} tells this server of row changes (LISTEN {channel})", store=self.description, channel=NOTIFY_CHANNEL)
            self._changed(ALL_USERS)

        def failed(failure: Failure) -> None:
            # The connection's detector, if it died, reconnects and we
            # come back here.
            self._log.debug("users: cannot LISTEN on {store}: {error}", store=self.description, error=error_line(failure))

        return d.addCallbacks(listening, failed)

    def _ping_listener(self) -> None:
        if self._listener is not None and self._listener.alive:
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
        connections, self.connections = self.connections, []
        for connection in [*connections, *([listener] if listener is not None else [])]:
            connection.detector.stop()
            try:
                connection.close()
            except Exception:
                self._log.failure("users: closing a connection to {store}", store=self.description)
        return None

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        if self._waiting is not None:
            d: Deferred = Deferred()
            self._waiting.append(d)
            return d.addCallback(lambda _: self._query(sql, params))
        if not self.running:
            return fail(StoreUnavailable(f"the user store {self.description} is not running"))
        live = [connection for connection in self.connections if connection.alive]
        if not live:
            return fail(StoreUnavailable(f"{self.description}: {self._last_error or 'not connected'}"))
        connection = min(live, key=lambda c: c.load)
        return connection.runQuery(sql, params or None).addErrback(self._dead_while_queued)

    def _dead_while_queued(self, failure: Failure) -> Failure:
        from txpostgres.reconnection import ConnectionDead

        if failure.check(ConnectionDead):
            return Failure(StoreUnavailable(f"{self.description}: {self._last_error or 'connection lost'}"))
        return failure

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
            "AND EXISTS (SELECT 1 FROM ledger) RETURNING 1), "
            f"stale AS (DELETE FROM mtop_usage_flush WHERE flushed_at < LOCALTIMESTAMP - INTERVAL '{LEDGER_DAYS} day' "
            "AND EXISTS (SELECT 1 FROM ledger) RETURNING 1) "
        )
        params = [
            flush.server_id,
            flush.seq,
            *(value for name, u in flush.usage for value in (name, u.up, u.down, u.last_seen)),
            flush.server_id,
            flush.seq,
        ]
        spent = [(name, u.up + u.down + u.release) for name, u in flush.usage if u.up + u.down + u.release]
        if flush.leases and spent:
            # What is counted now was leased: the leases shrink as much.
            values = ", ".join(["(%s, %s::bigint)"] * len(spent))
            statement = statement.rstrip(" ") + (
                ", shrunk AS (UPDATE mtop_quota_lease AS l SET bytes = GREATEST(l.bytes - v.spent, 0) "
                f"FROM (VALUES {values}) AS v(username, spent) "
                "WHERE l.server_id = %s AND l.username = v.username AND EXISTS (SELECT 1 FROM ledger) RETURNING 1) "
            )
            params += [value for pair in spent for value in pair] + [flush.server_id]
        moved = [(name, u.up, u.down) for name, u in flush.usage if u.up or u.down] if flush.history else []
        if moved:
            values = ", ".join(["(%s, %s::bigint, %s::bigint)"] * len(moved))
            statement = statement.rstrip(" ") + (
                ", history AS (INSERT INTO mtop_usage_history (server_id, username, period, bytes_up, bytes_down) "
                f"SELECT %s, v.username, {HISTORY_PERIOD['postgres']}, v.up, v.down "
                f"FROM (VALUES {values}) AS v(username, up, down) JOIN mtop_user AS u ON u.username = v.username "
                f"WHERE EXISTS (SELECT 1 FROM ledger) {HISTORY_CONFLICT['postgres']} RETURNING 1), "
                # The server's total: the row whose username is ''.
                "total AS (INSERT INTO mtop_usage_history (server_id, username, period, bytes_up, bytes_down) "
                f"SELECT %s, '', {HISTORY_PERIOD['postgres']}, %s::bigint, %s::bigint "
                f"WHERE EXISTS (SELECT 1 FROM ledger) {HISTORY_CONFLICT['postgres']} RETURNING 1) "
            )
            params += [flush.server_id, *(value for row in moved for value in row)]
            params += [flush.server_id, sum(row[1] for row in moved), sum(row[2] for row in moved)]
        if flush.prune_history:
            statement = statement.rstrip(" ") + (
                f", aged AS ({flush.prune_history} AND EXISTS (SELECT 1 FROM ledger) RETURNING 1) "
            )
        statement += "SELECT (SELECT count(*) FROM ledger)"
        return self._query(statement, tuple(params)).addCallback(lambda result: bool(result[0][0]))

    def _lease_transaction(self, lease: QuotaLease) -> Deferred[int | None]:
        # Two statements in one request: one implicit transaction.  The
        # first locks the user's row, so grants for one user run one at a
        # time; the second, with a snapshot taken after the lock, sees the
        # leases the grants before it wrote (see QuotaLease).
        statement = (
            "SELECT 1 FROM mtop_user WHERE username = %s FOR UPDATE; "
            f"WITH clock AS (SELECT {NOW['postgres']} AS t), "
            "room AS (SELECT quota_bytes - bytes_up - bytes_down AS room FROM mtop_user "
            "WHERE username = %s AND quota_bytes IS NOT NULL), "
            "held AS (SELECT COALESCE(SUM(l.bytes), 0) AS held FROM mtop_quota_lease AS l, clock "
            "WHERE l.username = %s AND l.expires_at > clock.t), "
            "granted AS (SELECT GREATEST(0, LEAST(%s, room.room - held.held)) AS bytes FROM room, held), "
            "written AS (INSERT INTO mtop_quota_lease AS l (server_id, username, bytes, expires_at) "
            "SELECT %s, %s, granted.bytes, clock.t + %s FROM granted, clock "
            "ON CONFLICT (server_id, username) DO UPDATE SET "
            "bytes = CASE WHEN l.expires_at > EXCLUDED.expires_at - %s THEN l.bytes ELSE 0 END + EXCLUDED.bytes, "
            "expires_at = EXCLUDED.expires_at RETURNING 1) "
            "SELECT bytes FROM granted"
        )
        params = (
            lease.username, lease.username, lease.username, lease.want,
            lease.server_id, lease.username, lease.ttl, lease.ttl,
        )

        def granted(rows: list) -> int | None:
            return int(rows[0][0]) if rows else None

        return self._query(statement, params).addCallback(granted)

    def _presence_transaction(self, presence: Presence) -> Deferred[dict[str, list[tuple[str, int, bool]]]]:
        # The statements in one request: one implicit transaction, whose
        # answer is the last statement's rows.
        steps = presence.statements()
        statement = "; ".join(sql for sql, _ in steps)
        params = tuple(value for _, values in steps for value in values)
        return self._query(statement, params).addCallback(presence.others)

    def _execute(self, sql: str, params: tuple = ()) -> Deferred:
        return self._query(sql + " RETURNING 1", params)

    def _is_database_error(self, failure: Failure) -> bool:
        import psycopg2
        from txpostgres import reconnection, txpostgres

        return bool(
            failure.check(psycopg2.Error, reconnection.ConnectionDead, txpostgres.AlreadyConnected, txpostgres.RollbackFailed)
        )
