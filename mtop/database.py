"""The user table in each database, and the blocking access ``mtopctl`` uses.

The table is the original's ``mtop_user(username, salt, password,
created_time, updated_time)``, read as it is: a database created by the
original authenticates with no migration.  ``mtopctl db init`` and
``mtopctl db upgrade`` add MTop's optional policy columns, all nullable or
defaulted, so programs that insert only the original's columns keep
working:

==================  ==========================================================
column              meaning (NULL: no limit / not set)
==================  ==========================================================
enabled             false refuses the user (NULL counts as true)
expires_at          refused from this time on (UTC)
max_connections     concurrent tunnels
rate_limit          bytes per second, shared by all the user's tunnels
quota_bytes         total bytes (up + down) allowed
bytes_up            bytes sent by the user's clients, added by every server
bytes_down          bytes sent to the user's clients, added by every server
last_seen           last successful login
==================  ==========================================================

Traffic counters are added with ``SET bytes_up = bytes_up + ?`` so several
servers sharing the database add up.  Each server's flush is one
transaction that also records ``(server_id, seq)`` in ``mtop_usage_flush``:
a flush retried after a lost reply finds its row and is not counted twice.
Each server keeps only its latest row there.

A user's quota holds across servers through ``mtop_quota_lease``: a server
spends only bytes it has leased from the database, in slices, by a grant
that never gives out more than the quota minus the counters minus every
other live lease (see `mtop.userstore.sql.QuotaLease`).

Each flush also adds the bytes it counts to ``mtop_usage_history``, one
row per user, server and five minutes (`HISTORY_STEP`), in the same
transaction, so the admin panel charts traffic without Prometheus; rows
older than ``db.history_days`` (default 30) are dropped.

``db upgrade`` only adds what is missing, so it is idempotent and safe on a
live database (adding a nullable or constant-default column does not
rewrite the table on PostgreSQL 11+, MariaDB 10.3+ or SQLite).

SQL here is written with ``?`` placeholders and converted for drivers whose
paramstyle is ``%s``.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import quote

from mtop.dsn import DSNError, parse_mysql_dsn
from mtop.redact import redact

DRIVERS = ("sqlite", "postgres", "mysql")

#: (name, SQLite type, PostgreSQL type, MySQL type)
POLICY_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("enabled", "BOOLEAN", "BOOLEAN", "BOOLEAN"),
    ("expires_at", "TIMESTAMP", "TIMESTAMP", "DATETIME"),
    ("max_connections", "INTEGER", "INTEGER", "INT"),
    ("rate_limit", "BIGINT", "BIGINT", "BIGINT"),
    ("quota_bytes", "BIGINT", "BIGINT", "BIGINT"),
    ("bytes_up", "BIGINT NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0"),
    ("bytes_down", "BIGINT NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0"),
    ("last_seen", "TIMESTAMP", "TIMESTAMP", "DATETIME"),
)
POLICY_COLUMN_NAMES = tuple(c[0] for c in POLICY_COLUMNS)

_TYPE_INDEX = {"sqlite": 1, "postgres": 2, "mysql": 3}

#: The original's table (types that all three databases accept).
BASE_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_user (
    username VARCHAR(128) NOT NULL PRIMARY KEY,
    salt VARCHAR(32) NOT NULL,
    password VARCHAR(1024) NOT NULL DEFAULT '',
    created_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)
"""

#: Which usage flushes have been applied (see the module docstring).
FLUSH_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_usage_flush (
    server_id VARCHAR(64) NOT NULL,
    seq BIGINT NOT NULL,
    flushed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (server_id, seq)
)
"""

#: Quota leases (see `mtop.userstore.sql.QuotaLease`): the bytes of a
#: user's quota each server may still spend, until ``expires_at`` (Unix
#: seconds, by the database's clock) unless renewed.
LEASE_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_quota_lease (
    server_id VARCHAR(64) NOT NULL,
    username VARCHAR(128) NOT NULL,
    bytes BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, username)
)
"""

#: Which users each server carries (see `mtop.userstore.sql.Presence`):
#: rows of users with ``max_connections`` or ``rate_limit``, written by
#: each server every ``db.presence_interval``, gone when not renewed by
#: ``expires_at`` (Unix seconds, the database's clock).
PRESENCE_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_presence (
    server_id VARCHAR(64) NOT NULL,
    username VARCHAR(128) NOT NULL,
    tunnels INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, username)
)
"""

#: Seconds of one usage-history row: each flush adds its bytes to the row
#: of the five minutes it falls in (by the database's clock).
HISTORY_STEP = 300

#: Traffic over time (`HISTORY_STEP` rows, see the module docstring).
#: The key leads with the server so servers flushing at once lock apart;
#: the indexes serve a user's chart and the pruning and server's chart.
HISTORY_TABLE = (
    """
