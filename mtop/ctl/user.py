"""``mtopctl user``: add, change, delete and list users, and set and show
their policy (enabled, expiry, connections, rate, quota) and traffic;
``user hash`` prints a password's column values for plain SQL."""

from __future__ import annotations

import argparse

from mtop import passwords
from mtop.ctl.common import CommandError, Commands, add_password_flags, db_settings, read_password
from mtop.database import DatabaseError, SyncDatabase, connect

_UNSET = object()


def _check_username(username: str) -> None:
    size = len(username.encode("utf-8"))
    if not 1 <= size <= 128:
        raise CommandError(f"user name {username!r} must be 1 to 128 bytes long")


#: The length of the salts the original's ``mctl`` writes; ``--legacy``
#: rows get the same, so they are exactly what the original would write.
LEGACY_SALT_LENGTH = 12


def _hash_for(args: argparse.Namespace, password: str) -> tuple[str, str]:
    """(salt column, password column) for ``password`` as the flags ask."""
    if args.salt is not None:
        salt = args.salt
    else:
        salt = passwords.new_salt(LEGACY_SALT_LENGTH) if args.legacy else passwords.new_salt()
    if len(salt) > 32:
        raise CommandError("the salt is longer than 32 characters (mtop_user.salt is VARCHAR(32))")
    if args.legacy:
        return salt, passwords.legacy_hash(salt, password)
    return salt, passwords.scrypt_hash(password)


def _open(args: argparse.Namespace) -> SyncDatabase:
    db = connect(db_settings(args))
    if not db.columns():
        db.close()
        raise DatabaseError("there is no mtop_user table; run 'mtopctl db init' first")
    return db


def cmd_user_add(args: argparse.Namespace) -> None:
    """Add a user with a new password."""
    _check_username(args.username)
    password = read_password(args)
    salt, stored = _hash_for(args, password)
    db = _open(args)
    try:
        db.execute("INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", (args.username, salt, stored))
        db.commit()
    except db.IntegrityError:
        raise CommandError(f"user {args.username!r} already exists; use 'user passwd' to change the password") from None
    finally:
        db.close()
    print(f"user {args.username} added")


def _change(args: argparse.Namespace, sql: str, params: tuple) -> None:
    db = _open(args)
    try:
        cursor = db.execute(sql, params)
        db.commit()
        if cursor.rowcount == 0:
            raise CommandError(f"no user {args.username!r}")
    finally:
        db.close()


def _sql_string(text: str, what: str) -> str:
    """``text`` as an SQL string literal that means the same to SQLite,
    PostgreSQL and MariaDB (MariaDB would read a backslash as an escape)."""
    if "\\" in text or any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise CommandError(
            f"the {what} has a backslash or control character, which SQL literals do not carry the same "
            "way in every database; leave out -u and write the INSERT yourself"
        )
    return "'" + text.replace("'", "''") + "'"


def cmd_user_hash(args: argparse.Namespace) -> None:
    """Print the salt and password column values of a new password (or,
    with ``-u``, the whole INSERT), for users added by plain SQL."""
    if args.username is not None:
        _check_username(args.username)
    password = read_password(args)
    salt, stored = _hash_for(args, password)
    if args.username is None:
        print(f"salt={salt}")
        print(f"password={stored}")
    else:
        print(
            "INSERT INTO mtop_user (username, salt, password) "
            f"VALUES ({_sql_string(args.username, 'user name')}, {_sql_string(salt, 'salt')}, "
            f"{_sql_string(stored, 'hash')});"
        )


def cmd_user_passwd(args: argparse.Namespace) -> None:
    """Give a user a new password (and salt)."""
    password = read_password(args)
    salt, stored = _hash_for(args, password)
    _change(
        args,
        "UPDATE mtop_user SET salt = ?, password = ?, updated_time = CURRENT_TIMESTAMP WHERE username = ?",
        (salt, stored, args.username),
    )
    print(f"password of {args.username} changed")


def cmd_user_del(args: argparse.Namespace) -> None:
    """Delete a user."""
    _change(args, "DELETE FROM mtop_user WHERE username = ?", (args.username,))
    print(f"user {args.username} deleted")


def cmd_user_list(args: argparse.Namespace) -> None:
    """List the users with their kind of password hash, never the hash."""
    db = _open(args)
    try:
        rows = db.execute(
            "SELECT username, password, created_time, updated_time FROM mtop_user ORDER BY username"
        ).fetchall()
    finally:
        db.close()
    print(f"{'USERNAME':<32} {'HASH':<8} {'CREATED':<20} UPDATED")
    for username, stored, created, updated in rows:
        kind = "scrypt" if passwords.is_expensive(stored or "") else ("legacy" if stored else "none")
        print(f"{username:<32} {kind:<8} {str(created or '')[:19]:<20} {str(updated or '')[:19]}")


