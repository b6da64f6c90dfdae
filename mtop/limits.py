"""Connection limits and failed-login throttling, per server process.

`ConnectionLimits` counts open connections (TLS connections and QUIC
streams: one tunnel each), those still before their login (the TLS
handshake and the auth message: the part an unauthenticated peer can make
us spend on), and connections per client address.  A connection over a
limit is refused before anything is spent on it: no TLS handshake, no
database query.

`AuthThrottle` counts failed logins per client address (IPv6 by /64, the
block one host usually has) in a sliding window; past the allowed number
the address is banned for a while, and its connections are closed at once,
without touching the user store.

Both are per process (see ``server.workers``); neither keeps more than
`MAX_TRACKED` addresses, so a flood of addresses cannot exhaust memory.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from mtop.stats import Counters

#: Addresses whose failures the throttle remembers at most.
MAX_TRACKED = 100_000


def client_key(host: str) -> str:
    """The unit limits and bans apply to: the IPv4 address, or the /64 of
    an IPv6 address (an IPv4-mapped IPv6 address counts as IPv4)."""
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
    max_handshakes: int = 0
    max_per_client: int = 0


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
    return LimitSettings(max_tunnels, limits.max_handshakes, limits.max_per_client)


class ConnectionLimits:
    def __init__(self, settings: LimitSettings = LimitSettings(), counters: Counters | None = None):
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.open = 0
        self.handshaking = 0
        self.per_client: dict[str, int] = {}

    def refusal(self, key: str) -> str | None:
        """Why a new connection from ``key`` is refused now, or ``None``."""
        s = self.settings
        if s.max_tunnels and self.open >= s.max_tunnels:
            return "max-tunnels"
        if s.max_handshakes and self.handshaking >= s.max_handshakes:
            return "max-handshakes"
        if s.max_per_client and self.per_client.get(key, 0) >= s.max_per_client:
            return "max-per-client"
        return None

    def opened(self, key: str) -> None:
        """A connection from ``key`` starts (in its handshake)."""
        self.open += 1
        self.handshaking += 1
        self.per_client[key] = self.per_client.get(key, 0) + 1

    def handshake_done(self) -> None:
        self.handshaking -= 1

    def closed(self, key: str, handshaking: bool) -> None:
        self.open -= 1
        if handshaking:
            self.handshaking -= 1
        left = self.per_client.get(key, 0) - 1
        if left > 0:
            self.per_client[key] = left
        else:
            self.per_client.pop(key, None)


@dataclass(frozen=True)
class ThrottleSettings:
    """``max_failures`` failed logins within ``window`` seconds ban the
    address for ``ban`` seconds (0 failures: no throttling)."""

    max_failures: int = 10
    window: float = 60.0
    ban: float = 300.0


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
