"""User stores: where ``mtop_user`` rows come from.

Every backend implements `UserStore`: ``lookup(username)`` returns a Deferred
firing with a `UserRecord` or ``None``.  Stores with a lifecycle (connection
pools) are Twisted services.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class UserRecord:
    """One ``mtop_user`` row.  The policy fields are ``None`` (no limit) when
    the column is missing (an original table) or NULL."""

    username: str
    salt: str
    password: str
    enabled: bool = True
    expires_at: datetime | None = None
    max_connections: int | None = None
    rate_limit: int | None = None
    quota_bytes: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0

    def refusal(self, now: datetime) -> str | None:
        """Why the policy refuses this user at ``now`` (naive UTC), or
        ``None``."""
        if not self.enabled:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.quota_bytes is not None and self.bytes_up + self.bytes_down >= self.quota_bytes:
            return "over quota"
        return None

    def __repr__(self) -> str:
        return f"UserRecord(username={self.username!r}, salt=<hidden>, password=<hidden>)"


class UserStore(Protocol):
    def lookup(self, username: str) -> Deferred[UserRecord | None]:
        """The row for ``username``, or ``None`` if there is none."""


class StoreUnavailable(Exception):
    """The store could not answer (database down, table missing)."""
