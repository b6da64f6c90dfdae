"""Managing users: what ``mtopctl user`` and the admin API share.

`UserAdmin` adds, changes, deletes, lists and shows users of the
``mtop_user`` table over a blocking `mtop.database.SyncDatabase`; its
errors are `UserError`, each naming the field it is about and the HTTP
status an API answers with, so ``mtopctl`` and the API say the same
things.  The parsers (`parse_size`, `parse_count`, `parse_date`) read what
people type (``10G``, ``none``, ``2027-01-31``) and raise `ValueError`
with the message to show.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from mtop import passwords
from mtop.database import HISTORY_STEP, DatabaseError, SyncDatabase

#: The length of the salts the original's ``mctl`` writes; legacy rows get
#: the same, so they are exactly what the original would write.
LEGACY_SALT_LENGTH = 12
#: Words meaning "no limit" (or "never", for dates).
NONE_WORDS = ("none", "never", "unlimited", "off")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: The policy columns a user's changes may set, in the order shown.
POLICY = ("enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes")
#: What `UserAdmin.get` and `UserAdmin.list` read besides the name.
_SHOWN = ("enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes", "bytes_up", "bytes_down", "last_seen")
#: What a listing may be sorted by.
SORT_KEYS = ("username", "created_time", "updated_time", "last_seen", "used", "quota_bytes", "expires_at")


class UserError(Exception):
    """A refused request: ``field`` names what was wrong (or ``None``),
    ``status`` is the HTTP status an API answers with."""

    status = 400

    def __init__(self, message: str, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status


class NoSuchUser(UserError):
    status = 404

    def __init__(self, username: str):
        super().__init__(f"no user {username!r}", "username")


class UserExists(UserError):
    status = 409

    def __init__(self, username: str):
        super().__init__(f"user {username!r} already exists; use 'user passwd' to change the password", "username")


def check_username(username: Any) -> str:
    if not isinstance(username, str) or not 1 <= len(username.encode("utf-8", "surrogatepass")) <= 128:
        raise UserError(f"user name {username!r} must be 1 to 128 bytes long", "username")
    try:
        username.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the user name is not valid Unicode text", "username") from None
    return username


def check_password(password: Any) -> str:
    """A password the MTop protocol can carry (1 to 255 bytes of UTF-8)."""
    if not isinstance(password, str) or not password:
        raise UserError("the password must not be empty", "password")
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise UserError("the password is not valid Unicode text", "password") from None
    if size > 255:
        raise UserError("the password is longer than 255 bytes, which the MTop protocol cannot carry", "password")
    return password


def password_columns(password: str, legacy: bool = False, salt: str | None = None) -> tuple[str, str]:
    """(salt column, password column) for ``password``: scrypt, or with
    ``legacy`` the original's SHA-256 of salt@password."""
    if salt is None:
        salt = passwords.new_salt(LEGACY_SALT_LENGTH) if legacy else passwords.new_salt()
    if len(salt) > 32:
        raise UserError("the salt is longer than 32 characters (mtop_user.salt is VARCHAR(32))", "salt")
    if legacy:
        return salt, passwords.legacy_hash(salt, password)
    return salt, passwords.scrypt_hash(password)


def hash_kind(stored: str | None) -> str:
    """``scrypt``, ``legacy`` or ``none`` (cannot log in)."""
    if not stored:
        return "none"
    return "scrypt" if passwords.is_expensive(stored) else "legacy"


# What people type


def _limit(text: str, units: dict[str, int], what: str) -> int | None:
    value = str(text).strip().lower()
    if value in NONE_WORDS:
        return None
    if units and value.endswith("b"):  # 10MiB, 10MB, 10B
        value = value.removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units and value[-1:].isalpha() else ""
    try:
        amount = float(value[: len(value) - len(unit)]) if units else int(value)
    except ValueError:
        raise ValueError(f"{text!r} is not {what}") from None
    amount *= units.get(unit, 1)
    if not 0 <= amount < 2**63:  # also NaN and infinity
        raise ValueError(f"{text!r} must be from 0 to 2^63")
    return int(amount)


def parse_size(text: str) -> int | None:
    """Bytes: ``1048576``, ``512K``, ``10M``, ``2G``, ``1T`` (powers of
    1024; ``KiB``/``MiB``/... too), or ``none`` for no limit."""
    return _limit(text, _SIZE_UNITS, "a size; use bytes, 512K, 10M, 2G or none")


def parse_count(text: str) -> int | None:
    return _limit(text, {}, "a whole number (or none)")


