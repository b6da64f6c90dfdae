"""``mtopctl``: users, the database, share links and certificates.

Reads the same config file as the server (``-c``, default
``$MTOP_CONFIG`` or ``/etc/mtop/mtop.yaml``).  Flag letters follow the
original tool.  Every error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Sequence

from mtop import fileperms, passwords, wire
from mtop.config import ConfigError, load_config, parse_listen
from mtop.database import DatabaseError, DBSettings, SyncDatabase, connect
from mtop.dsn import describe_dsn
from mtop.redact import redact
from mtop.urls import ServerLink, URLError, make_url, parse_url

DEFAULT_CONFIG = "/etc/mtop/mtop.yaml"
_UNSET = object()


class CommandError(Exception):
    """An error to print as one line."""


def _db_settings(args: argparse.Namespace) -> DBSettings:
    try:
        db = load_config(args.config, check_files=False).db
    except ConfigError as e:
        raise CommandError(f"{args.config}: {e}") from None
    return DBSettings(db.driverName, db.dsn)


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        password = args.password
    elif args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ")
    if not password:
        raise CommandError("the password must not be empty")
    if len(password.encode("utf-8")) > 255:
        raise CommandError("the password is longer than 255 bytes, which the MTop protocol cannot carry")
    return password


def _check_username(username: str) -> None:
    size = len(username.encode("utf-8"))
    if not 1 <= size <= 128:
        raise CommandError(f"user name {username!r} must be 1 to 128 bytes long")


def _hash_for(args: argparse.Namespace, password: str) -> tuple[str, str]:
    salt = args.salt if args.salt is not None else passwords.new_salt()
    if len(salt) > 32:
        raise CommandError("the salt is longer than 32 characters (mtop_user.salt is VARCHAR(32))")
    if args.legacy:
        return salt, passwords.legacy_hash(salt, password)
    return salt, passwords.scrypt_hash(password)


def cmd_db_init(args: argparse.Namespace) -> None:
    """Create mtop_user (or complete it) with the policy columns."""
    settings = _db_settings(args)
    db = connect(settings, create=True)
    try:
        added = db.upgrade()
    finally:
        db.close()
    where = settings.dsn if settings.driver == "sqlite" else describe_dsn(settings.driver, settings.dsn)
    print(f"database ready: {where}" + (f" (added {', '.join(added)})" if added else ""))
    # A database made before init created it 0600 (or by another tool).
    for warning in fileperms.database_warnings(settings.driver, settings.dsn):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    """Add what an older or original mtop_user lacks; changes nothing else."""
    settings = _db_settings(args)
    db = connect(settings)
    try:
        if not db.columns():
            raise CommandError("there is no mtop_user table; create it with 'mtopctl db init'")
        added = db.upgrade()
    finally:
        db.close()
    print(f"added columns: {', '.join(added)}" if added else "already up to date")


def _open(args: argparse.Namespace) -> SyncDatabase:
    db = connect(_db_settings(args))
    if not db.columns():
        db.close()
        raise DatabaseError("there is no mtop_user table; run 'mtopctl db init' first")
    return db


def cmd_user_add(args: argparse.Namespace) -> None:
    _check_username(args.username)
    password = _read_password(args)
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


def cmd_user_passwd(args: argparse.Namespace) -> None:
    password = _read_password(args)
    salt, stored = _hash_for(args, password)
    _change(
        args,
        "UPDATE mtop_user SET salt = ?, password = ?, updated_time = CURRENT_TIMESTAMP WHERE username = ?",
        (salt, stored, args.username),
    )
    print(f"password of {args.username} changed")


def cmd_user_del(args: argparse.Namespace) -> None:
    _change(args, "DELETE FROM mtop_user WHERE username = ?", (args.username,))
    print(f"user {args.username} deleted")


def cmd_user_list(args: argparse.Namespace) -> None:
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


def cmd_url(args: argparse.Namespace) -> None:
    password = _read_password(args)
    try:
        print(make_url(ServerLink(args.username, password, args.host, args.port, args.type, args.proto)))
    except URLError as e:
        raise CommandError(str(e)) from None


def cmd_cert_init(args: argparse.Namespace) -> None:
    from mtop.certs import init_certs

    try:
        paths = init_certs(args.dir, args.host, args.ip, force=args.force, key_group=args.group)
    except (FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from None
    except PermissionError as e:
        raise CommandError(f"{e.filename}: {e.strerror}") from None
    print(f"CA certificate:     {paths.ca_crt}  (give this to clients)")
    print(f"CA key:             {paths.ca_key}  (keep it secret; signs further server certificates)")
    print(f"server certificate: {paths.server_crt}  (chain: server, then CA)")
    key_note = f"  (readable by group {args.group})" if args.group else ""
    print(f"server key:         {paths.server_key}{key_note}")
    print()
    print("mtop.yaml:")
    print("  server:")
    print(f"    crt: {os.path.abspath(paths.server_crt)}")
    print(f"    key: {os.path.abspath(paths.server_key)}")
    print("climber.yaml (each server entry, with ca.crt copied to the client):")
    print("  servers:")
    print(f"    - host: \"{_host_for_link(args)}:443\"")
    print(f"      ca: {os.path.abspath(paths.ca_crt)}")
    if args.group is None and _runs_as_mtop_user():
        print(
            f"note: the server runs as user mtop and cannot read {paths.server_key}: "
            "use --group mtop (or: chgrp mtop KEY && chmod 640 KEY)",
            file=sys.stderr,
        )


def _host_for_link(args: argparse.Namespace) -> str:
    name = (list(args.host) + list(args.ip))[0]
    return f"[{name}]" if ":" in name else name


def _runs_as_mtop_user() -> bool:
    """Whether this is root on a machine where the server runs as ``mtop``
    (the Debian package)."""
    if os.geteuid() != 0:
        return False
    import pwd

    try:
        pwd.getpwnam("mtop")
    except KeyError:
        return False
    return True


_STATUS_TEXT = {
    wire.STATUS_UNSUPPORTED_VERSION: "version or request not supported",
    wire.STATUS_AUTH_FAILURE: "authentication failed",
    wire.STATUS_CONNECTION_FAILURE: "the server could not connect to the target",
}


def cmd_check(args: argparse.Namespace) -> None:
    """Open one tunnel with a share link and report how it went."""
    import socket
    import ssl
    import time

    try:
        link = parse_url(args.url)
    except URLError as e:
        raise CommandError(str(e)) from None
    if link.type != "tls":
        raise CommandError("check speaks TLS only; this link is for QUIC")
    try:
        target = parse_listen(args.target, "--target")
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if target.host is None:
        raise CommandError("--target needs a host: HOST:PORT")
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([link.proto])
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    request = wire.AuthRequest(
        link.username, link.password, target.host, target.port, wire.address_type_for(target.host)
    )
    started = time.monotonic()
    try:
        with socket.create_connection((link.host, link.port), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=link.host) as tls:
                handshake_ms = (time.monotonic() - started) * 1000
                tls.sendall(wire.encode_auth(request))
                reply = b""
                while len(reply) < wire.REPLY_LENGTH:
                    chunk = tls.recv(wire.REPLY_LENGTH - len(reply))
                    if not chunk:
                        break
                    reply += chunk
                version, alpn = tls.version(), tls.selected_alpn_protocol()
    except (OSError, ssl.SSLError) as e:
        raise CommandError(f"{link.host}:{link.port}: {e}") from None
    total_ms = (time.monotonic() - started) * 1000
    if len(reply) < wire.REPLY_LENGTH:
        raise CommandError(
            "the server closed the connection without a reply: wrong user or password, or the target "
            "is unreachable (servers with server.reply_errors: true say which)"
        )
    if reply != wire.REPLY_SUCCESS:
        raise CommandError(f"the server refused: {_STATUS_TEXT.get(reply[1], f'status {reply[1]:#04x}')}")
    print(
        f"OK: {version}, ALPN {alpn}, handshake {handshake_ms:.1f} ms; "
        f"tunnel to {target} open after {total_ms:.1f} ms"
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def _add_password_flags(parser: argparse.ArgumentParser, salt: bool = True) -> None:
    parser.add_argument("-p", "--password", help="password (prompted for, or read from stdin, when left out)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    if salt:
        parser.add_argument("-s", "--salt", help="value for the salt column (random when left out)")
        parser.add_argument(
            "--legacy",
            action="store_true",
            help="store the original implementation's SHA-256 hash, for a database shared with original servers",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtopctl", description="Manage MTop users, database, links and certificates.")
    parser.add_argument(
        "-c", "--config", default=os.environ.get("MTOP_CONFIG", DEFAULT_CONFIG), help="path of mtop.yaml"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database management").add_subparsers(dest="db_command", required=True)
    db.add_parser("init", help="create the mtop_user table (with the policy columns)").set_defaults(func=cmd_db_init)
    db.add_parser(
        "upgrade", help="add the policy columns an existing (original) mtop_user lacks; idempotent, safe live"
    ).set_defaults(func=cmd_db_upgrade)

    user = sub.add_parser("user", help="user management").add_subparsers(dest="user_command", required=True)
    add = user.add_parser("add", help="add a user")
    add.add_argument("-u", "--username", required=True)
    _add_password_flags(add)
    add.set_defaults(func=cmd_user_add)
    passwd = user.add_parser("passwd", help="change a user's password")
    passwd.add_argument("-u", "--username", required=True)
    _add_password_flags(passwd)
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
    setter.add_argument("--max-conns", type=_count, default=_UNSET, metavar="N", help="concurrent tunnels per server, or none")
    setter.add_argument("--rate", type=_size, default=_UNSET, metavar="BYTES", help="bytes per second each way, all tunnels together (512K, 10M), or none")
    setter.add_argument("--quota", type=_size, default=_UNSET, metavar="BYTES", help="total traffic up plus down (10G), or none")
    setter.set_defaults(func=cmd_user_set)
    show = user.add_parser("show", help="show a user's policy and traffic")
    show.add_argument("-u", "--username", required=True)
    show.set_defaults(func=cmd_user_show)
    reset = user.add_parser("reset-usage", help="set a user's traffic counters to 0")
    reset.add_argument("-u", "--username", required=True)
    reset.set_defaults(func=cmd_user_reset_usage)

    url = sub.add_parser("url", help="print an mtop:// share link")
    url.add_argument("-u", "--username", required=True)
    _add_password_flags(url, salt=False)
    url.add_argument("-H", "--host", required=True, help="server host name or address")
    url.add_argument("-P", "--port", type=_port, default=443)
    url.add_argument("-t", "--type", choices=("tls", "quic"), default="tls")
    url.add_argument("-o", "--proto", default="mtop", help="ALPN protocol name")
    url.set_defaults(func=cmd_url)

    check = sub.add_parser("check", help="open one tunnel with an mtop:// link and report")
    check.add_argument("url", help="mtop://user:password@host:port/tls?proto=...")
    check.add_argument("--target", required=True, help="HOST:PORT the tunnel should reach")
    check.add_argument("--ca", help="CA certificate to trust (default: the system store)")
    check.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    check.set_defaults(func=cmd_check)

    cert = sub.add_parser("cert", help="certificates").add_subparsers(dest="cert_command", required=True)
    init = cert.add_parser("init", help="make a CA and an ECDSA P-256 server certificate")
    init.add_argument("--host", action="append", default=[], required=True, help="server name (repeatable)")
    init.add_argument("--ip", action="append", default=[], help="server IP address (repeatable)")
    init.add_argument("--dir", default=".", help="where to write the files (default: current directory)")
    init.add_argument("--force", action="store_true", help="replace an existing server certificate")
    init.add_argument(
        "--group", help="make the server key readable by this group (0640), e.g. mtop for the Debian package's server"
    )
    init.set_defaults(func=cmd_cert_init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CommandError, DatabaseError) as e:
        print(f"mtopctl: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a DB-API error from one of the drivers
        if type(e).__module__.split(".")[0] not in ("sqlite3", "psycopg2", "pymysql"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mtopctl: error: database: {redact(message)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