# The argument types of ``user set``.  Their names stay as they are:
# argparse names a type function in its "invalid <name> value" message.

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
NONE_WORDS = ("none", "never", "unlimited", "off")


def _limit(text: str, units: dict[str, int], what: str) -> int | None:
    """A non-negative number with an optional unit suffix, or ``none``."""
    value = text.strip().lower()
    if value in NONE_WORDS:
        return None
    if units and value.endswith("b"):  # 10MiB, 10MB, 10B
        value = value.removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units and value[-1:].isalpha() else ""
    try:
        amount = float(value[: len(value) - len(unit)]) if units else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    amount *= units.get(unit, 1)
    if not 0 <= amount < 2**63:  # also NaN and infinity
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 2^63")
    return int(amount)


def _size(text: str) -> int | None:
    """Bytes: ``1048576``, ``512K``, ``10M``, ``2G``, ``1T`` (powers of
    1024; ``KiB``/``MiB``/... too), or ``none`` for no limit."""
    return _limit(text, _SIZE_UNITS, "a size; use bytes, 512K, 10M, 2G or none")


def _count(text: str) -> int | None:
    return _limit(text, {}, "a whole number (or none)")


def _date(text: str) -> str | None:
    """UTC: ``2027-01-31``, ``2027-01-31T12:00`` or ``2027-01-31 12:00:00``;
    ``never`` for no expiry.  Returned as ``YYYY-MM-DD HH:MM:SS``."""
    from datetime import datetime

    if text.strip().lower() in NONE_WORDS:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use 2027-01-31 or '2027-01-31 12:00' (UTC) or never") from None
    if when.tzinfo is not None:
        from datetime import timezone

        try:
            when = when.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
            raise argparse.ArgumentTypeError(f"{text!r} is outside the years 1 to 9999 in UTC") from None
    # Not strftime: glibc's %Y writes year 1 as "1", not "0001".
    return when.isoformat(sep=" ", timespec="seconds")


def _require_policy(db: SyncDatabase, columns: list[str]) -> None:
    missing = [c for c in columns if c not in db.columns()]
    if missing:
        raise CommandError(f"mtop_user has no {', '.join(missing)} column; add them with 'mtopctl db upgrade'")


def cmd_user_set(args: argparse.Namespace) -> None:
    """Change the policy columns given; the server sees them live."""
    changes: dict[str, object] = {}
    if args.enabled is not None:
        changes["enabled"] = args.enabled
    for option, column in (("expires", "expires_at"), ("max_conns", "max_connections"), ("rate", "rate_limit"), ("quota", "quota_bytes")):
        value = getattr(args, option)
        if value is not _UNSET:
            changes[column] = value
    if not changes:
        raise CommandError("nothing to set; give --enable/--disable, --expires, --max-conns, --rate or --quota")
    db = _open(args)
    try:
        _require_policy(db, list(changes))
        assignments = ", ".join(f"{column} = ?" for column in changes)
        cursor = db.execute(
            f"UPDATE mtop_user SET {assignments}, updated_time = CURRENT_TIMESTAMP WHERE username = ?",
            (*changes.values(), args.username),
        )
        db.commit()
        if cursor.rowcount == 0:
            raise CommandError(f"no user {args.username!r}")
    finally:
        db.close()
    shown = ", ".join(f"{column}={'none' if value is None else value}" for column, value in changes.items())
    print(f"user {args.username}: {shown}")


_SHOW_COLUMNS = (
    "enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes", "bytes_up", "bytes_down", "last_seen",
)


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def cmd_user_show(args: argparse.Namespace) -> None:
    """Show one user's columns (those the table has), sizes also in KiB/MiB/...."""
    db = _open(args)
    try:
        have = db.columns()
        columns = ["username", "password", "created_time", "updated_time", *[c for c in _SHOW_COLUMNS if c in have]]
        row = db.execute(f"SELECT {', '.join(columns)} FROM mtop_user WHERE username = ?", (args.username,)).fetchone()
        db.commit()
    finally:
        db.close()
    if row is None:
        raise CommandError(f"no user {args.username!r}")
    values = dict(zip(columns, row))
    stored = values["password"] or ""
    values["password"] = "scrypt" if passwords.is_expensive(stored) else ("legacy sha256" if stored else "none (cannot log in)")
    if "enabled" in values:
        values["enabled"] = "yes" if values["enabled"] is None or bool(values["enabled"]) else "no"
    for column in ("rate_limit", "quota_bytes", "max_connections", "expires_at", "last_seen"):
        if column in values and values[column] is None:
            values[column] = "never" if column in ("expires_at", "last_seen") else "none"
    if "rate_limit" in values and values["rate_limit"] != "none":
        values["rate_limit"] = f"{values['rate_limit']} bytes/s ({_human(int(values['rate_limit']))}/s)"
    if "bytes_up" in values:
        up, down = int(values["bytes_up"] or 0), int(values["bytes_down"] or 0)
        values["bytes_up"], values["bytes_down"] = f"{up} ({_human(up)})", f"{down} ({_human(down)})"
        used = f"{up + down} ({_human(up + down)})"
        if "quota_bytes" in values and values["quota_bytes"] != "none":
            quota = int(values["quota_bytes"])
            used += f" of {quota} ({_human(quota)}), {100 * (up + down) / quota if quota else 100:.1f}%"
            values["quota_bytes"] = f"{quota} ({_human(quota)})"
        values["used"] = used
    width = max(len(k) for k in values)
    for key, value in values.items():
        print(f"{key:<{width}}  {value}")


