"""Users' open tunnels: per-user policy while tunnels run, and traffic
accounting written back to the user table.

`UserSessions` is the service between the server protocol and the user
store.  It reads rows through `mtop.userstore.IUserStore` (every store), and
uses what else the store declares: traffic accounting if it is an
`mtop.userstore.IUsageSink`, change notifications if it is an
`mtop.userstore.IUserChangeFeed`, and the store becomes its child service if
it is an ``IService``.  What it does:

* **admission**: a tunnel whose login succeeded is admitted unless the
  user already has ``max_connections`` tunnels open here, or the traffic
  in the table plus what this server has not written yet reaches
  ``quota_bytes``;
* **rate limits and quotas while tunnels run**: all of a user's relays share
  one meter (`_UserMeter`), which applies the user's `mtop.ratelimit.UserRate`
  and counts the quota down chunk by chunk, closing the user's tunnels the
  moment it is used up (users with neither have no meter: no work per chunk);
* **live changes**: every ``recheck_interval`` seconds the rows of the users
  with open tunnels are read again (one query per 200 users); a user
  deleted, disabled, expired or over quota has every tunnel closed, and new
  limits apply to the open ones.  A change notification from the store
  (`IUserChangeFeed`: PostgreSQL's NOTIFY) triggers the same check at
  once, and drops the login cache;
* **accounting**: every ``flush_interval`` seconds the bytes each user moved
  since the last flush (read from the relays' counters: no work per chunk)
  are added to the table in one exactly-once transaction
  (`IUsageSink.add_usage`; the SQL in `mtop.userstore.sql.UsageFlush`).  A
  flush that fails is kept and retried as it was, while new traffic
  gathers for the next one: during a database outage nothing is lost, and
  nothing is counted twice.  While the store cannot say yet whether its
  table keeps counters (`UsageCounting.UNKNOWN`) the traffic is kept; a
  store whose table has none, or that is no usage sink, drops it.  The
  last flush runs when the service stops (before the store closes).

Quotas hold across servers sharing one database when the store leases
them (`mtop.userstore.IQuotaLeases`, the ``mtop_quota_lease`` table): a
server spends only what it has leased, a slice at a time (`_QuotaLease`),
and a grant never exceeds the quota minus the counters minus the other
servers' live leases.  Without the table each server counts on its own.

``max_connections`` and ``rate_limit`` hold across servers when the store
keeps presence (`mtop.userstore.IPresence`, the ``mtop_presence`` table):
every ``presence_interval`` each server publishes, for the users with either
limit that it carries, how many tunnels they have and whether those moved
bytes, and reads the others' rows back (one round trip a second, none per
tunnel).  A login is refused when the tunnels here plus those elsewhere
reach ``max_connections``; logins at the same moment on several servers
can pass together (the race lasts one interval), and the excess is closed
at the next publication, newest tunnels first, by the servers with the
highest ids (outcome ``user-limit``).  The rate limit is shared equally
among the servers where the user's tunnels are moving data.  Without the
table (or during an outage) each server applies both limits on its own.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from mtop.auth import Authenticator, utc_now
from mtop.logs import logger
from mtop.stats import Counters
from mtop.ratelimit import UserRate
from mtop.relay import Relay, Valve
from mtop.userstore import IPresence, IQuotaLeases, IUsageSink, IUserChangeFeed, IUserStore, Usage, UsageCounting, UserRecord


class Tunnel(Protocol):
    """What `UserSessions` needs of a tunnel (`mtop.server.TunnelProtocol`)."""

    relay: Relay | None

    def revoke(self, outcome: str, detail: str) -> None:
        """Close the tunnel now, logging ``outcome``."""


#: A server leases a user's quota a 64th at a time, within these bounds.
LEASE_SLICE_MIN = 256 << 10
LEASE_SLICE_MAX = 64 << 20
#: A lease not renewed (every recheck) lapses after this long at the least,
#: so what a crashed server had leased comes free again.
LEASE_TTL_MIN = 30.0
#: The last flush (at stop) is tried this many times, this far apart.
FINAL_FLUSH_TRIES = 3
FINAL_FLUSH_PAUSE = 0.5
#: A server's presence rows live this many publications (at least
#: `PRESENCE_TTL_MIN` seconds) unless published again.
PRESENCE_TTL_INTERVALS = 3
PRESENCE_TTL_MIN = 3.0


class _QuotaLease:
    """This server's share of one user's quota, leased from the store
    (`mtop.userstore.IQuotaLeases`) a slice at a time: the bytes the user's
    tunnels here may still move.  A new slice is asked for when less than
    half of one is left; when none is left, the valve that overspent is
    paused until a grant comes; a grant of nothing means the quota is used
    up on all servers together, and the tunnels close (``over-quota``).

    If the store cannot lease (an outage), the server goes on by its own
    count, as without leases, a slice at a time."""

    def __init__(self, sessions: "UserSessions", user: "_User"):
        self.sessions = sessions
        self.user = user
        self.allowance = 0
        self.asking = False
        self.closed = False
        self.paused: set[Valve] = set()

    def slice(self) -> int:
        quota = self.user.record.quota_bytes or 0
        return min(max(quota // 64, LEASE_SLICE_MIN), LEASE_SLICE_MAX)

    def spend(self, valve: Valve, size: int) -> None:
        self.allowance -= size
        if self.allowance < self.slice() // 2:
            self.ask()
        if self.allowance <= 0 and not self.closed and valve not in self.paused:
            valve.pause("quota")
            self.paused.add(valve)

    def hold(self, valve: Valve) -> None:
        """Pause ``valve`` until the next grant."""
        if valve not in self.paused and not self.closed:
            valve.pause("quota")
            self.paused.add(valve)
        self.ask()

    def forget(self, valve: Valve) -> None:
        self.paused.discard(valve)

    def ask(self) -> None:
        if self.asking or self.closed:
            return
        self.asking = True
        sessions = self.sessions
        d = maybeDeferred(sessions.store.lease_quota, sessions.server_id, self.user.name, self.slice(), sessions.lease_ttl)
        d.addTimeout(sessions.authenticator.query_timeout, sessions.clock)
        d.addCallbacks(self._granted, self._failed)

    def _granted(self, granted: int | None) -> None:
        self.asking = False
        if self.closed:
            # Asked before the last tunnel here ended: given back.
            if granted:
                self.sessions._pending(self.user.name).release += granted
            return
        if granted is None:
            granted = self.slice()  # no quota (any more): the recheck will see
        self.allowance += granted
        if self.allowance > 0:
            self._resume()
            if self.allowance < self.slice() // 2:
                self.ask()
        elif granted == 0:
            self.sessions._revoke(
                self.user, "over-quota", f"the user's traffic reached the quota of {self.user.record.quota_bytes} bytes"
            )

    def _failed(self, failure: Failure) -> None:
        self.asking = False
        if self.closed:
            return
        self.sessions.counters.inc("db.errors")
        sessions, user = self.sessions, self.user
        record = user.record
        left = (record.quota_bytes or 0) - record.bytes_up - record.bytes_down - sessions._unflushed(user)
        sessions._log.debug(
            "users: cannot lease quota of {user} ({error}); counting on this server alone", user=user.name,
            error=failure.getErrorMessage(),
        )
        # On credit, as without leases: what this server's own count leaves.
        self._granted(max(0, min(self.slice(), left - max(self.allowance, 0))))

    def _resume(self) -> None:
        paused, self.paused = self.paused, set()
        for valve in paused:
            valve.resume("quota")

    def close(self) -> None:
        """The user's last tunnel here ended (or the quota went): what is
        left of the lease goes back with the next flush."""
        if self.closed:
            return
        self.closed = True
        self._resume()
        if self.allowance > 0:
            self.sessions._pending(self.user.name).release += self.allowance
        self.allowance = 0


class _UserMeter:
    """The `mtop.relay.Meter` of one user's relays: the rate limit (if any)
    and the quota (if any): a lease (`_QuotaLease`), or the bytes left of
    it by this server's count; ``exhausted`` is called once when those run
    out."""

    def __init__(self, rate: UserRate | None, left: int | None, exhausted: Any, lease: _QuotaLease | None = None):
        self.rate = rate
        self.left = left
        self.exhausted = exhausted
        self.lease = lease

    def spent_up(self, relay: Relay, size: int) -> None:
        if self.rate is not None:
            self.rate.spent_up(relay, size)
        if self.lease is not None:
            self.lease.spend(relay.client_valve, size)
        elif self.left is not None:
            self._spend(size)

    def spent_down(self, relay: Relay, size: int) -> None:
        if self.rate is not None:
            self.rate.spent_down(relay, size)
        if self.lease is not None:
            self.lease.spend(relay.target_valve, size)
        elif self.left is not None:
            self._spend(size)

    def _spend(self, size: int) -> None:
        was = self.left
        self.left -= size
        if self.left <= 0 < was:
            self.exhausted()


@dataclass
class _User:
    name: str
    record: UserRecord
    #: Open tunnels and the bytes (up, down) of each already counted.
    tunnels: dict[Any, list[int]] = field(default_factory=dict)
    rate: UserRate | None = None
    meter: _UserMeter | None = None
    lease: _QuotaLease | None = None
    #: Bytes its relays here had moved at the last publication (presence).
    moved: int = 0


@dataclass
class _Pending:
    """Traffic counted but not yet in a flush (and lease bytes given back)."""

    up: int = 0
    down: int = 0
    last_seen: str | None = None
    release: int = 0


def _active(rows: list[tuple[str, int, bool]] | None) -> int:
    return sum(1 for _, _, active in rows or () if active)


def _revocation(record: UserRecord | None, unflushed: int, now: Any) -> tuple[str, str] | None:
    """(outcome, detail) if the user's tunnels must close."""
    if record is None:
        return "user-deleted", "the user was deleted"
    if not record.enabled:
        return "user-disabled", "the user was disabled"
    if record.expires_at is not None and record.expires_at <= now:
        return "user-expired", f"the user expired at {record.expires_at:%Y-%m-%d %H:%M:%S} UTC"
    if record.quota_bytes is not None and record.bytes_up + record.bytes_down + unflushed >= record.quota_bytes:
        return "over-quota", f"the user's traffic reached the quota of {record.quota_bytes} bytes"
    return None


