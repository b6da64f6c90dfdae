"""The servers climber tunnels through: selection strategy and health.

`ServerPool.candidates` gives, for one new tunnel, the order in which to
try servers.  Servers that are up come first, in the strategy's order:

``random``       a random order (the original's behaviour);
``round_robin``  each tunnel starts one server further along the list;
``failover``     the configured order;
``fastest``      lowest measured TLS handshake time first (servers not yet
                 measured first, so each gets measured).

A server that fails (TCP connect, TLS handshake, timeout) is marked down and
left out for a backoff that doubles with each failure in a row (1 s up to
60 s); after that, the next tunnel tries it again.  Servers still down are
appended last, soonest retry first, so a tunnel is attempted even when every
server has failed recently.  State changes are logged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from climber.config import ServerEntry
from mtop.logs import logger

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
#: Weight of the newest handshake time in the moving average.
EWMA_WEIGHT = 0.3


@dataclass(eq=False)
class ServerState:
    """What the pool knows about one server."""

    entry: ServerEntry
    index: int
    down_until: float = 0.0
    failures: int = 0
    handshake_time: float | None = None
    down: bool = False
    #: Tunnels opened through it, and attempts that failed to reach it.
    opened: int = 0
    unreachable: int = 0

    @property
    def name(self) -> str:
        return self.entry.name


class ServerPool:
    """Chooses servers for tunnels and tracks their health."""

    _log = logger()

    def __init__(self, entries: tuple[ServerEntry, ...], strategy: str, clock: Any, rng: random.Random | None = None):
        if not entries:
            raise ValueError("a server pool needs at least one server")
        self.servers = [ServerState(entry, i) for i, entry in enumerate(entries)]
        self.strategy = strategy
        self.clock = clock
        self.rng = rng or random.Random()
        self._next = 0
        #: Tunnels that were tried on another server after one failed.
        self.failovers = 0
        #: Tunnels tried once more on a pool's only server (`TunnelOpener`).
        self.retries = 0

    def candidates(self) -> list[ServerState]:
        """The servers to try for one new tunnel, best first."""
        now = self.clock.seconds()
        up = [s for s in self.servers if not s.down or s.down_until <= now]
        down = sorted((s for s in self.servers if s.down and s.down_until > now), key=lambda s: s.down_until)
        return self._order(up) + down

    def _order(self, servers: list[ServerState]) -> list[ServerState]:
        if len(servers) < 2:
            return servers
        if self.strategy == "random":
            servers = servers[:]
            self.rng.shuffle(servers)
            return servers
        if self.strategy == "round_robin":
            start = self._next % len(servers)
            self._next += 1
            return servers[start:] + servers[:start]
        if self.strategy == "fastest":
            return sorted(servers, key=lambda s: (s.handshake_time is not None, s.handshake_time or 0.0, s.index))
        return servers  # failover: configured order

    def report_success(self, server: ServerState, handshake_time: float | None) -> None:
        """A tunnel through ``server`` got its reply (or, for a server that
        closed without one, at least completed the TLS handshake)."""
        if handshake_time is not None:
            if server.handshake_time is None:
                server.handshake_time = handshake_time
            else:
                server.handshake_time += EWMA_WEIGHT * (handshake_time - server.handshake_time)
        if server.down:
            self._log.info("server {server} is up again", server=server.name, server_event="up")
        server.down = False
        server.failures = 0
        server.down_until = 0.0

    def report_failure(self, server: ServerState, reason: str) -> None:
        """``server`` could not be reached: mark it down for a while."""
        server.failures += 1
        server.unreachable += 1
        backoff = min(BACKOFF_FIRST * 2 ** (server.failures - 1), BACKOFF_MAX)
        server.down_until = self.clock.seconds() + backoff
        if not server.down:
            self._log.warn(
                "server {server} is down ({reason}); trying it again in {backoff:.0f}s",
                server=server.name,
                reason=reason,
                backoff=backoff,
                server_event="down",
            )
        else:
            self._log.info(
                "server {server} still down ({reason}); next try in {backoff:.0f}s",
                server=server.name,
                reason=reason,
                backoff=backoff,
            )
        server.down = True
