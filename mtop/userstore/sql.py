"""What the SQL user stores share: which columns to read, row decoding, the
start-up check, column re-detection and the outage report.

An outage is logged as one warning when the database stops answering
(``user store unavailable: STORE: ERROR``) and one line when it answers
again (``user store reachable again: STORE``), however many queries and
connections fail in between.  A store learns of it from its queries
(`_is_outage` picks the failures that mean "cannot reach the database")
or, when its driver can tell, from its connections (`_went_away`,
`_came_back`).

A subclass provides `_start_pool`, `_stop_pool`, `_query(sql, params)`
(a Deferred firing with a list of row tuples) and `_transaction(steps)`
(runs `UsageFlush` steps in one transaction); SQL is written with ``?``
placeholders and converted by `_sql` for ``%s`` drivers.  `AdbapiUserStore`
does all that for the DB-API drivers run in adbapi's thread pool.

Every SQL store provides `mtop.userstore.IUserStore` and
`mtop.userstore.IUsageSink` (and is a Twisted service).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.database import COLUMNS_SQL, HISTORY_STEP, POLICY_COLUMN_NAMES, TABLES_SQL, to_format
from mtop.logs import logger
from mtop.userstore import IPresence, IQuotaLeases, IUsageSink, IUserStore, StoreUnavailable, Usage, UsageCounting, UserRecord

BASE_COLUMNS = ("username", "salt", "password")
#: Policy columns the lookup reads (the counters are for the quota).
READ_POLICY = ("enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes", "bytes_up", "bytes_down")
assert set(READ_POLICY) <= set(POLICY_COLUMN_NAMES)

#: Usernames per ``WHERE username IN (...)`` query.
LOOKUP_BATCH = 200

#: How often the table's columns are looked at again, so `mtopctl db
#: upgrade` on a live database is noticed without a restart.
COLUMN_CHECK_INTERVAL = 60.0


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:  # SQLite keeps timestamps as text
        return datetime.fromisoformat(str(value).strip().replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


#: Ledger rows (``mtop_usage_flush``) older than this many days are
#: dropped by every flush, whichever server wrote them: a row is needed only
#: until its server has heard its flush's answer (it then drops it itself,
#: with its next flush), so only a stopped or crashed server's last row is
#: left behind, one per process start.
LEDGER_DAYS = 1

#: Dropping ledger rows older than `LEDGER_DAYS`, per database.
PRUNE_LEDGER = {
    "sqlite": f"DELETE FROM mtop_usage_flush WHERE flushed_at < datetime('now', '-{LEDGER_DAYS} day')",
    "postgres": f"DELETE FROM mtop_usage_flush WHERE flushed_at < LOCALTIMESTAMP - INTERVAL '{LEDGER_DAYS} day'",
    "mysql": f"DELETE FROM mtop_usage_flush WHERE flushed_at < NOW() - INTERVAL {LEDGER_DAYS} DAY",
}


#: Flushes prune the ledger the first time and then every this many times.
PRUNE_EVERY = 60

#: The database's clock as the start of its `HISTORY_STEP`: the
#: ``period`` of the usage-history rows a flush adds to.
HISTORY_PERIOD = {
    "sqlite": f"CAST(strftime('%s', 'now') AS INTEGER) / {HISTORY_STEP} * {HISTORY_STEP}",
    "postgres": f"CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS BIGINT) / {HISTORY_STEP} * {HISTORY_STEP}",
    "mysql": f"UNIX_TIMESTAMP() DIV {HISTORY_STEP} * {HISTORY_STEP}",
}

#: What a history row already there gets: the new bytes added.
HISTORY_CONFLICT = {
    "sqlite": "ON CONFLICT (server_id, username, period) DO UPDATE SET "
    "bytes_up = mtop_usage_history.bytes_up + excluded.bytes_up, "
    "bytes_down = mtop_usage_history.bytes_down + excluded.bytes_down",
    "mysql": "ON DUPLICATE KEY UPDATE bytes_up = mtop_usage_history.bytes_up + VALUES(bytes_up), "
    "bytes_down = mtop_usage_history.bytes_down + VALUES(bytes_down)",
}
HISTORY_CONFLICT["postgres"] = HISTORY_CONFLICT["sqlite"]


#: Adding bytes to a history row (parameters: server_id, username,
#: period, up, down), run with ``executemany``: PyMySQL sends the rows as
#: one multi-row INSERT.
HISTORY_INSERT = {
    driver: "INSERT INTO mtop_usage_history (server_id, username, period, bytes_up, bytes_down) "
    f"VALUES (?, ?, ?, ?, ?) {conflict}"
    for driver, conflict in HISTORY_CONFLICT.items()
}


def prune_history(driver: str, days: int) -> str:
    """Dropping usage-history rows older than ``days``."""
    return f"DELETE FROM mtop_usage_history WHERE period < {NOW[driver]} - {int(days) * 86400}"


class UsageFlush:
    """One exactly-once flush: skipped whole if ``(server_id, seq)`` is
    already in ``mtop_usage_flush``, else the increments and the ledger row
    are written in one transaction (and this server's older ledger rows
    dropped, and any server's older than `LEDGER_DAYS` with ``prune``).
    ``usage`` is in name order, so servers flushing at the same time lock
    rows in the same order and cannot deadlock.

    With ``history`` (the query of the database's current period and the
    insert, `HISTORY_PERIOD` and `HISTORY_INSERT`) the bytes also go to
    ``mtop_usage_history``: a row per user whose counters were there to
    add to (a user deleted meanwhile gets none) and one for the server's
    whole traffic, username ''; ``prune_history`` drops its old rows."""

    def __init__(
        self,
        server_id: str,
        seq: int,
        usage: dict[str, Usage],
        sql: Callable[[str], str],
        prune: str | None = None,
        leases: bool = False,
        history: tuple[str, str] | None = None,
        prune_history: str | None = None,
    ):
        self.server_id = server_id
        self.seq = seq
        self.leases = leases
        self.usage = sorted(usage.items())
        self.history = history
        self.prune_history = prune_history
        self.check = (sql("SELECT 1 FROM mtop_usage_flush WHERE server_id = ? AND seq = ?"), (server_id, seq))
        self.ledger = (sql("INSERT INTO mtop_usage_flush (server_id, seq) VALUES (?, ?)"), (server_id, seq))
        update = sql(
            "UPDATE mtop_user SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?, "
            "last_seen = COALESCE(?, last_seen) WHERE username = ?"
        )
        self.updates = [(update, (u.up, u.down, u.last_seen, name)) for name, u in self.usage]
        self.writes = [(sql("DELETE FROM mtop_usage_flush WHERE server_id = ? AND seq < ?"), (server_id, seq))]
        if leases:
            # What is counted now was leased: the lease shrinks by as much
            # (and by what is given back), never below 0.
            shrink = sql(
                "UPDATE mtop_quota_lease SET bytes = CASE WHEN bytes > ? THEN bytes - ? ELSE 0 END "
                "WHERE server_id = ? AND username = ?"
            )
            for name, u in self.usage:
                spent = u.up + u.down + u.release
                if spent:
                    self.writes.append((shrink, (spent, spent, server_id, name)))
        if prune is not None:
            self.writes.append((prune, ()))
        if prune_history is not None:
            self.writes.append((prune_history, ()))

    def run_blocking(self, cursor: Any, begin: str | None = None) -> bool:
        """Run on a DB-API cursor inside a transaction; ``True`` if applied
        now, ``False`` if it had been already."""
        if begin:
            cursor.execute(begin)
        cursor.execute(*self.check)
        if cursor.fetchall():
            return False
        cursor.execute(*self.ledger)
        counted = []
        for (statement, params), (name, u) in zip(self.updates, self.usage):
            cursor.execute(statement, params)
            # Rows matched (SQLite) or changed (MySQL: they change when
            # bytes are added, the only ones history wants).
            if cursor.rowcount and (u.up or u.down):
                counted.append((name, u))
        for statement, params in self.writes:
            cursor.execute(statement, params)
        if self.history is not None:
            self._add_history(cursor, counted)
        return True

    def _add_history(self, cursor: Any, counted: list[tuple[str, Usage]]) -> None:
        up, down = sum(u.up for _, u in self.usage), sum(u.down for _, u in self.usage)
        if not up and not down:
            return
        period_query, insert = self.history
        cursor.execute(period_query)
        period = int(cursor.fetchall()[0][0])
        rows = [(self.server_id, name, period, u.up, u.down) for name, u in counted]
        rows.append((self.server_id, "", period, up, down))
        cursor.executemany(insert, rows)


#: The database's clock in Unix seconds (lease expiry is by it, so the
#: servers' clocks need not agree).
NOW = {
    "sqlite": "CAST(strftime('%s', 'now') AS INTEGER)",
    "postgres": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS BIGINT)",
    "mysql": "UNIX_TIMESTAMP()",
}


class QuotaLease:
    """One lease request, as a transaction on a DB-API cursor (SQLite,
    MySQL; PostgreSQL runs the same in one request, `PostgresUserStore`).

    The user's row is locked first (``FOR UPDATE``; SQLite's ``BEGIN
    IMMEDIATE`` locks the file), so grants for one user run one at a time
    and each sees the leases the ones before it wrote.  What is left is the
    quota minus the counters minus every live lease (this server's
    included); the grant is ``want`` or what is left, and is added to this
    server's lease (a lapsed one counts as 0), whose expiry moves to now +
    ``ttl``."""

    def __init__(self, driver: str, server_id: str, username: str, want: int, ttl: float, sql: Callable[[str], str]):
        self.driver = driver
        self.server_id = server_id
        self.username = username
        self.want = max(0, int(want))
        self.ttl = max(1, int(ttl))
        self.sql = sql

    def run_blocking(self, cursor: Any, begin: str | None = None) -> int | None:
        sql, now = self.sql, NOW[self.driver]
        lock = " FOR UPDATE" if self.driver == "mysql" else ""
        if begin:
            cursor.execute(begin)
        cursor.execute(f"SELECT {now}")
        clock = int(cursor.fetchall()[0][0])
        cursor.execute(sql(f"SELECT quota_bytes, bytes_up, bytes_down FROM mtop_user WHERE username = ?{lock}"), (self.username,))
        rows = cursor.fetchall()
        if not rows or rows[0][0] is None:
            return None
        quota, up, down = (int(value or 0) for value in rows[0])
        cursor.execute(
            sql(f"SELECT server_id, bytes, expires_at FROM mtop_quota_lease WHERE username = ?{lock}"), (self.username,)
        )
        held, mine = 0, None
        for server_id, leased, expires in cursor.fetchall():
            live = int(expires) > clock
            if server_id == self.server_id:
                mine = int(leased) if live else 0
            if live:
                held += int(leased)
        grant = max(0, min(self.want, quota - up - down - held))
        expires_at = clock + self.ttl
        if mine is None:
            cursor.execute(
                sql("INSERT INTO mtop_quota_lease (server_id, username, bytes, expires_at) VALUES (?, ?, ?, ?)"),
                (self.server_id, self.username, grant, expires_at),
            )
        else:
            cursor.execute(
                sql("UPDATE mtop_quota_lease SET bytes = ?, expires_at = ? WHERE server_id = ? AND username = ?"),
                (mine + grant, expires_at, self.server_id, self.username),
            )
        return grant


#: Every this many publications a server also drops rows that lapsed
#: this many seconds ago (servers that stopped without clearing theirs).
PRESENCE_PRUNE_EVERY = 60
PRESENCE_PRUNE_AFTER = 60


class Presence:
    """One publication of a server's presence (`IPresence`), as a
    transaction on a DB-API cursor (SQLite, MySQL; PostgreSQL sends the same
    statements in one request, `PostgresUserStore`): the server's rows are
    replaced by what it carries now, live until now + ``ttl`` by the
    database's clock, and the other servers' live rows with tunnels are
    read back.  With ``prune``, rows that lapsed `PRESENCE_PRUNE_AFTER`
    seconds ago go too.  ``carried`` ``None``: only read (a server that
    carries nobody and has no rows: nothing to write)."""

    def __init__(
        self,
        driver: str,
        server_id: str,
        carried: dict[str, tuple[int, bool]] | None,
        ttl: float,
        sql: Callable[[str], str],
        prune: bool,
    ):
        now = NOW[driver]
        self.server_id = server_id
        self.ttl = max(1, int(round(ttl)))
        self.rows = sorted((name, int(tunnels), int(bool(active))) for name, (tunnels, active) in (carried or {}).items())
        self.delete = (sql("DELETE FROM mtop_presence WHERE server_id = ?"), (server_id,)) if carried is not None else None
        self.prune = (
            (sql(f"DELETE FROM mtop_presence WHERE expires_at < {now} - ?"), (PRESENCE_PRUNE_AFTER,))
            if prune and carried is not None
            else None
        )
        marks = ", ".join([f"(?, ?, ?, ?, {now} + ?)"] * len(self.rows))
        self.insert = (
            (
                sql(f"INSERT INTO mtop_presence (server_id, username, tunnels, active, expires_at) VALUES {marks}"),
                tuple(value for name, tunnels, active in self.rows for value in (server_id, name, tunnels, active, self.ttl)),
            )
            if self.rows
            else None
        )
        self.select = (
            sql(
                "SELECT server_id, username, tunnels, active FROM mtop_presence "
                f"WHERE server_id <> ? AND tunnels > 0 AND expires_at > {now}"
            ),
            (server_id,),
        )

    def statements(self) -> list[tuple[str, tuple]]:
        """What runs, in order (the last one answers)."""
        return [step for step in (self.prune, self.delete, self.insert, self.select) if step is not None]

    def run_blocking(self, cursor: Any) -> dict[str, list[tuple[str, int, bool]]]:
        for statement, params in self.statements():
            cursor.execute(statement, params)
        return self.others(cursor.fetchall())

    @staticmethod
    def others(rows: Iterable) -> dict[str, list[tuple[str, int, bool]]]:
        found: dict[str, list[tuple[str, int, bool]]] = {}
        for server_id, username, tunnels, active in rows:
            found.setdefault(str(username), []).append((str(server_id), int(tunnels), bool(active)))
        return found


@implementer(IUserStore, IUsageSink, IQuotaLeases, IPresence)
class SQLUserStore(Service):
    """The users of one SQL database (`IUserStore`) and their traffic
    counters (`IUsageSink`); a Service owning its connection pool."""

    _log = logger()
    driver = "sql"
    #: Column detections begun, and the latest whose answer was applied.
    _detections = 0
    _detection_applied = 0

    def __init__(self, description: str):
        self.description = description
        self.policy_columns: tuple[str, ...] = ()
        self._columns_known = False
        self._column_check: LoopingCall | None = None
        #: Whether the database answers: ``None`` until known.
        self.reachable: bool | None = None
        #: Whether ``mtop_quota_lease`` exists (`IQuotaLeases`): ``None``
        #: until known.
        self.leases_available: bool | None = None
        #: Whether ``mtop_presence`` exists (`IPresence`): ``None`` until known.
        self.presence_available: bool | None = None
        #: Whether ``mtop_usage_history`` exists: ``None`` until known.
        self.history_available: bool | None = None
        #: Days of usage history kept (``db.history_days``; 0: none written).
        self.history_days = 30
        self._presence_count = 0
        self._flush_count = 0

    # Subclasses

    def _start_pool(self) -> None:
        raise NotImplementedError

    def _stop_pool(self) -> Deferred | None:
        raise NotImplementedError

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        raise NotImplementedError

    def _transaction(self, flush: UsageFlush) -> Deferred[bool]:
        raise NotImplementedError

    def _lease_transaction(self, lease: QuotaLease) -> Deferred[int | None]:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return to_format(sql)

    def _is_database_error(self, failure: Failure) -> bool:
        """Whether ``failure`` is the database's (not a bug of ours)."""
        return True

    def _is_outage(self, failure: Failure) -> bool:
        """Whether a query's ``failure`` means the database cannot be
        reached (rather than, say, a missing table).  ``False`` for stores
        whose connections report the outage themselves."""
        return False

    # Outage report

    def _went_away(self, error: str) -> None:
        """The database stopped answering: one warning per outage."""
        if self.reachable is not False:
            self.reachable = False
            self._log.warn("users: user store unavailable: {store}: {error}; retrying", store=self.description, error=error)

    def _came_back(self) -> None:
        """The database answers (again): one line per recovery."""
        if self.reachable is False:
            self._log.info("users: user store reachable again: {store}", store=self.description)
        self.reachable = True

    def _observed(self, d: Deferred) -> Deferred:
        """``d`` (a query's result), telling the outage report how it
        went."""

        def answered(result: Any) -> Any:
            self._came_back()
            return result

        def failed(failure: Failure) -> Failure:
            if self._is_outage(failure):
                self._went_away(error_line(failure))
            return failure

        return d.addCallbacks(answered, failed)

    def _run_query(self, sql: str, params: tuple = ()) -> Deferred:
        return self._observed(maybeDeferred(self._query, sql, params))

    # Service

    def startService(self) -> None:
        super().startService()
        self._start_pool()
        self._column_check = LoopingCall(self._detect_columns)
        self._column_check.start(COLUMN_CHECK_INTERVAL, now=False)
        self.check()

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._column_check is not None and self._column_check.running:
            self._column_check.stop()
        return self._stop_pool()

    def check(self) -> Deferred:
        """Log whether the user table can be read, and which policy columns
        it has (at start-up)."""

        def ok(rows: list) -> None:
            extra = ", ".join(self.policy_columns) if self.policy_columns else "none (run 'mtopctl db upgrade' for them)"
            self._log.info(
                "users: {store} has {count} users; policy columns: {extra}",
                store=self.description,
                count=rows[0][0],
                extra=extra,
            )

        def bad(failure: Failure) -> None:
            if self.reachable is False or not self.running:
                return  # the outage warning said why, or the store stopped meanwhile
            self._log.error(
                "users: cannot read mtop_user in {store}: {error}; create it with 'mtopctl db init'",
                store=self.description,
                error=error_line(failure),
            )

        def count(_: Any) -> Deferred | None:
            if not self.running:
                return None  # stopped before the columns were read: nothing to say
            return self._run_query(self._sql("SELECT COUNT(*) FROM mtop_user")).addCallbacks(ok, bad)

        return self._detect_columns().addCallback(count)

    def _detect_columns(self) -> Deferred:
        # Detections can overlap (start-up, the periodic one, a caller's);
        # the answer of one begun earlier never replaces a later one's.
        self._detections += 1
        number = self._detections
        d = self._run_query(COLUMNS_SQL[self.driver])

        def found(rows: list) -> Deferred | None:
            if number < self._detection_applied:
                return None
            self._detection_applied = number
            have = {str(row[0]).lower() for row in rows}
            columns = tuple(c for c in READ_POLICY if c in have)
            if self._columns_known and columns != self.policy_columns:
                self._log.info("users: {store} policy columns now {columns}", store=self.description, columns=", ".join(columns) or "none")
            self.policy_columns = columns
            self._columns_known = True
            return self._run_query(TABLES_SQL[self.driver]).addCallback(tables)

        def tables(rows: list) -> None:
            if number < self._detection_applied:
                return
            have = {str(row[0]).lower() for row in rows}
            for attribute, table, what in (
                ("leases_available", "mtop_quota_lease", "quota leases"),
                ("presence_available", "mtop_presence", "presence (cluster-wide max_connections and rate_limit)"),
                ("history_available", "mtop_usage_history", "usage history"),
            ):
                available = table in have
                known = getattr(self, attribute)
                if known is not None and available != known:
                    self._log.info(
                        "users: {store} {now} {what}", store=self.description, now="now has" if available else "no longer has", what=what
                    )
                setattr(self, attribute, available)

        def failed(failure: Failure) -> None:
            self._log.debug("users: cannot list the columns of mtop_user: {error}", error=error_line(failure))

        return d.addCallbacks(found, failed).addErrback(failed)

    # IUserStore

    def lookup(self, username: str) -> Deferred[UserRecord | None]:
        """The row of ``username``, or ``None`` (`IUserStore`)."""
        return self._select([username]).addCallback(lambda records: records.get(username))

    def lookup_many(self, usernames: Iterable[str]) -> Deferred[dict[str, UserRecord]]:
        """The rows of those of ``usernames`` that exist, by name
        (`IUserStore`); one query per `LOOKUP_BATCH` names."""
        names = sorted(set(usernames))
        batches = [self._select(names[i : i + LOOKUP_BATCH]) for i in range(0, len(names), LOOKUP_BATCH)]

        def merged(results: list[dict[str, UserRecord]]) -> dict[str, UserRecord]:
            return {name: record for result in results for name, record in result.items()}

        return gatherResults(batches, consumeErrors=True).addCallbacks(merged, lambda f: f.value.subFailure)

    def ping(self) -> Deferred:
        """One ``SELECT 1``: fires when the database answers, fails when it
        does not (`mtop.health` asks every few seconds; an outage it finds
        is reported as a failed lookup's would be)."""
        if not self.running:
            raise StoreUnavailable(f"the user store {self.description} is not running")
        return self._run_query("SELECT 1").addErrback(self._unavailable)

    # IUsageSink

    @property
    def usage_counting(self) -> UsageCounting:
        """Whether the table has the traffic counters (`add_usage` works):
        `UsageCounting.UNKNOWN` until its columns have been read."""
        if not self._columns_known:
            return UsageCounting.UNKNOWN
        if "bytes_up" in self.policy_columns and "bytes_down" in self.policy_columns:
            return UsageCounting.COUNTED
        return UsageCounting.NOT_COUNTED

    def add_usage(self, server_id: str, seq: int, usage: dict[str, Usage]) -> Deferred[bool]:
        """Add ``usage`` to the users' counters, exactly once per
        ``(server_id, seq)``: fires ``True`` when written now, ``False`` when
        an earlier attempt (whose answer was lost) had written it
        (`IUsageSink`)."""
        if not self.running:
            raise StoreUnavailable(f"the user store {self.description} is not running")
        # Pruning scans the ledger (and on MySQL/MariaDB locks what it scans,
        # which can deadlock with other servers' flushes): the first flush
        # and every PRUNE_EVERY-th.
        self._flush_count += 1
        pruning = self._flush_count % PRUNE_EVERY == 1
        prune = PRUNE_LEDGER.get(self.driver) if pruning else None
        history = prune_old = None
        if self.history_available and self.history_days > 0:
            history = (f"SELECT {HISTORY_PERIOD[self.driver]}", self._sql(HISTORY_INSERT[self.driver]))
            if pruning:
                prune_old = prune_history(self.driver, self.history_days)
        flush = UsageFlush(server_id, seq, usage, self._sql, prune, bool(self.leases_available), history, prune_old)
        d = self._observed(maybeDeferred(self._transaction, flush))
        return d.addErrback(self._unavailable)

    # IQuotaLeases

    def lease_quota(self, server_id: str, username: str, want: int, ttl: float) -> Deferred[int | None]:
        """Lease up to ``want`` more bytes of ``username``'s quota to
        ``server_id`` (`QuotaLease`; `IQuotaLeases`)."""
        if not self.running or not self.leases_available:
            raise StoreUnavailable(f"{self.description}: no quota leases")
        lease = QuotaLease(self.driver, server_id, username, want, ttl, self._sql)
        return self._observed(maybeDeferred(self._lease_transaction, lease)).addErrback(self._unavailable)

    def renew_leases(self, server_id: str, ttl: float) -> Deferred[None]:
        """Extend ``server_id``'s leases to now + ``ttl`` (`IQuotaLeases`)."""
        if not self.running or not self.leases_available:
            raise StoreUnavailable(f"{self.description}: no quota leases")
        sql = self._sql(f"UPDATE mtop_quota_lease SET expires_at = {NOW[self.driver]} + ? WHERE server_id = ?")
        return self._observed(maybeDeferred(self._execute, sql, (max(1, int(ttl)), server_id))).addErrback(self._unavailable)

    # IPresence

    def publish_presence(
        self, server_id: str, carried: dict[str, tuple[int, bool]] | None, ttl: float
    ) -> Deferred[dict[str, list[tuple[str, int, bool]]]]:
        """Replace ``server_id``'s presence rows by ``carried`` and read the
        other servers' (`Presence`; `IPresence`)."""
        if not self.running or not self.presence_available:
            raise StoreUnavailable(f"{self.description}: no presence table")
        if carried is not None:
            self._presence_count += 1
        prune = self._presence_count % PRESENCE_PRUNE_EVERY == 1
        presence = Presence(self.driver, server_id, carried, ttl, self._sql, prune)
        return self._observed(maybeDeferred(self._presence_transaction, presence)).addErrback(self._unavailable)

    def _presence_transaction(self, presence: Presence) -> Deferred[dict[str, list[tuple[str, int, bool]]]]:
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple = ()) -> Deferred:
        """A statement that returns no rows."""
        raise NotImplementedError

    def _select(self, usernames: list[str]) -> Deferred[dict[str, UserRecord]]:
        if not self.running:
            raise StoreUnavailable(f"the user store {self.description} is not running")
        if not self._columns_known:
            # Never read a row without its policy columns (a disabled user
            # would get in): learn them first.
            def known(_: Any) -> Deferred[dict[str, UserRecord]]:
                if not self._columns_known:
                    raise StoreUnavailable(f"{self.description}: cannot read the columns of mtop_user")
                return self._select(usernames)

            return self._detect_columns().addCallback(known)
        columns = BASE_COLUMNS + self.policy_columns
        marks = ", ".join("?" * len(usernames))
        sql = self._sql(f"SELECT {', '.join(columns)} FROM mtop_user WHERE username IN ({marks})")
        d = self._run_query(sql, tuple(usernames))

        def records(rows: list) -> dict[str, UserRecord]:
            found = {}
            for row in rows:
                values = dict(zip(columns, row))
                found[values["username"]] = UserRecord(
                    username=values["username"],
                    salt=values["salt"] or "",
                    password=values["password"] or "",
                    enabled=values.get("enabled") is None or bool(values["enabled"]),
                    expires_at=_timestamp(values.get("expires_at")),
                    max_connections=_int(values.get("max_connections")),
                    rate_limit=_int(values.get("rate_limit")),
                    quota_bytes=_int(values.get("quota_bytes")),
                    bytes_up=_int(values.get("bytes_up")) or 0,
                    bytes_down=_int(values.get("bytes_down")) or 0,
                )
            return found

        return d.addCallbacks(records, self._unavailable)

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(StoreUnavailable) or not self._is_database_error(failure):
            return failure
        if self.policy_columns:
            # A column may have been dropped: look again before the next query.
            self._detect_columns()
        return Failure(StoreUnavailable(f"{self.description}: {error_line(failure)}"))