class UserSessions(MultiService):
    """Open tunnels by user (see the module docstring).  A store that is a
    service is its child, so the last flush happens before the store
    closes."""

    _log = logger()

    def __init__(
        self,
        store: IUserStore,
        authenticator: Authenticator,
        clock: Any,
        recheck_interval: float = 5.0,
        flush_interval: float = 5.0,
        flush_timeout: float = 10.0,
        server_id: str | None = None,
        counters: Counters | None = None,
        presence_interval: float = 1.0,
    ):
        super().__init__()
        self.store = store
        #: Where traffic is written, if the store is a usage sink.
        self.usage_sink: IUsageSink | None = store if IUsageSink.providedBy(store) else None
        #: Where quotas are leased, if the store can (`IQuotaLeases`).
        self.quota_leases: IQuotaLeases | None = store if IQuotaLeases.providedBy(store) else None
        #: How long a lease lives unless renewed (every recheck).
        self.lease_ttl = max(LEASE_TTL_MIN, 6 * recheck_interval)
        #: Where presence is published, if the store keeps it (`IPresence`).
        self.presence: IPresence | None = store if IPresence.providedBy(store) else None
        self.presence_interval = presence_interval
        self.presence_ttl = max(PRESENCE_TTL_MIN, PRESENCE_TTL_INTERVALS * presence_interval)
        #: The other servers' live presence rows, by username: ``[(server_id,
        #: tunnels, active), ...]`` (as of the last publication).
        self.elsewhere: dict[str, list[tuple[str, int, bool]]] = {}
        self._published = False
        self._publishing = False
        self.authenticator = authenticator
        #: Where database errors are counted (the tap shares the server's).
        self.counters = counters if counters is not None else Counters()
        self.clock = clock
        self.recheck_interval = recheck_interval
        self.flush_interval = flush_interval
        self.flush_timeout = flush_timeout
        self.server_id = server_id or uuid.uuid4().hex
        self.users: dict[str, _User] = {}
        self.pending: dict[str, _Pending] = {}
        self._batch: dict[str, Usage] | None = None
        self._seq = 0
        self._flushing: Deferred | None = None
        self._flush_failed = False
        self._stopping = False
        self._loops: list[LoopingCall] = []
        self._recheck_soon: set[str] | None = None
        if IService.providedBy(store):
            store.setServiceParent(self)
        if IUserChangeFeed.providedBy(store):
            store.watch(self.user_changed)

    # Service

    def startService(self) -> None:
        super().startService()
        work = [(self.recheck_interval, self.recheck), (self.flush_interval, self.flush)]
        if self.presence is not None and self.presence_interval > 0:
            work.append((self.presence_interval, self.publish_presence))
        for interval, step in work:
            loop = LoopingCall(step)
            loop.clock = self.clock
            loop.start(interval, now=False).addErrback(self._log_loop_failure)
            self._loops.append(loop)

    def _log_loop_failure(self, failure: Failure) -> None:
        self._log.failure("users: periodic work stopped", failure)

    def stopService(self) -> Deferred:
        self._stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._published and self.presence is not None:
            # This server's rows go now, not when they lapse.
            gone = maybeDeferred(self.presence.publish_presence, self.server_id, {}, self.presence_ttl)
            gone.addErrback(lambda _: None)
        d = self._last_flush(FINAL_FLUSH_TRIES)
        d.addErrback(self._last_flush_failed)
        d.addBoth(lambda _: MultiService.stopService(self))
        return d

    def _last_flush(self, tries: int) -> Deferred:
        """The last flush, tried again (the same batch, so exactly once)
        after a transient failure such as a deadlock victim's."""
        d = self.flush()
        d.addTimeout(self.flush_timeout, self.clock)

        def again(failure: Failure) -> Any:
            if tries <= 1 or failure.check(TimeoutError):
                return failure
            self._log.info("users: the last traffic flush failed ({error}); trying again", error=failure.getErrorMessage())
            return deferLater(self.clock, FINAL_FLUSH_PAUSE, lambda: None).addCallback(lambda _: self._last_flush(tries - 1))

        return d.addErrback(again)

    def _last_flush_failed(self, failure: Failure) -> None:
        lost = {name: (u.up, u.down) for name, u in (self._batch or {}).items()}
        for name, p in self.pending.items():
            up, down = lost.get(name, (0, 0))
            lost[name] = (up + p.up, down + p.down)
        self._log.error(
            "users: the last traffic flush failed ({error}); not written (user: up, down): {lost}",
            error=failure.getErrorMessage(),
            lost=", ".join(f"{name}: {up}, {down}" for name, (up, down) in sorted(lost.items())),
        )

    # Tunnels

    def admit(self, tunnel: Any, username: str, record: UserRecord) -> str | None:
        """Register ``tunnel`` of ``username`` (logged in with ``record``),
        or say why it is refused."""
        user = self.users.get(username)
        if user is None:
            user = self.users[username] = _User(username, record)
        elif not user.tunnels:
            user.record = record
        record = user.record
        if record.max_connections is not None and len(user.tunnels) + self._tunnels_elsewhere(username) >= record.max_connections:
            self._forget_if_idle(user)
            return f"too many tunnels (max_connections {record.max_connections})"
        refusal = _revocation(record, self._unflushed(user), utc_now(self.clock))
        if refusal is not None:
            self._forget_if_idle(user)
            return refusal[1]
        user.tunnels[tunnel] = [0, 0]
        self._pending(username).last_seen = f"{utc_now(self.clock):%Y-%m-%d %H:%M:%S}"
        if self._leasing(user) and user.lease is None:
            # Asked now, so the first slice is likely there before the
            # target answers.
            user.lease = _QuotaLease(self, user)
            user.lease.ask()
        return None

    def _leasing(self, user: _User) -> bool:
        """Whether ``user``'s quota is leased from the store (it has one,
        and the store has the lease table)."""
        leases = self.quota_leases
        return user.record.quota_bytes is not None and leases is not None and leases.leases_available is True

    def relay_started(self, tunnel: Any, username: str) -> None:
        """``tunnel``'s relay is running: apply the user's rate limit and
        quota to it."""
        user = self.users.get(username)
        if user is None or tunnel not in user.tunnels:
            return
        if user.meter is None:
            self._apply_policy(user)
        tunnel.relay.meter = user.meter
        if user.lease is not None and user.lease.allowance <= 0:
            # Nothing leased yet (or nothing left): not one byte before a
            # grant (a user cut at the quota who logs in again would
            # otherwise move a read's worth per login).
            user.lease.hold(tunnel.relay.client_valve)
            user.lease.hold(tunnel.relay.target_valve)

    def release(self, tunnel: Any, username: str) -> None:
        """``tunnel`` has ended; its last bytes are counted."""
        user = self.users.get(username)
        if user is None or tunnel not in user.tunnels:
            return
        self._count(username, tunnel, user.tunnels.pop(tunnel))
        if user.rate is not None and tunnel.relay is not None:
            user.rate.forget(tunnel.relay)
        if user.lease is not None and tunnel.relay is not None:
            user.lease.forget(tunnel.relay.client_valve)
            user.lease.forget(tunnel.relay.target_valve)
        self._forget_if_idle(user)

    def tunnel_count(self, username: str) -> int:
        user = self.users.get(username)
        return len(user.tunnels) if user is not None else 0

    def _forget_if_idle(self, user: _User) -> None:
        if not user.tunnels:
            if user.rate is not None:
                user.rate.stop()
            if user.lease is not None:
                user.lease.close()
                user.lease = None
            self.users.pop(user.name, None)

    def _apply_policy(self, user: _User) -> None:
        """Set up the meter of ``user``'s relays from its row: rate limit
        (this server's share of it), and what is left of the quota (table
        plus what is not written yet)."""
        rate = user.record.rate_limit
        if rate is not None and rate > 0:
            rate = max(1, rate // (1 + self._active_elsewhere(user.name)))
            if user.rate is None:
                user.rate = UserRate(self.clock, rate)
            else:
                user.rate.set_rate(rate)
        elif user.rate is not None:
            user.rate.stop()
            user.rate = None
        quota = user.record.quota_bytes
        left = None
        if self._leasing(user):
            if user.lease is None:
                user.lease = _QuotaLease(self, user)
                user.lease.ask()
        else:
            if user.lease is not None:
                user.lease.close()
                user.lease = None
            if quota is not None:
                left = quota - user.record.bytes_up - user.record.bytes_down - self._unflushed(user)
        if user.rate is None and left is None and user.lease is None:
            user.meter = None
        elif user.meter is None:
            user.meter = _UserMeter(user.rate, left, lambda: self.clock.callLater(0, self._quota_used_up, user.name), user.lease)
        else:
            user.meter.rate, user.meter.left, user.meter.lease = user.rate, left, user.lease
        for tunnel in user.tunnels:
            if tunnel.relay is not None:
                tunnel.relay.meter = user.meter

    def _quota_used_up(self, username: str) -> None:
        user = self.users.get(username)
        if user is not None and user.meter is not None and user.meter.left is not None and user.meter.left <= 0:
            self._revoke(user, "over-quota", f"the user's traffic reached the quota of {user.record.quota_bytes} bytes")

    def _revoke(self, user: _User, outcome: str, detail: str) -> None:
        self.authenticator.forget(user.name)
        self._log.info("user {user}: closing {count} tunnel(s): {detail}", user=user.name, count=len(user.tunnels), detail=detail)
        for tunnel in list(user.tunnels):
            tunnel.revoke(outcome, detail)

    # Presence

    def _tunnels_elsewhere(self, username: str) -> int:
        return sum(tunnels for _, tunnels, _ in self.elsewhere.get(username, ()))

    def _active_elsewhere(self, username: str) -> int:
        return sum(1 for _, _, active in self.elsewhere.get(username, ()) if active)

    def publish_presence(self) -> Deferred:
        """Tell the store which users with ``max_connections`` or
        ``rate_limit`` this server carries, read where else they are, and
        apply that (see the module docstring)."""
        store = self.presence
        if store is None or store.presence_available is not True or self._publishing:
            return succeed(None)
        carried: dict[str, tuple[int, bool]] = {}
        for user in self.users.values():
            record = user.record
            if record.max_connections is None and not record.rate_limit:
                continue
            moved = sum(t.relay.bytes_up + t.relay.bytes_down for t in user.tunnels if t.relay is not None)
            # Active: moved bytes since the last publication, or waits for
            # its rate limit (a slow rate pauses for longer than that).
            waiting = user.rate is not None and bool(user.rate.up.paused or user.rate.down.paused)
            carried[user.name] = (len(user.tunnels), moved != user.moved or waiting)
            user.moved = moved
        self._publishing = True
        # A server with no rows and nobody to publish only reads (no write
        # a second to an idle database).
        publish = carried if carried or self._published else None
        d = maybeDeferred(store.publish_presence, self.server_id, publish, self.presence_ttl)
        d.addTimeout(self.authenticator.query_timeout, self.clock)
        d.addCallbacks(self._presence_read, self._presence_failed, callbackArgs=(carried,))
        d.addBoth(self._presence_done)
        return d

    def _presence_done(self, result: Any) -> None:
        self._publishing = False

    def _presence_read(self, elsewhere: dict[str, list[tuple[str, int, bool]]], carried: dict[str, tuple[int, bool]]) -> None:
        self._published = bool(carried)
        before, self.elsewhere = self.elsewhere, elsewhere
        if self._stopping:
            return
        for name in carried:
            user = self.users.get(name)
            if user is None:
                continue
            if user.record.rate_limit and self._active_elsewhere(name) != _active(before.get(name)):
                if user.meter is not None or user.rate is not None:
                    self._apply_policy(user)
            self._close_excess(user)

    def _close_excess(self, user: _User) -> None:
        """Close what ``user`` holds here beyond its share of
        ``max_connections``: the excess over all servers falls on the
        servers with the highest ids first, and here on the newest tunnels."""
        limit = user.record.max_connections
        if limit is None:
            return
        servers = [(self.server_id, len(user.tunnels))] + [(sid, n) for sid, n, _ in self.elsewhere.get(user.name, ())]
        excess = sum(n for _, n in servers) - limit
        for server_id, tunnels in sorted(servers, reverse=True):
            if excess <= 0:
                return
            if server_id == self.server_id:
                break
            excess -= tunnels
        if excess <= 0:
            return
        newest = list(user.tunnels)[-excess:]
        detail = f"too many tunnels across servers (max_connections {limit})"
        self._log.info("user {user}: closing {count} tunnel(s): {detail}", user=user.name, count=len(newest), detail=detail)
        for tunnel in newest:
            tunnel.revoke("user-limit", detail)

    def _presence_failed(self, failure: Failure) -> None:
        # Each server on its own until the store answers again.
        self.elsewhere = {}
        self.counters.inc("db.errors")
        self._log.debug("users: cannot publish presence: {error}", error=failure.getErrorMessage())
        for user in self.users.values():
            if user.record.rate_limit and user.rate is not None:
                self._apply_policy(user)

    # Counting

    def _pending(self, username: str) -> _Pending:
        pending = self.pending.get(username)
        if pending is None:
            pending = self.pending[username] = _Pending()
        return pending

    def _count(self, username: str, tunnel: Any, counted: list[int]) -> None:
        relay = tunnel.relay
        if relay is None:
            return
        up, down = relay.bytes_up - counted[0], relay.bytes_down - counted[1]
        if up or down:
            pending = self._pending(username)
            pending.up += up
            pending.down += down
            counted[0], counted[1] = relay.bytes_up, relay.bytes_down

    def _collect(self) -> None:
        for user in self.users.values():
            for tunnel, counted in user.tunnels.items():
                self._count(user.name, tunnel, counted)

    def _unflushed(self, user: _User) -> int:
        """Bytes of ``user`` this server has not written to the table."""
        total = 0
        pending = self.pending.get(user.name)
        if pending is not None:
            total += pending.up + pending.down
        if self._batch is not None and user.name in self._batch:
            total += self._batch[user.name].up + self._batch[user.name].down
        return total + self._uncounted(user)

    @staticmethod
    def _uncounted(user: _User) -> int:
        """Bytes ``user``'s relays moved since they were last counted."""
        total = 0
        for tunnel, (up, down) in user.tunnels.items():
            if tunnel.relay is not None:
                total += tunnel.relay.bytes_up - up + tunnel.relay.bytes_down - down
        return total

    def unflushed_total(self) -> int:
        """Bytes of every user this server has not written to the table
        (what a crash now would leave uncounted)."""
        total = sum(p.up + p.down for p in self.pending.values())
        if self._batch is not None:
            total += sum(u.up + u.down for u in self._batch.values())
        return total + sum(self._uncounted(user) for user in self.users.values())

    # Live changes

    def user_changed(self, username: str | None) -> None:
        """The store says ``username``'s row changed (``None``: maybe any
        row): drop cached logins and check the open tunnels now."""
        self.authenticator.forget(username)
        names = set(self.users) if username is None else ({username} & set(self.users))
        if not names:
            return
        if self._recheck_soon is None:
            self._recheck_soon = set()
            self.clock.callLater(0, self._recheck_now)
        self._recheck_soon |= names

    def _recheck_now(self) -> None:
        names, self._recheck_soon = self._recheck_soon or set(), None
        self.recheck(names)

    def recheck(self, names: Iterable[str] | None = None) -> Deferred:
        """Read the rows of users with open tunnels (or of ``names``) and
        apply them."""
        if names is None:
            self._renew_leases()
        names = list(self.users) if names is None else [n for n in names if n in self.users]
        if not names:
            return succeed(None)
        d = maybeDeferred(self.store.lookup_many, names)
        d.addTimeout(self.authenticator.query_timeout, self.clock)
        d.addCallbacks(self._apply_rows, self._recheck_failed, callbackArgs=(names,))
        return d

    def _renew_leases(self) -> None:
        """Keep this server's quota leases alive while it has any."""
        if self.quota_leases is None or not any(user.lease is not None for user in self.users.values()):
            return
        d = maybeDeferred(self.quota_leases.renew_leases, self.server_id, self.lease_ttl)
        d.addTimeout(self.authenticator.query_timeout, self.clock)
        d.addErrback(self._recheck_failed)

    def _recheck_failed(self, failure: Failure) -> None:
        # Open tunnels stay open while the store is away.
        self.counters.inc("db.errors")
        self._log.debug("users: cannot recheck open tunnels: {error}", error=failure.getErrorMessage())

    def _apply_rows(self, rows: dict[str, UserRecord], names: list[str]) -> None:
        now = utc_now(self.clock)
        for name in names:
            user = self.users.get(name)
            if user is None:
                continue
            record = rows.get(name)
            revocation = _revocation(record, self._unflushed(user), now)
            if revocation is not None:
                self._revoke(user, *revocation)
                continue
            user.record = record
            self._apply_policy(user)

    # Accounting

    def flush(self) -> Deferred:
        """Write the traffic counted so far (see the module docstring)."""
        if self._flushing is not None:
            return self._flushing
        sink = self.usage_sink
        counting = UsageCounting.NOT_COUNTED if sink is None else sink.usage_counting
        if counting is UsageCounting.UNKNOWN:
            return succeed(None)  # keep what is pending until the store knows
        if sink is None or counting is UsageCounting.NOT_COUNTED:
            self.pending.clear()
            return succeed(None)
        self._collect()
        if self._batch is None:
            if not self.pending:
                return succeed(None)
            self._batch = {name: Usage(p.up, p.down, p.last_seen, p.release) for name, p in self.pending.items()}
            self.pending = {}
            self._seq += 1
        batch, seq = self._batch, self._seq
        d = maybeDeferred(sink.add_usage, self.server_id, seq, batch)
        d.addTimeout(self.flush_timeout, self.clock)
        d.addCallbacks(self._flushed, self._flush_error, callbackArgs=(batch,))
        self._flushing = d
        d.addBoth(self._flush_done)
        return d

    def _flush_done(self, result: Any) -> Any:
        self._flushing = None
        return result

    def _flushed(self, applied: bool, batch: dict[str, Usage]) -> None:
        self._batch = None
        # The rows now hold this traffic: so do the copies kept here.
        for name, usage in batch.items():
            user = self.users.get(name)
            if user is not None:
                user.record = dataclasses.replace(
                    user.record, bytes_up=user.record.bytes_up + usage.up, bytes_down=user.record.bytes_down + usage.down
                )
        if self._flush_failed:
            self._flush_failed = False
            self._log.info("users: traffic written again ({count} users)", count=len(batch))
        self._log.debug(
            "users: traffic of {count} users written{again}", count=len(batch), again="" if applied else " (already)"
        )

    def _flush_error(self, failure: Failure) -> Failure | None:
        self.counters.inc("db.errors")
        if not self._flush_failed:
            self._flush_failed = True
            self._log.warn(
                "users: cannot write traffic ({error}); kept in memory and retried every {interval:g}s",
                error=failure.getErrorMessage(),
                interval=self.flush_interval,
            )
        return failure if self._stopping else None
