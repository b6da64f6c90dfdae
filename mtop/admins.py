"""Admin accounts and API tokens (``mtop_admin``, ``mtop_admin_token``).

An admin has a name and a password stored as an scrypt hash (as users'
are); scripts use bearer tokens, made by ``mtopctl admin token``: 32
random bytes, URL-safe base64, shown once; the table keeps only their
SHA-256, so a copy of the database gives no working token.  Both live in
the user database, so one panel can manage a cluster through it.

`Admins` works over the blocking `mtop.database.SyncDatabase`, like
`mtop.users.UserAdmin`; its errors are `mtop.users.UserError`.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from mtop import passwords
from mtop.database import SyncDatabase
from mtop.users import UserError, check_password

#: Prefix of tokens, so a leaked one is recognisable in a scan.
TOKEN_PREFIX = "mtopadm_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_admin_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8", "surrogatepass")) <= 128 or not name.isprintable():
        raise UserError(f"admin name {name!r} must be 1 to 128 printable characters", "name")
    return name


class Admins:
    """The admin accounts and tokens of ``db``; each method is one
    transaction."""

    def __init__(self, db: SyncDatabase):
        self.db = db

    def add(self, name: str, password: str) -> None:
        check_admin_name(name)
        check_password(password)
        db = self.db
        try:
            self.db.run("INSERT INTO mtop_admin (name, password) VALUES (?, ?)", (name, passwords.scrypt_hash(password)))
        except db.IntegrityError:
            raise UserError(f"admin {name!r} already exists", "name", 409) from None

    def set_password(self, name: str, password: str) -> None:
        check_password(password)
        if self.db.run("UPDATE mtop_admin SET password = ? WHERE name = ?", (passwords.scrypt_hash(password), name)).rowcount == 0:
            raise UserError(f"no admin {name!r}", "name", 404)

    def delete(self, name: str) -> None:
        """Delete an admin and their tokens."""
        if self.db.run("DELETE FROM mtop_admin WHERE name = ?", (name,)).rowcount == 0:
            raise UserError(f"no admin {name!r}", "name", 404)
        self.db.run("DELETE FROM mtop_admin_token WHERE name = ?", (name,))

    def list(self) -> list[tuple[str, str, int]]:
        """(name, created, tokens) of every admin."""
        rows = self.db.run(
            "SELECT a.name, a.created_time, COUNT(t.token_hash) FROM mtop_admin a "
            "LEFT JOIN mtop_admin_token t ON t.name = a.name GROUP BY a.name, a.created_time ORDER BY a.name"
        ).fetchall()
        return [(name, str(created or "")[:19], int(count)) for name, created, count in rows]

    def check_password(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s (scrypt either way: an unknown
        name costs the same)."""
        row = self.db.run("SELECT password FROM mtop_admin WHERE name = ?", (name,)).fetchone()
        stored = row[0] if row else passwords.dummy_hash()
        return passwords.verify(stored, "", password) and row is not None

    def exists(self, name: str) -> bool:
        return self.db.run("SELECT 1 FROM mtop_admin WHERE name = ?", (name,)).fetchone() is not None

    def new_token(self, name: str, label: str = "") -> str:
        """A new bearer token for ``name`` (shown once: only its hash is kept)."""
        if self.db.run("SELECT 1 FROM mtop_admin WHERE name = ?", (name,)).fetchone() is None:
            raise UserError(f"no admin {name!r}", "name", 404)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.db.run("INSERT INTO mtop_admin_token (token_hash, name, label) VALUES (?, ?, ?)", (token_hash(token), name, label[:128]))
        return token

    def revoke_tokens(self, name: str) -> int:
        return self.db.run("DELETE FROM mtop_admin_token WHERE name = ?", (name,)).rowcount

    def token_admin(self, token: str) -> str | None:
        """The admin a bearer token belongs to, or ``None``."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        row = self.db.run(
            "SELECT t.name FROM mtop_admin_token t JOIN mtop_admin a ON a.name = t.name WHERE t.token_hash = ?",
            (token_hash(token),),
        ).fetchone()
        return row[0] if row else None