def parse_date(text: str) -> str | None:
    """UTC: ``2027-01-31``, ``2027-01-31T12:00`` or ``2027-01-31 12:00:00``;
    ``never`` for no expiry.  Returned as ``YYYY-MM-DD HH:MM:SS``."""
    if str(text).strip().lower() in NONE_WORDS:
        return None
    try:
        when = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a date; use 2027-01-31 or '2027-01-31 12:00' (UTC) or never") from None
    if when.tzinfo is not None:
        try:
            when = when.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
            raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None
    # Not strftime: glibc's %Y writes year 1 as "1", not "0001".
    return when.isoformat(sep=" ", timespec="seconds")


def policy_value(column: str, value: Any) -> Any:
    """``value`` for ``column`` as stored: from what a person typed or a
    JSON value (a number, ``null``, a boolean for ``enabled``).  Raises
    `UserError` naming the column."""
    if column not in POLICY:
        raise UserError(f"{column!r} is not a policy field (one of {', '.join(POLICY)})", column)
    if column == "enabled":
        if isinstance(value, bool):
            return value
        raise UserError("enabled must be true or false", column)
    if value is None:
        return None
    try:
        if column == "expires_at":
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a date")
            return parse_date(value)
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        if isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            raise ValueError(f"{value!r} is not a number")
        return parse_count(text) if column == "max_connections" else parse_size(text)
    except ValueError as e:
        raise UserError(f"{column}: {e}", column) from None


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    return str(value)[:19]