class _QuietConnection(adbapi.Connection):
    """adbapi's reconnecting connection, without the traceback it logs when
    the rollback after a failed query fails too (the connection is gone:
    expected in an outage, and the query's own error is reported)."""

    def rollback(self) -> None:
        if not self._pool.reconnect:
            self._connection.rollback()
            return
        try:
            self._connection.rollback()
            cursor = self._connection.cursor()
            cursor.execute(self._pool.good_sql)
            cursor.close()
            self._connection.commit()
            return
        except BaseException:
            pass
        self._pool.disconnect(self._connection)
        raise adbapi.ConnectionLost()


class QuietConnectionPool(adbapi.ConnectionPool):
    """An adbapi pool whose lost connections are dropped without tracebacks
    in the log; what failed reaches the caller as before."""

    connectionFactory = _QuietConnection

    def _runInteraction(self, interaction: Callable, *args: Any, **kw: Any) -> Any:
        conn = self.connectionFactory(self)
        trans = self.transactionFactory(self, conn)
        try:
            result = interaction(trans, *args, **kw)
            trans.close()
            conn.commit()
            return result
        except BaseException:
            try:
                conn.rollback()
            except BaseException:
                pass
            raise


class AdbapiUserStore(SQLUserStore):
    """A store over a blocking DB-API driver in adbapi's thread pool; with
    ``cp_reconnect`` a connection that fails is dropped and the next query
    opens a new one, so the store recovers by itself when the database
    comes back."""

    #: Run first in a usage transaction (MySQL runs in autocommit mode so
    #: lookups see fresh rows, and needs an explicit start).
    begin: str | None = None
    #: Run first in a lease transaction: one that locks what it reads.
    lease_begin: str | None = None

    def __init__(self, description: str):
        super().__init__(description)
        self.pool: QuietConnectionPool | None = None

    def _stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        return self.pool.runQuery(sql, params)

    def _transaction(self, flush: UsageFlush) -> Deferred[bool]:
        return self.pool.runInteraction(flush.run_blocking, self.begin)

    def _lease_transaction(self, lease: QuotaLease) -> Deferred[int | None]:
        return self.pool.runInteraction(lease.run_blocking, self.lease_begin)

    def _presence_transaction(self, presence: Presence) -> Deferred[dict[str, list[tuple[str, int, bool]]]]:
        return self.pool.runInteraction(presence.run_blocking)

    def _execute(self, sql: str, params: tuple = ()) -> Deferred:
        return self.pool.runOperation(sql, params)


def error_line(failure: Failure) -> str:
    """The first line of ``failure``'s message, for a log line."""
    args = failure.value.args
    if type(failure.value).__module__.startswith("pymysql") and len(args) == 2 and isinstance(args[1], str):
        # PyMySQL's (code, message), not its repr
        text = f"{args[1]} ({args[0]})"
    else:
        text = failure.getErrorMessage().strip()
    return text.splitlines()[0] if text else failure.type.__name__
