"""Connection limits and failed-login throttling, per server process.

`ConnectionLimits` counts open connections (TLS connections, QUIC streams
and QUIC connections), those still before their login (the TLS handshake,
the auth message and its verdict: the part an unauthenticated peer can make
us spend on), and connections per client address.  A connection over a
limit is refused before anything is spent on it: no TLS handshake, no
database query.  The pre-login pool is shared fairly between addresses: a
per-address budget, and, when the pool is full, a newcomer takes the
oldest slot of the address holding the most.

`LoginGate` lets only a few logins per address be in flight at once, so a
burst of wrong passwords sent in parallel is decided a few at a time and the
ban stops it after about ``max_failures`` lookups.

`AuthThrottle` counts failed logins per client address (IPv6 by /64, the
block one host usually has) in a sliding window; past the allowed number
the address is banned for a while, and its connections are closed at once,
without touching the user store.

All are per process (see ``server.workers``); none keeps more than
`MAX_TRACKED` addresses, so a flood of addresses cannot exhaust memory.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

from mtop.stats import Counters

#: Addresses whose failures the throttle remembers at most.
MAX_TRACKED = 100_000


@functools.lru_cache(maxsize=4096)
def client_key(host: str) -> str:
    """The unit limits and bans apply to: the IPv4 address, or the /64 of
    an IPv6 address (an IPv4-mapped IPv6 address counts as IPv4).  Cached:
    it is asked for every connection, and clients come back."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def peer_host(address: Any) -> str:
    """The host of a Twisted address (``IPv4Address``, ``IPv6Address``),
    or its text for anything else (UNIX sockets)."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


@dataclass(frozen=True)
class LimitSettings:
    """0 means no limit."""

    max_tunnels: int = 0
    #: Connections before their login (TLS handshake, auth message, the
    #: verdict), all clients together.
    max_handshakes: int = 0
    #: Open connections per client address (tunnels and QUIC connections).
    max_per_client: int = 0
    #: Connections before their login per client address.
    max_handshakes_per_client: int = 0


#: File descriptors kept free of tunnels (logs, database, listeners).
RESERVED_FILES = 64


def limit_settings(limits: Any) -> LimitSettings:
    """The settings of a ``limits:`` section (`mtop.config.LimitsConfig`),
    with ``max_tunnels`` left out derived from the open files limit (a
    tunnel holds two descriptors), so the process refuses cleanly instead
    of failing in accept()."""
    import resource

    max_tunnels = limits.max_tunnels
    if max_tunnels is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        max_tunnels = 0 if soft == resource.RLIM_INFINITY else max(16, (soft - RESERVED_FILES) // 2)
    return LimitSettings(max_tunnels, limits.max_handshakes, limits.max_per_client, limits.max_handshakes_per_client)


class Holder(Protocol):
    """What `ConnectionLimits` keeps a slot for: a TLS connection, a QUIC
    stream or a QUIC connection."""

    client_key: str

    def evict(self) -> None:
        """Close now: the slot was given to a connection from an address
        that holds fewer (the holder logs its own outcome)."""


class ConnectionLimits:
    """Open connections, and those before their login, per process.

    A connection is judged as it arrives (`refusal`), before any TLS or QUIC
    work is spent on it, then holds its slots from `opened` to `closed`; it
    leaves the pre-login pool at `logged_in`.  The pre-login pool is shared
    fairly: each address may hold at most ``max_handshakes_per_client`` of
    it, and when the whole pool is full a newcomer from an address holding
    fewer than the busiest one takes the oldest slot of the busiest address
    (which is evicted), so neither one address nor a few can lock the
    others out."""

    def __init__(self, settings: LimitSettings = LimitSettings(), counters: Counters | None = None):
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.open = 0
        self.per_client: dict[str, int] = {}
        #: Holders before their login, per address, oldest first.
        self._pre_login: dict[str, dict[Holder, None]] = {}
        self.handshaking = 0

    def pre_login(self, key: str) -> int:
        """Connections from ``key`` before their login."""
        held = self._pre_login.get(key)
        return len(held) if held else 0

    def refusal(self, key: str, pre_login: bool = True) -> str | None:
        """Why a new connection from ``key`` is refused now, or ``None``;
        ``pre_login`` False: a tunnel that takes no pre-login slot (a stream
        of a QUIC connection, which holds one itself until its first login),
        held to the tunnel limits only."""
        s = self.settings
        if s.max_tunnels and self.open >= s.max_tunnels:
            return "max-tunnels"
        if s.max_per_client and self.per_client.get(key, 0) >= s.max_per_client:
            return "max-per-client"
        if not pre_login:
            return None
        held = self.pre_login(key)
        if s.max_handshakes_per_client and held >= s.max_handshakes_per_client:
            return "max-handshakes-per-client"
        if s.max_handshakes and self.handshaking >= s.max_handshakes and self._busiest(held) is None:
            return "max-handshakes"
        return None

    def _busiest(self, held: int) -> str | None:
        """The address holding the most pre-login slots, if it holds more
        than ``held`` + 1 (so an eviction makes the shares more equal)."""
        best, most = None, held + 1
        for key, holders in self._pre_login.items():
            if len(holders) > most:
                best, most = key, len(holders)
        return best

    def opened(self, holder: Holder, pre_login: bool = True) -> None:
        """``holder`` starts, before its login; if the pre-login pool is
        full, the oldest holder of the busiest address makes room
        (``pre_login`` False: it takes no pre-login slot)."""
        key = holder.client_key
        if not pre_login:
            self.open += 1
            self.per_client[key] = self.per_client.get(key, 0) + 1
            return
        s = self.settings
        if s.max_handshakes and self.handshaking >= s.max_handshakes:
            busiest = self._busiest(self.pre_login(key))
            if busiest is not None:
                victim = next(iter(self._pre_login[busiest]))
                self._leave_pre_login(victim)
                self.counters.inc("evicted")
                victim.evict()
        self.open += 1
        self.per_client[key] = self.per_client.get(key, 0) + 1
        self._pre_login.setdefault(key, {})[holder] = None
        self.handshaking += 1

    def logged_in(self, holder: Holder) -> None:
        """``holder`` has logged in: its pre-login slot is free."""
        self._leave_pre_login(holder)

    def _leave_pre_login(self, holder: Holder) -> None:
        key = holder.client_key
        held = self._pre_login.get(key)
        if held is None or holder not in held:
            return
        del held[holder]
        if not held:
            del self._pre_login[key]
        self.handshaking -= 1

    def closed(self, holder: Holder) -> None:
        """``holder`` has ended: all its slots are free."""
        self._leave_pre_login(holder)
        key = holder.client_key
        self.open -= 1
        left = self.per_client.get(key, 0) - 1
        if left > 0:
            self.per_client[key] = left
        else:
            self.per_client.pop(key, None)


class LoginGate:
    """At most ``limit`` logins in flight per client address (auth message
    received, verdict pending); the others wait their turn in order, so a
    burst from one address costs at most ``limit`` user lookups before its
    failures are counted (and it is banned) however many it sends at once."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, deque[Deferred]] = {}

    def turn(self, key: str) -> Deferred:
        """Fires (with ``None``) when a login from ``key`` may start; the
        caller then owes one `done`.  Cancelling it while it waits gives
        up its place."""
        if self.limit <= 0 or self._in_flight.get(key, 0) < self.limit:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            return succeed(None)
        queue = self._waiting.setdefault(key, deque())
        waiter: Deferred = Deferred(lambda d: self._give_up(key, d))
        queue.append(waiter)
        return waiter

    def _give_up(self, key: str, waiter: Deferred) -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[key]

    def done(self, key: str) -> None:
        """A login from ``key`` has its verdict: the next one may start."""
        queue = self._waiting.get(key)
        if queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            waiter.callback(None)  # the slot passes on
            return
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def waiting(self, key: str) -> int:
        queue = self._waiting.get(key)
        return len(queue) if queue else 0


