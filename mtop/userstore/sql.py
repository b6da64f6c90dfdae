"""What the SQL user stores share: which columns to read, row decoding, the
start-up check and column re-detection.

A subclass provides `_start_pool`, `_stop_pool` and `_query(sql, params)`
(a Deferred firing with a list of row tuples); SQL is written with ``?``
placeholders and converted by `_sql` for ``%s`` drivers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mtop.database import COLUMNS_SQL, POLICY_COLUMN_NAMES, to_format
from mtop.logs import logger
from mtop.userstore import StoreUnavailable, UserRecord

BASE_COLUMNS = ("username", "salt", "password")
#: Policy columns the lookup reads (the counters are for the quota).
READ_POLICY = ("enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes", "bytes_up", "bytes_down")
assert set(READ_POLICY) <= set(POLICY_COLUMN_NAMES)

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


class SQLUserStore(Service):
    """A `mtop.userstore.UserStore` over one SQL database; a Service owning
    its connection pool."""

    _log = logger()
    driver = "sql"

    def __init__(self, description: str):
        self.description = description
        self.policy_columns: tuple[str, ...] = ()
        self._columns_known = False
        self._column_check: LoopingCall | None = None

    # Subclasses

    def _start_pool(self) -> None:
        raise NotImplementedError

    def _stop_pool(self) -> Deferred | None:
        raise NotImplementedError

    def _query(self, sql: str, params: tuple = ()) -> Deferred:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return to_format(sql)

    def _is_database_error(self, failure: Failure) -> bool:
        """Whether ``failure`` is the database's (not a bug of ours)."""
        return True

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
        d = self._detect_columns()
        d.addCallback(lambda _: self._query(self._sql("SELECT COUNT(*) FROM mtop_user")))

        def ok(rows: list) -> None:
            extra = ", ".join(self.policy_columns) if self.policy_columns else "none (run 'mtopctl db upgrade' for them)"
            self._log.info(
                "users: {store} has {count} users; policy columns: {extra}",
                store=self.description,
                count=rows[0][0],
                extra=extra,
            )

        def bad(failure: Failure) -> None:
            self._log.error(
                "users: cannot read mtop_user in {store}: {error}; create it with 'mtopctl db init'",
                store=self.description,
                error=_first_line(failure),
            )

        return d.addCallbacks(ok, bad)

    def _detect_columns(self) -> Deferred:
        d = self._query(COLUMNS_SQL[self.driver])

        def found(rows: list) -> None:
            have = {str(row[0]).lower() for row in rows}
            columns = tuple(c for c in READ_POLICY if c in have)
            if self._columns_known and columns != self.policy_columns:
                self._log.info("users: {store} policy columns now {columns}", store=self.description, columns=", ".join(columns) or "none")
            self.policy_columns = columns
            self._columns_known = True

        def failed(failure: Failure) -> None:
            self._log.debug("users: cannot list the columns of mtop_user: {error}", error=_first_line(failure))

        return d.addCallbacks(found, failed)

    # UserStore

    def lookup(self, username: str) -> Deferred[UserRecord | None]:
        if not self.running:
            raise StoreUnavailable(f"the user store {self.description} is not running")
        columns = BASE_COLUMNS + self.policy_columns
        sql = self._sql(f"SELECT {', '.join(columns)} FROM mtop_user WHERE username = ?")
        d = self._query(sql, (username,))

        def row(rows: list) -> UserRecord | None:
            if not rows:
                return None
            values = dict(zip(columns, rows[0]))
            return UserRecord(
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

        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable) or not self._is_database_error(failure):
                return failure
            if self.policy_columns:
                # A column may have been dropped: look again before the next lookup.
                self._detect_columns()
            raise StoreUnavailable(f"{self.description}: {_first_line(failure)}")

        return d.addCallbacks(row, failed)


def _first_line(failure: Failure) -> str:
    text = failure.getErrorMessage().strip()
    return text.splitlines()[0] if text else failure.type.__name__