class UserAdmin:
    """Users of ``db`` (an open `SyncDatabase` whose ``mtop_user`` exists:
    `open_users`).  Each method is one transaction."""

    def __init__(self, db: SyncDatabase):
        self.db = db
        self._columns: set[str] | None = None
        self._history: bool | None = None

    @property
    def columns(self) -> set[str]:
        if self._columns is None:
            self._columns = self.db.columns()
        return self._columns

    def require(self, columns: list[str] | tuple[str, ...]) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise UserError(f"mtop_user has no {', '.join(missing)} column; add them with 'mtopctl db upgrade'", None, 409)

    def add(self, username: str, password: str, legacy: bool = False, salt: str | None = None) -> None:
        check_username(username)
        check_password(password)
        salt, stored = password_columns(password, legacy, salt)
        db = self.db
        try:
            db.run("INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", (username, salt, stored))
        except db.IntegrityError:
            raise UserExists(username) from None

    def set_password(self, username: str, password: str, legacy: bool = False, salt: str | None = None) -> None:
        check_password(password)
        salt, stored = password_columns(password, legacy, salt)
        self._update(
            username, "UPDATE mtop_user SET salt = ?, password = ?, updated_time = CURRENT_TIMESTAMP WHERE username = ?",
            (salt, stored, username),
        )

    def delete(self, username: str) -> None:
        self._update(username, "DELETE FROM mtop_user WHERE username = ?", (username,))
        if self.has_history:
            self.db.run("DELETE FROM mtop_usage_history WHERE username = ?", (username,))

    @property
    def has_history(self) -> bool:
        """Whether the database has ``mtop_usage_history``."""
        if self._history is None:
            self._history = "mtop_usage_history" in self.db.tables()
        return self._history

    def usage_history(self, username: str | None, hours: int, step: int) -> dict[str, Any]:
        """Traffic over the last ``hours``, in ``step``-second points (a
        multiple of `HISTORY_STEP`), oldest first, every point present (0
        where nothing moved), with the totals per server: one user's, or
        with ``username`` ``None`` every server's whole traffic (their rows
        whose username is '', so a chart of the cluster reads a few hundred
        rows however many users there are).  Times are Unix seconds by the
        database's clock."""
        from mtop.userstore.sql import NOW

        if not self.has_history:
            raise UserError("there is no mtop_usage_history table; add it with 'mtopctl db upgrade'", None, 409)
        if step <= 0 or step % HISTORY_STEP:
            raise UserError(f"step must be a multiple of {HISTORY_STEP} seconds", "step")
        if username is not None:
            self.get(username)  # 404 for an unknown user
        db = self.db
        try:
            now = int(db.execute(f"SELECT {NOW[db.driver]}").fetchone()[0])
            until = now - now % step + step
            since = until - ((hours * 3600 + step - 1) // step) * step
            rows = db.execute(
                "SELECT server_id, period, bytes_up, bytes_down FROM mtop_usage_history WHERE username = ? AND period >= ?",
                ("" if username is None else username, since),
            ).fetchall()
        finally:
            db.commit()
        points = [[0, 0] for _ in range((until - since) // step)]
        servers: dict[str, list[int]] = {}
        for server, period, up, down in rows:
            up, down = int(up or 0), int(down or 0)
            index = (int(period) - since) // step
            if 0 <= index < len(points):
                points[index][0] += up
                points[index][1] += down
                total = servers.setdefault(server, [0, 0])
                total[0] += up
                total[1] += down
        return {
            "since": since,
            "until": until,
            "step": step,
            "points": [{"t": since + i * step, "up": up, "down": down} for i, (up, down) in enumerate(points)],
            "servers": [{"server": name, "up": up, "down": down} for name, (up, down) in sorted(servers.items())],
        }

    def set_policy(self, username: str, changes: dict[str, Any]) -> None:
        """Set the policy columns in ``changes`` (values as stored: see
        `policy_value`); the servers see them live."""
        if not changes:
            raise UserError("nothing to change", None)
        self.require(list(changes))
        assignments = ", ".join(f"{column} = ?" for column in changes)
        self._update(
            username, f"UPDATE mtop_user SET {assignments}, updated_time = CURRENT_TIMESTAMP WHERE username = ?",
            (*changes.values(), username),
        )

    def reset_usage(self, username: str) -> None:
        self.require(("bytes_up", "bytes_down"))
        self._update(username, "UPDATE mtop_user SET bytes_up = 0, bytes_down = 0 WHERE username = ?", (username,))

    def _update(self, username: str, sql: str, params: tuple) -> None:
        if self.db.run(sql, params).rowcount == 0:
            raise NoSuchUser(username)

    def _select(self) -> list[str]:
        return ["username", "password", "created_time", "updated_time", *[c for c in _SHOWN if c in self.columns]]

    def _record(self, columns: list[str], row: tuple) -> dict[str, Any]:
        values = dict(zip(columns, row))
        record: dict[str, Any] = {
            "username": values["username"],
            "password": hash_kind(values.pop("password")),
            "created_time": _iso(values.get("created_time")),
            "updated_time": _iso(values.get("updated_time")),
        }
        if "enabled" in values:
            record["enabled"] = values["enabled"] is None or bool(values["enabled"])
        for column in ("expires_at", "last_seen"):
            if column in values:
                record[column] = _iso(values[column])
        for column in ("max_connections", "rate_limit", "quota_bytes"):
            if column in values:
                record[column] = None if values[column] is None else int(values[column])
        if "bytes_up" in values:
            record["bytes_up"] = int(values["bytes_up"] or 0)
            record["bytes_down"] = int(values["bytes_down"] or 0)
            record["used"] = record["bytes_up"] + record["bytes_down"]
        return record

    def get(self, username: str) -> dict[str, Any]:
        """One user's columns (those the table has); the password as the
        kind of its hash, never the hash."""
        columns = self._select()
        try:
            row = self.db.execute(f"SELECT {', '.join(columns)} FROM mtop_user WHERE username = ?", (username,)).fetchone()
        finally:
            self.db.commit()
        if row is None:
            raise NoSuchUser(username)
        return self._record(columns, row)

    def list(
        self, offset: int = 0, limit: int | None = None, sort: str = "username", descending: bool = False, search: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        """(how many users match, one page of them): ``search`` is a part
        of the name (case-insensitive), ``sort`` one of `SORT_KEYS`."""
        if sort not in SORT_KEYS:
            raise UserError(f"cannot sort by {sort!r} (one of {', '.join(SORT_KEYS)})", "sort")
        if sort == "used":
            self.require(("bytes_up", "bytes_down"))
            order = "(COALESCE(bytes_up, 0) + COALESCE(bytes_down, 0))"
        else:
            if sort not in ("username", "created_time", "updated_time"):
                self.require((sort,))
            order = sort
        where, params = "", ()
        if search:
            # '!' escapes: a backslash would mean something else to MariaDB.
            pattern = "%" + search.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
            where, params = " WHERE LOWER(username) LIKE ? ESCAPE '!'", (pattern,)
        columns = self._select()
        direction = "DESC" if descending else "ASC"
        page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else ""
        try:
            total = self.db.execute(f"SELECT COUNT(*) FROM mtop_user{where}", params).fetchone()[0]
            rows = self.db.execute(
                f"SELECT {', '.join(columns)} FROM mtop_user{where} ORDER BY {order} {direction}, username {direction}{page}",
                params,
            ).fetchall()
        finally:
            self.db.commit()
        return int(total), [self._record(columns, row) for row in rows]


def open_users(db: SyncDatabase) -> UserAdmin:
    """A `UserAdmin` over ``db``, or `DatabaseError` if it has no user table."""
    if not db.columns():
        db.close()
        raise DatabaseError("there is no mtop_user table; run 'mtopctl db init' first")
    return UserAdmin(db)