@dataclass(frozen=True)
class ThrottleSettings:
    """``max_failures`` failed logins within ``window`` seconds ban the
    address for ``ban`` seconds (0 failures: no throttling)."""

    max_failures: int = 10
    window: float = 60.0
    ban: float = 300.0
    #: Logins from one address in flight at once (`LoginGate`); 0: no cap.
    max_in_flight: int = 4


class AuthThrottle:
    def __init__(self, clock: Any, settings: ThrottleSettings = ThrottleSettings(), counters: Counters | None = None):
        self.clock = clock
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned: OrderedDict[str, float] = OrderedDict()

    def banned(self, key: str) -> bool:
        """Whether ``key`` is banned now."""
        until = self._banned.get(key)
        if until is None:
            return False
        if until > self.clock.seconds():
            return True
        del self._banned[key]
        return False

    @property
    def banned_count(self) -> int:
        now = self.clock.seconds()
        return sum(1 for until in self._banned.values() if until > now)

    def failed(self, key: str) -> bool:
        """Record a failed login from ``key``; true if it is banned now."""
        s = self.settings
        if s.max_failures <= 0:
            return False
        now = self.clock.seconds()
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=s.max_failures)
        times.append(now)
        while times and times[0] <= now - s.window:
            times.popleft()
        if len(times) >= s.max_failures:
            self._banned.pop(key, None)
            self._banned[key] = now + s.ban
            self.counters.inc("throttle.banned")
            while len(self._banned) > MAX_TRACKED:
                self._banned.popitem(last=False)
            return True
        self._failures[key] = times  # most recent last
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)
        return False