CREATE TABLE mtop_usage_history (
    server_id VARCHAR(64) NOT NULL,
    username VARCHAR(128) NOT NULL,
    period BIGINT NOT NULL,
    bytes_up BIGINT NOT NULL DEFAULT 0,
    bytes_down BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (server_id, username, period)
)
""",
    "CREATE INDEX mtop_usage_history_user ON mtop_usage_history (username, period)",
    "CREATE INDEX mtop_usage_history_period ON mtop_usage_history (period)",
)

#: Admin accounts of the admin API and panel (`mtop.admins`): the
#: password as an scrypt hash, never in clear.
ADMIN_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_admin (
    name VARCHAR(128) NOT NULL PRIMARY KEY,
    password VARCHAR(1024) NOT NULL,
    created_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)
"""

#: Bearer tokens of the admin API: the SHA-256 of the token (the token
#: itself is shown once, when made), whose admin, and a label.
ADMIN_TOKEN_TABLE = """
CREATE TABLE IF NOT EXISTS mtop_admin_token (
    token_hash CHAR(64) NOT NULL PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    label VARCHAR(128) NOT NULL DEFAULT '',
    created_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)
"""

#: MTop's optional tables, which a server uses when they are there.
OPTIONAL_TABLES = ("mtop_quota_lease", "mtop_presence", "mtop_usage_history")
_OPTIONAL_NAMES = ", ".join(f"'{name}'" for name in OPTIONAL_TABLES)

#: Which of `OPTIONAL_TABLES` exist (their names, one a row).
TABLES_SQL = {
    "sqlite": f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({_OPTIONAL_NAMES})",
    "postgres": (
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_name IN ({_OPTIONAL_NAMES}) AND table_schema = current_schema()"
    ),
    "mysql": (
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_name IN ({_OPTIONAL_NAMES}) AND table_schema = DATABASE()"
    ),
}

#: PostgreSQL: tell listening servers when a user's row changes (not when
#: only the traffic counters or last_seen move).
POSTGRES_NOTIFY = (
    """
CREATE OR REPLACE FUNCTION mtop_user_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mtop_user', OLD.username);
    ELSE
        PERFORM pg_notify('mtop_user', NEW.username);
        IF TG_OP = 'UPDATE' AND NEW.username <> OLD.username THEN
            PERFORM pg_notify('mtop_user', OLD.username);
        END IF;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""",
    "DROP TRIGGER IF EXISTS mtop_user_notify ON mtop_user",
    """
CREATE TRIGGER mtop_user_notify
AFTER INSERT OR DELETE OR UPDATE OF username, salt, password, {columns} ON mtop_user
FOR EACH ROW EXECUTE FUNCTION mtop_user_notify()
""",
)
NOTIFY_CHANNEL = "mtop_user"

#: The names of mtop_user's columns, one per row.
COLUMNS_SQL = {
    "sqlite": "SELECT name FROM pragma_table_info('mtop_user')",
    "postgres": (
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'mtop_user' AND table_schema = current_schema()"
    ),
    "mysql": (
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'mtop_user' AND table_schema = DATABASE()"
    ),
}


