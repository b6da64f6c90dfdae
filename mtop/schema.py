"""The ``mtop_user`` table, exactly as the original creates it, and the
synchronous database access ``mtopctl`` uses."""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS mtop_user (
    username VARCHAR(128) NOT NULL PRIMARY KEY,
    salt VARCHAR(32) NOT NULL,
    password VARCHAR(1024) NOT NULL DEFAULT '',
    created_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)
"""


class DatabaseError(Exception):
    """A database operation mtopctl could not do; the message is a sentence."""


def connect_sqlite(path: str, create: bool = False) -> sqlite3.Connection:
    if create:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
    mode = "rwc" if create else "rw"
    try:
        connection = sqlite3.connect(f"file:{quote(path)}?mode={mode}", uri=True, timeout=10.0)
    except sqlite3.Error as e:
        hint = "" if create else "; create it with 'mtopctl db init'"
        raise DatabaseError(f"cannot open SQLite database {path}: {e}{hint}") from None
    return connection
