"""Per-user rate limits: one token bucket per direction, shared by all of a
user's tunnels.

A `UserRate` is the `mtop.relay.Meter` of every relay of one user.  Each
chunk a relay forwards is taken from the bucket of its direction; a relay
that takes the bucket into debt has the sending side paused (through its
`mtop.relay.Valve`, so flow control is undisturbed) until the debt is paid
back at the configured rate, and then resumed.  The stall is exactly what
the debt needs, so the average is the rate and the traffic stays smooth:
with many tunnels, each one sends a chunk and waits its turn.

No timer runs while a user stays within the limit; the clock is read once
per chunk.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from mtop.relay import Relay, Valve

#: A bucket holds this many seconds of traffic (at least `MIN_BURST`): a
#: short burst passes at full speed, a long transfer runs at the rate.
BURST_SECONDS = 0.1
MIN_BURST = 16 * 1024


class TokenBucket:
    """Bytes per second in one direction; pauses the valves that overspend."""

    def __init__(self, clock: IReactorTime, rate: int):
        self.clock = clock
        self.rate = float(rate)
        self.burst = max(self.rate * BURST_SECONDS, MIN_BURST)
        self.tokens = self.burst
        self.stamp = clock.seconds()
        self.paused: set[Valve] = set()
        self._timer: Any = None

    def set_rate(self, rate: int) -> None:
        self._refill()
        self.rate = float(rate)
        self.burst = max(self.rate * BURST_SECONDS, MIN_BURST)
        self.tokens = min(self.tokens, self.burst)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._wake()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def spend(self, valve: Valve, size: int) -> None:
        self._refill()
        self.tokens -= size
        if self.tokens < 0:
            valve.pause("rate")
            self.paused.add(valve)
            if self._timer is None:
                self._timer = self.clock.callLater(-self.tokens / self.rate, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._refill()
        if self.tokens < 0:
            self._timer = self.clock.callLater(-self.tokens / self.rate, self._wake)
            return
        paused, self.paused = self.paused, set()
        for valve in paused:
            valve.resume("rate")

    def forget(self, valve: Valve) -> None:
        """``valve``'s tunnel is gone."""
        self.paused.discard(valve)

    def stop(self) -> None:
        """Cancel the timer and resume whatever is paused."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        paused, self.paused = self.paused, set()
        for valve in paused:
            valve.resume("rate")


class UserRate:
    """The `mtop.relay.Meter` of one user's relays: ``rate`` bytes per
    second up (client to target) and as many down."""

    def __init__(self, clock: IReactorTime, rate: int):
        self.rate = rate
        self.up = TokenBucket(clock, rate)
        self.down = TokenBucket(clock, rate)

    def set_rate(self, rate: int) -> None:
        if rate != self.rate:
            self.rate = rate
            self.up.set_rate(rate)
            self.down.set_rate(rate)

    def spent_up(self, relay: Relay, size: int) -> None:
        self.up.spend(relay.client_valve, size)

    def spent_down(self, relay: Relay, size: int) -> None:
        self.down.spend(relay.target_valve, size)

    def forget(self, relay: Relay) -> None:
        self.up.forget(relay.client_valve)
        self.down.forget(relay.target_valve)

    def stop(self) -> None:
        self.up.stop()
        self.down.stop()