class DatabaseError(Exception):
    """A database operation that could not be done; the message is a sentence
    (driver messages quote DSN fragments: passwords in it are masked)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True)
class DBSettings:
    """Which database: ``driver`` is one of `DRIVERS`; ``dsn`` a path for
    SQLite, a libpq DSN for PostgreSQL, a Go or URL DSN for MySQL."""

    driver: str
    #: Not in repr: it may hold the database password.
    dsn: str = field(repr=False)


def to_format(sql: str) -> str:
    """``?`` placeholders as ``%s`` (literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class SyncDatabase:
    """A blocking DB-API connection with the SQL dialect handled."""

    def __init__(self, settings: DBSettings, connection: Any, errors: tuple[type, ...], integrity: type):
        self.settings = settings
        self.driver = settings.driver
        self.connection = connection
        self.Error = errors
        self.IntegrityError = integrity
        self.created_tables: list[str] = []

    def sql(self, text: str) -> str:
        return text if self.driver == "sqlite" else to_format(text)

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.connection.cursor()
        cursor.execute(self.sql(text), tuple(params))
        return cursor

    def run(self, text: str, params: Sequence[Any] = ()) -> Any:
        """``execute`` as one transaction: committed, or rolled back and
        the error raised; the cursor (``rowcount``, rows to fetch)."""
        try:
            cursor = self.execute(text, params)
            self.commit()
        except self.Error:
            self.rollback()
            raise
        return cursor

    def commit(self) -> None:
        self.connection.commit()

    def rollback(self) -> None:
        self.connection.rollback()

    def close(self) -> None:
        self.connection.close()

    def _names(self, query: dict[str, str]) -> set[str]:
        """The names ``query`` (per driver, a name a row) answers, lower-cased."""
        try:
            rows = self.execute(query[self.driver]).fetchall()
        finally:
            self.commit()
        return {str(row[0]).lower() for row in rows}

    def columns(self) -> set[str]:
        """The columns ``mtop_user`` has (empty if there is no table)."""
        return self._names(COLUMNS_SQL)

    def tables(self) -> set[str]:
        """Which of `OPTIONAL_TABLES` exist."""
        return self._names(TABLES_SQL)

    def upgrade(self) -> list[str]:
        """Create the table if missing and add the policy columns that are
        missing (and, on PostgreSQL, the change-notification trigger).
        Returns the columns added."""
        try:
            had = self.tables()
            if "mtop_usage_history" not in had:
                # Not IF NOT EXISTS: MySQL has no CREATE INDEX IF NOT EXISTS.
                for statement in HISTORY_TABLE:
                    self.execute(statement)
                self.commit()
            self.execute(BASE_TABLE)
            self.execute(FLUSH_TABLE)
            self.execute(LEASE_TABLE)
            self.execute(PRESENCE_TABLE)
            self.execute(ADMIN_TABLE)
            self.execute(ADMIN_TOKEN_TABLE)
            self.commit()
            #: The optional tables this upgrade created.
            self.created_tables = sorted(self.tables() - had)
            have = self.columns()
            added = []
            index = _TYPE_INDEX[self.driver]
            for column in POLICY_COLUMNS:
                if column[0] not in have:
                    self.execute(f"ALTER TABLE mtop_user ADD COLUMN {column[0]} {column[index]}")
                    added.append(column[0])
            self.commit()
            if self.driver == "postgres":
                function, drop, create = POSTGRES_NOTIFY
                self.execute(function)
                self.execute(drop)
                self.execute(create.format(columns=", ".join(POLICY_COLUMN_NAMES[:5])))
                self.commit()
        except self.Error as e:
            self.rollback()
            raise DatabaseError(f"cannot set up mtop_user: {_first_line(e)}") from None
        return added


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def create_private_file(path: str) -> bool:
    """Create ``path`` empty (an empty file is an empty SQLite database)
    with mode 0600, before SQLite would create it 0644 under the usual
    umask: it holds password hashes.  SQLite gives its journal files the
    database's mode.  An existing file is left as it is; ``True`` if the
    file was created.  Raises `DatabaseError` if it cannot be."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return False
    except OSError as e:
        raise DatabaseError(f"cannot create SQLite database {path}: {e.strerror}") from None
    os.close(fd)
    return True


def connect(settings: DBSettings, create: bool = False) -> SyncDatabase:
    """Open ``settings``' database (creating a SQLite file only with
    ``create``).  Raises `DatabaseError` naming what failed."""
    if settings.driver == "sqlite":
        path = settings.dsn
        if create:
            directory = os.path.dirname(path)
            if directory:
                try:
                    os.makedirs(directory, exist_ok=True)
                except OSError as e:
                    raise DatabaseError(f"cannot create SQLite database {path}: {directory}: {e.strerror}") from None
            create_private_file(path)
        mode = "rwc" if create else "rw"
        try:
            connection = sqlite3.connect(f"file:{quote(path)}?mode={mode}", uri=True, timeout=10.0)
        except sqlite3.Error as e:
            hint = "" if create else "; create it with 'mtopctl db init'"
            raise DatabaseError(f"cannot open SQLite database {path}: {e}{hint}") from None
        return SyncDatabase(settings, connection, (sqlite3.Error,), sqlite3.IntegrityError)
    if settings.driver == "postgres":
        try:
            import psycopg2
        except ImportError:
            raise DatabaseError("PostgreSQL needs psycopg2: pip install 'mtop[postgres]'") from None
        try:
            connection = psycopg2.connect(settings.dsn, connect_timeout=10)
        except psycopg2.Error as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {_first_line(e)}") from None
        return SyncDatabase(settings, connection, (psycopg2.Error,), psycopg2.IntegrityError)
    if settings.driver == "mysql":
        try:
            import pymysql
        except ImportError:
            raise DatabaseError("MySQL needs PyMySQL: pip install 'mtop[mysql]'") from None
        try:
            kwargs = parse_mysql_dsn(settings.dsn)
            kwargs.setdefault("connect_timeout", 10)
            connection = pymysql.connect(**kwargs)
        except DSNError as e:
            raise DatabaseError(str(e)) from None
        except pymysql.Error as e:
            raise DatabaseError(f"cannot connect to MySQL: {_first_line(e)}") from None
        return SyncDatabase(settings, connection, (pymysql.Error,), pymysql.IntegrityError)
    raise DatabaseError(f"unknown database driver {settings.driver!r}")
