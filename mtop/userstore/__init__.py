"""User stores: where ``mtop_user`` rows come from, and where the traffic
the server counts goes back to.

What the rest of the server asks of a store is written down as interfaces,
declared by each backend with ``@implementer`` and checked with
``zope.interface.verify.verifyObject`` in the tests:

`IUserStore` (required of every store)
    ``lookup(username)`` and ``lookup_many(usernames)``: the rows, each a
    `UserRecord`.  `mtop.auth.Authenticator` reads one row per login;
    `mtop.sessions.UserSessions` reads the rows of users with open tunnels.
`IUsageSink` (optional)
    ``add_usage``: add traffic (`Usage`) to the users' counters, exactly
    once per flush; ``usage_counting`` (`UsageCounting`) says whether the
    table can hold it, or that this is not known yet.
`IUserChangeFeed` (optional)
    ``watch(on_change)``: the store tells of changed rows as they change.
`IQuotaLeases` (optional)
    ``lease_quota`` and ``renew_leases``: quotas leased to servers in
    slices, so they hold across servers.

A store with a lifecycle (a connection pool) is also a Twisted service
(``IService``); `UserSessions` makes it its child, so the last traffic
flush runs before the store closes.  The sessions ask for the optional
pieces with ``IX.providedBy(store)``, never by probing for methods.

The backends: `mtop.userstore.sqlite`, `mtop.userstore.mysql` (both
`IUserStore` and `IUsageSink`) and `mtop.userstore.postgres` (those and
`IUserChangeFeed`, through ``LISTEN``/``NOTIFY``), on the SQL shared in
`mtop.userstore.sql`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


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


@dataclass(frozen=True)
class Usage:
    """Traffic of one user to add to the table: bytes each way and the last
    login (``"YYYY-MM-DD HH:MM:SS"`` UTC, or ``None``)."""

    up: int
    down: int
    last_seen: str | None = None
    #: Bytes of this server's quota lease it gives back unused (the user's
    #: last tunnel here ended); only with `IQuotaLeases`.
    release: int = 0


class UsageCounting(enum.Enum):
    """Whether an `IUsageSink` can write traffic now."""

    #: Not known yet (the table's columns have not been read): keep the
    #: traffic and ask again at the next flush.
    UNKNOWN = "unknown"
    #: The table has the counters: ``add_usage`` writes them.
    COUNTED = "counted"
    #: The table has no counters (an original table): traffic is dropped.
    NOT_COUNTED = "not counted"


#: What `IUserChangeFeed` callbacks receive when any user may have changed.
ALL_USERS = None


class StoreUnavailable(Exception):
    """The store could not answer (database down, table missing)."""


class IUserStore(Interface):
    """Where the users' rows are read: what every store provides.

    Both methods fail with `StoreUnavailable` when the store cannot answer;
    either may also raise it at once (a store that is not running)."""

    def lookup(username: str) -> Deferred[UserRecord | None]:
        """The row of ``username``, or ``None`` if there is none."""

    def lookup_many(usernames: Iterable[str]) -> Deferred[dict[str, UserRecord]]:
        """The rows of those of ``usernames`` that exist, by name (the
        others are absent from the dict)."""


class IUsageSink(Interface):
    """Where the traffic of tunnels is written back (an optional part of a
    store)."""

    usage_counting = Attribute(
        "A `UsageCounting`: whether `add_usage` writes traffic now, does not, or is not known yet. "
        "It may change while the store runs (columns added to a live table)."
    )

    def add_usage(server_id: str, seq: int, usage: dict[str, Usage]) -> Deferred[bool]:
        """Add ``usage`` (by username) to the users' counters, exactly once
        per ``(server_id, seq)``: fires ``True`` when written now, ``False``
        when an earlier attempt (whose answer was lost) had written it;
        fails with `StoreUnavailable` when the store cannot answer."""


class IQuotaLeases(Interface):
    """A store that leases users' quotas to servers in slices (an optional
    part of a store), so a quota holds across servers sharing it: a server
    spends only what it has leased, and a lease is never granted beyond the
    quota minus the counters minus every other live lease.  A flush
    (`IUsageSink.add_usage`) turns the leased bytes it counts into counted
    ones, in the same transaction."""

    leases_available = Attribute(
        "Whether the lease table exists (``mtopctl db upgrade`` creates it): ``None`` until known."
    )

    def lease_quota(server_id: str, username: str, want: int, ttl: float) -> Deferred[int | None]:
        """Lease up to ``want`` more bytes of ``username``'s quota to
        ``server_id`` for ``ttl`` seconds (its earlier lease is extended):
        fires with the bytes granted (0: the quota is used up), or ``None``
        if the user has no quota (or no row); fails with `StoreUnavailable`."""

    def renew_leases(server_id: str, ttl: float) -> Deferred[None]:
        """Extend every lease of ``server_id`` by ``ttl`` seconds from now."""


class IPresence(Interface):
    """A store where servers sharing it say which users they carry (an
    optional part of a store; the ``mtop_presence`` table), so a user's
    ``max_connections`` and ``rate_limit`` hold across servers."""

    presence_available = Attribute(
        "Whether the presence table exists (``mtopctl db upgrade`` creates it): ``None`` until known."
    )

    def publish_presence(
        server_id: str, carried: dict[str, tuple[int, bool]] | None, ttl: float
    ) -> Deferred[dict[str, list[tuple[str, int, bool]]]]:
        """Replace ``server_id``'s rows by ``carried`` (username: open
        tunnels, whether they moved bytes lately), live for ``ttl`` seconds
        (``None``: write nothing, only read, for a server without rows);
        fires with the other servers' live rows that have tunnels, by
        username: ``[(server_id, tunnels, active), ...]``; fails with
        `StoreUnavailable`."""


class IUserChangeFeed(Interface):
    """A store that tells of changed rows as they change (an optional part
    of a store; PostgreSQL's ``NOTIFY``)."""

    def watch(on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(username)`` when that user's row changes, and
        ``on_change(ALL_USERS)`` (``None``) when any row may have changed
        (changes may have been missed).  May be called before the store
        starts."""