def cmd_user_reset_usage(args: argparse.Namespace) -> None:
    """Set a user's traffic counters (and so their used quota) to 0."""
    db = _open(args)
    try:
        _require_policy(db, ["bytes_up", "bytes_down"])
        cursor = db.execute("UPDATE mtop_user SET bytes_up = 0, bytes_down = 0 WHERE username = ?", (args.username,))
        db.commit()
        if cursor.rowcount == 0:
            raise CommandError(f"no user {args.username!r}")
    finally:
        db.close()
    print(f"usage of {args.username} reset to 0")


def register(commands: Commands) -> None:
    """Add ``user add``, ``hash``, ``passwd``, ``del``, ``list``, ``set``,
    ``show`` and ``reset-usage``."""
    user = commands.add_parser("user", help="user management").add_subparsers(dest="user_command", required=True)
    add = user.add_parser("add", help="add a user")
    add.add_argument("-u", "--username", required=True)
    add_password_flags(add)
    add.set_defaults(func=cmd_user_add)
    hasher = user.add_parser(
        "hash",
        help="print a password's column values for a plain-SQL INSERT (no database needed)",
        description=(
            "Print the values of a new password for the mtop_user table, for adding users with plain SQL. "
            "Output: two lines, 'salt=VALUE' and 'password=VALUE', the values for the salt and password "
            "columns; with -u NAME instead one line, an INSERT INTO mtop_user (username, salt, password) "
            "VALUES (...); statement that SQLite, PostgreSQL and MariaDB all read. The default hash is "
            "scrypt (the salt inside it; the salt column gets a random value all the same); --legacy "
            "writes the original implementation's SHA-256 of salt@password with a 12-character salt, "
            "which original servers sharing the table also accept."
        ),
    )
    hasher.add_argument("-u", "--username", help="print a ready INSERT statement for this user")
    add_password_flags(hasher)
    hasher.set_defaults(func=cmd_user_hash)
    passwd = user.add_parser("passwd", help="change a user's password")
    passwd.add_argument("-u", "--username", required=True)
    add_password_flags(passwd)
    passwd.set_defaults(func=cmd_user_passwd)
    delete = user.add_parser("del", help="delete a user")
    delete.add_argument("-u", "--username", required=True)
    delete.set_defaults(func=cmd_user_del)
    user.add_parser("list", help="list users").set_defaults(func=cmd_user_list)
    setter = user.add_parser("set", help="change a user's policy (takes effect live)")
    setter.add_argument("-u", "--username", required=True)
    state = setter.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    state.add_argument("--disable", dest="enabled", action="store_const", const=False, help="refuse logins, close open tunnels")
    setter.add_argument("--expires", type=_date, default=_UNSET, metavar="DATE", help="UTC date (and time) from which the user is refused, or never")
    setter.add_argument("--max-conns", type=_count, default=_UNSET, metavar="N", help="concurrent tunnels, across servers sharing the database, or none")
    setter.add_argument("--rate", type=_size, default=_UNSET, metavar="BYTES", help="bytes per second each way, all tunnels on all servers together (512K, 10M), or none")
    setter.add_argument("--quota", type=_size, default=_UNSET, metavar="BYTES", help="total traffic up plus down (10G), or none")
    setter.set_defaults(func=cmd_user_set)
    show = user.add_parser("show", help="show a user's policy and traffic")
    show.add_argument("-u", "--username", required=True)
    show.set_defaults(func=cmd_user_show)
    reset = user.add_parser("reset-usage", help="set a user's traffic counters to 0")
    reset.add_argument("-u", "--username", required=True)
    reset.set_defaults(func=cmd_user_reset_usage)
