"""``mtopctl user``: add, change, delete and list users, and set and show
their policy (enabled, expiry, connections, rate, quota) and traffic;
``user hash`` prints a password's column values for plain SQL."""

from __future__ import annotations

import argparse

from mtop import users
from mtop.ctl.common import CommandError, Commands, add_password_flags, db_settings, read_password
from mtop.database import connect
from mtop.users import UserAdmin, UserError, open_users

_UNSET = object()


def _check_username(username: str) -> None:
    try:
        users.check_username(username)
    except UserError as e:
        raise CommandError(e.message) from None


def _hash_for(args: argparse.Namespace, password: str) -> tuple[str, str]:
    """(salt column, password column) for ``password`` as the flags ask."""
    try:
        return users.password_columns(password, args.legacy, args.salt)
    except UserError as e:
        raise CommandError(e.message) from None


class _Users:
    """``with _Users(args) as admin``: a `UserAdmin` on the config's
    database, closed at the end; its `UserError` become `CommandError`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __enter__(self) -> UserAdmin:
        self.admin = open_users(connect(db_settings(self.args)))
        return self.admin

    def __exit__(self, kind, error, traceback) -> None:
        self.admin.db.close()
        if isinstance(error, UserError):
            raise CommandError(error.message) from None


def cmd_user_add(args: argparse.Namespace) -> None:
    """Add a user with a new password."""
    _check_username(args.username)
    password = read_password(args)
    with _Users(args) as admin:
        admin.add(args.username, password, args.legacy, args.salt)
    print(f"user {args.username} added")


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
    with _Users(args) as admin:
        admin.set_password(args.username, password, args.legacy, args.salt)
    print(f"password of {args.username} changed")


def cmd_user_del(args: argparse.Namespace) -> None:
    """Delete a user."""
    with _Users(args) as admin:
        admin.delete(args.username)
    print(f"user {args.username} deleted")


def cmd_user_list(args: argparse.Namespace) -> None:
    """List the users with their kind of password hash, never the hash."""
    with _Users(args) as admin:
        _, rows = admin.list()
    print(f"{'USERNAME':<32} {'HASH':<8} {'CREATED':<20} UPDATED")
    for row in rows:
        print(f"{row['username']:<32} {row['password']:<8} {row['created_time'] or '':<20} {row['updated_time'] or ''}")


# The argument types of ``user set``.  Their names stay as they are:
# argparse names a type function in its "invalid <name> value" message.

def _argument(parse):
    def parsed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parsed


_size = _argument(users.parse_size)
_size.__name__ = "_size"
_count = _argument(users.parse_count)
_count.__name__ = "_count"
_date = _argument(users.parse_date)
_date.__name__ = "_date"


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
    with _Users(args) as admin:
        admin.set_policy(args.username, changes)
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
    with _Users(args) as admin:
        record = admin.get(args.username)
    order = ["username", "password", "created_time", "updated_time", *_SHOW_COLUMNS]
    values = {key: record[key] for key in order if key in record}
    values["password"] = {"scrypt": "scrypt", "legacy": "legacy sha256"}.get(record["password"], "none (cannot log in)")
    values["created_time"] = values["created_time"] or ""
    values["updated_time"] = values["updated_time"] or ""
    if "enabled" in values:
        values["enabled"] = "yes" if values["enabled"] else "no"
    for column in ("rate_limit", "quota_bytes", "max_connections", "expires_at", "last_seen"):
        if column in values and values[column] is None:
            values[column] = "never" if column in ("expires_at", "last_seen") else "none"
    if "rate_limit" in values and values["rate_limit"] != "none":
        values["rate_limit"] = f"{values['rate_limit']} bytes/s ({_human(int(values['rate_limit']))}/s)"
    if "bytes_up" in values:
        up, down = record["bytes_up"], record["bytes_down"]
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
    with _Users(args) as admin:
        admin.reset_usage(args.username)
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
