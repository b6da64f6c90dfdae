"""Database connection strings (``db.dsn``) for each driver.

* PostgreSQL: anything libpq takes, a URI (``postgres://user@host/db?...``,
  the original's form) or a keyword string (``host=... dbname=...``); it is
  passed to psycopg2 as it is, after a syntax check.
* MySQL / MariaDB: the original's Go driver form
  ``user:password@tcp(host:port)/dbname?param=value`` (also ``unix(/path)``)
  or a URL ``mysql://user:password@host:port/dbname?param=value``; both
  become PyMySQL ``connect()`` arguments.

Errors are `DSNError` sentences that never contain the password.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from mtop.redact import redact


class DSNError(ValueError):
    """A connection string that cannot be used.  The message never holds
    the password (it is masked here too, in case a caller quotes the DSN)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


_GO_DSN = re.compile(
    r"""^(?:(?P<userinfo>.*)@)?          # user[:password]@ (the last @)
        (?:(?P<net>[a-z0-9]+)(?:\((?P<addr>[^)]*)\))?)?
        /(?P<db>[^?]*)
        (?:\?(?P<params>.*))?$""",
    re.X | re.S,
)

#: Go driver parameters with a PyMySQL meaning; the rest (parseTime, loc,
#: ...) are about Go types and are ignored.
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def _seconds(name: str, text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise DSNError(f"MySQL DSN parameter {name}={text!r} is not a duration like 5s")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def _params(pairs: list[tuple[str, str]], kwargs: dict[str, Any]) -> None:
    for name, value in pairs:
        key = name.lower()
        if key == "charset":
            kwargs["charset"] = value.split(",")[0]
        elif key in ("timeout", "connect_timeout"):
            kwargs["connect_timeout"] = _seconds(name, value)
        elif key in ("readtimeout", "read_timeout"):
            kwargs["read_timeout"] = _seconds(name, value)
        elif key in ("writetimeout", "write_timeout"):
            kwargs["write_timeout"] = _seconds(name, value)
        elif key in ("tls", "ssl"):
            if value.lower() in ("true", "1", "required"):
                kwargs["ssl"] = {"check_hostname": True}
            elif value.lower() == "skip-verify":
                kwargs["ssl"] = {"check_hostname": False, "verify_mode": False}
            elif value.lower() not in ("false", "0", "preferred"):
                raise DSNError(f"MySQL DSN parameter {name}={value!r}: use true, false or skip-verify")


def parse_mysql_dsn(dsn: str) -> dict[str, Any]:
    """PyMySQL ``connect()`` keyword arguments for ``dsn``."""
    text = dsn.strip()
    kwargs: dict[str, Any] = {"charset": "utf8mb4"}
    if text.startswith(("mysql://", "mariadb://")):
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise DSNError(f"MySQL URL is not valid: {e}") from None
        kwargs["host"] = parts.hostname or "127.0.0.1"
        kwargs["port"] = port or 3306
        if parts.username:
            kwargs["user"] = unquote(parts.username)
        if parts.password is not None:
            kwargs["password"] = unquote(parts.password)
        database = unquote(parts.path.lstrip("/"))
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    else:
        match = _GO_DSN.match(text)
        if not match:
            raise DSNError(
                "MySQL DSN is neither 'user:password@tcp(host:port)/dbname' nor 'mysql://user:password@host:port/dbname'"
            )
        userinfo = match.group("userinfo")
        if userinfo is not None:
            user, sep, password = userinfo.partition(":")
            kwargs["user"] = user
            if sep:
                kwargs["password"] = password
        net = match.group("net") or "tcp"
        addr = match.group("addr") or ""
        if net == "unix":
            kwargs["unix_socket"] = addr or "/run/mysqld/mysqld.sock"
        elif net in ("tcp", "tcp6", "tcp4"):
            host, port = _hostport(addr or "127.0.0.1:3306")
            kwargs["host"], kwargs["port"] = host, port
        else:
            raise DSNError(f"MySQL DSN network {net!r} is not tcp or unix")
        database = match.group("db")
        pairs = parse_qsl(match.group("params") or "", keep_blank_values=True)
    if not database:
        raise DSNError("MySQL DSN names no database: add /dbname")
    kwargs["database"] = database
    _params(pairs, kwargs)
    return kwargs


def _hostport(addr: str) -> tuple[str, int]:
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            host, port = addr, ""
    # isascii: '²'.isdigit() is true but int('²') fails.
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= 0xFFFF):
        raise DSNError(f"MySQL DSN port {port!r} is not a number from 1 to 65535")
    return host or "127.0.0.1", int(port) if port else 3306


def check_postgres_dsn(dsn: str) -> str:
    """``dsn`` if libpq can parse it (no connection is made)."""
    try:
        from psycopg2.extensions import parse_dsn
    except ImportError:
        raise DSNError("PostgreSQL needs psycopg2: pip install 'mtop[postgres]'") from None
    try:
        parse_dsn(dsn)
    except Exception as e:  # psycopg2.ProgrammingError
        message = str(e).strip().splitlines()[0] if str(e).strip() else "cannot be parsed"
        raise DSNError(f"PostgreSQL DSN is not valid: {_mask_quoted_secrets(dsn, message)}") from None
    return dsn


# Up to the last @: a password may hold an unencoded '/', '?' or '#'.
_URI_USERINFO = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*://(.*)@", re.S)
_QUOTED = re.compile(r'"([^"]*)"')


def _mask_quoted_secrets(dsn: str, message: str) -> str:
    """libpq's message with the fragments it quotes from ``dsn`` masked when
    they overlap where a password may be: it says, e.g., ``invalid
    percent-encoded token: "p%zz"`` of a URI's password, or ``missing "="
    after "def"`` of ``password=abc def``.  The places: a URI's userinfo (up
    to its last @) and everything after a ``password`` keyword."""
    spans = []
    at = dsn.lower().find("password")
    if at >= 0:
        spans.append((at, len(dsn)))
    match = _URI_USERINFO.match(dsn)
    if match:
        spans.append(match.span(1))

    def overlaps(text: str) -> bool:
        found = False
        pos = dsn.find(text)
        while pos >= 0:
            found = True
            if any(pos < end and start < pos + len(text) for start, end in spans):
                return True
            pos = dsn.find(text, pos + 1)
        return not found and bool(spans)  # not quoted verbatim: cannot tell, so mask

    def mask(quoted: re.Match) -> str:
        text = quoted.group(1)
        return '"***"' if len(text) > 1 and overlaps(text) else quoted.group(0)

    return _QUOTED.sub(mask, message)


def describe_dsn(driver: str, dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    if driver == "mysql":
        try:
            kwargs = parse_mysql_dsn(dsn)
        except DSNError:
            return "(unparsable MySQL DSN)"
        where = kwargs.get("unix_socket") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"mysql {kwargs.get('user', '')}@{where}/{kwargs['database']}"
    if driver == "postgres":
        try:
            from psycopg2.extensions import parse_dsn

            parts = parse_dsn(dsn)
        except Exception:
            return "(unparsable PostgreSQL DSN)"
        host = parts.get("host", "localhost")
        port = parts.get("port", "5432")
        return f"postgres {parts.get('user', '')}@{host}:{port}/{parts.get('dbname', '')}"
    return dsn
