"""Start-up checks of the files that hold secrets: a TLS private key, a
config file with a password in it, or a SQLite user database (password
hashes), that every user of the machine can read.

Each function returns warning sentences (naming the file, its mode and the
``chmod`` that fixes it), for the start-up notes of ``twistd mtop`` and
``twistd climber`` to log; nothing here refuses to start.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Iterable
from typing import Any

from mtop.redact import redact

#: Keys whose non-empty value is a password, whatever it looks like.
PASSWORD_KEYS = frozenset({"password"})
#: Keys whose value is a link or connection string that may hold one.
LINK_KEYS = frozenset({"dsn", "url", "urls"})


def readable_by_others(path: str) -> int | None:
    """The permission bits of ``path`` if users outside its owner and group
    may read it, else ``None`` (also when it cannot be examined)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & stat.S_IROTH else None


def _warning(path: str, mode: int, holds: str) -> str:
    return (
        f"{path} holds {holds} and is readable by every user of this machine (mode {mode:04o}); "
        f"run: chmod o-rwx {shlex.quote(path)}"
    )


def key_file_warnings(keys: Iterable[tuple[str, str]]) -> list[str]:
    """Warnings for the private keys ``(config key, path)`` others can read,
    each path once."""
    warnings = []
    seen = set()
    for key, path in keys:
        if not path or path in seen:
            continue
        seen.add(path)
        mode = readable_by_others(path)
        if mode is not None:
            warnings.append(_warning(path, mode, f"the TLS private key ({key})"))
    return warnings


def secrets_in(document: Any, key: str | None = None) -> list[str]:
    """The config keys (dotted) in a parsed YAML document whose values are or
    contain passwords: ``password`` keys with a value, and ``dsn``/``url``/
    ``urls`` values with a password in them."""
    found: list[str] = []
    if isinstance(document, dict):
        for name, value in document.items():
            name = str(name)
            found += secrets_in(value, f"{key}.{name}" if key else name)
    elif isinstance(document, list):
        for i, value in enumerate(document):
            found += secrets_in(value, f"{key}[{i}]")
    elif key is not None and document not in (None, "", False):
        last = key.rpartition(".")[2].partition("[")[0]
        if last in PASSWORD_KEYS:
            found.append(key)
        elif last in LINK_KEYS and isinstance(document, str) and redact(document) != document:
            found.append(key)
    return found


def config_file_warnings(path: str | None) -> list[str]:
    """A warning if the config file at ``path`` holds a password and others
    can read it."""
    if not path:
        return []
    mode = readable_by_others(path)
    if mode is None:
        return []
    from mtop.config import ConfigError, read_yaml

    try:
        keys = secrets_in(read_yaml(path))
    except ConfigError:
        return []
    if not keys:
        return []
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return [_warning(path, mode, f"passwords ({keys[0]}{more})")]


#: Files SQLite keeps beside a database, holding pages of it.
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def database_warnings(driver: str, path: str) -> list[str]:
    """Warnings for a SQLite user database at ``path`` (``driver`` as in
    ``db.driverName``) and its journal files, if others can read them: they
    hold the password hashes.  Other drivers keep the users elsewhere."""
    if driver != "sqlite" or not path:
        return []
    warnings = []
    for name in (path, *(path + suffix for suffix in SQLITE_SIDE_FILES)):
        mode = readable_by_others(name)
        if mode is not None:
            what = "the SQLite user database (db.dsn)" if name == path else f"a journal of the SQLite user database {path}"
            warnings.append(
                f"{name} is {what}, with the users' password hashes, and is readable by every user of this "
                f"machine (mode {mode:04o}); run: chmod 600 {shlex.quote(name)}"
            )
    return warnings


def startup_warnings(config: Any) -> list[str]:
    """Every warning for a loaded config: an ``mtop.config.Config`` (its TLS
    keys, its SQLite database and the file) or a
    ``climber.config.ClimberConfig`` (the file)."""
    keys: list[tuple[str, str]] = []
    listeners = getattr(config, "listeners", ())
    for i, listener in enumerate(listeners):
        keys.append((f"listeners[{i}].key" if len(listeners) > 1 else "server.key", listener.key))
    server = getattr(config, "server", None)
    if getattr(server, "key", ""):
        keys.append(("server.key", server.key))
    db = getattr(config, "db", None)
    return (
        key_file_warnings(keys)
        + (database_warnings(db.driverName, db.dsn) if db is not None else [])
        + config_file_warnings(getattr(config, "path", None))
    )
