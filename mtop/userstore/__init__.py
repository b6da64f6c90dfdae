"""User stores: where ``mtop_user`` rows come from.

Every backend implements `UserStore`: ``lookup(username)`` returns a Deferred
firing with a `UserRecord` or ``None``.  Stores with a lifecycle (connection
pools) are Twisted services.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class UserRecord:
    """One ``mtop_user`` row, as far as authentication needs it."""

    username: str
    salt: str
    password: str

    def __repr__(self) -> str:
        return f"UserRecord(username={self.username!r}, salt=<hidden>, password=<hidden>)"


class UserStore(Protocol):
    def lookup(self, username: str) -> Deferred[UserRecord | None]:
        """The row for ``username``, or ``None`` if there is none."""


class StoreUnavailable(Exception):
    """The store could not answer (database down, table missing)."""
