"""A graceful stop: open tunnels finish before the server goes.

On SIGTERM (any stop of the reactor) with ``server.drain_timeout`` above 0,
before any service stops, `Drain`:

1. reports not ready on the health endpoint (``draining``, `mtop.health`);
2. stops accepting: TLS listeners close their listening sockets (new
   connections are refused, so a load balancer sends them elsewhere at
   once); QUIC listeners keep their port for the connections they carry but
   take no new connection and no new stream, and close the connections that
   carry no tunnel;
3. closes connections that have not begun a tunnel (a client's handshaken,
   idle connection kept for its next tunnel: climber retries such a tunnel
   on a new connection, to another server);
4. waits until every open tunnel has ended, at most ``drain_timeout``
   seconds; a second SIGTERM (or SIGINT) ends the wait at once.

Then the server stops as before: what is still open is closed (outcome
``shutdown``) and the last traffic flush runs, after the tunnels are gone,
so no accounting is lost.  With ``server.workers`` the supervisor closes
every worker's stdin (each drains) and waits ``drain_timeout`` plus
`mtop.workers.STOP_GRACE` before it kills any; a second SIGTERM to it is
passed on to them.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from mtop.logs import logger

#: How often the drain looks whether the tunnels are gone.
POLL = 0.1


class Drain:
    """Called by the root service (`mtop.startup.TapService`) before the
    services stop; fires when the tunnels are gone, the time is up or a
    second stop signal came."""

    _log = logger()

    def __init__(
        self,
        clock: Any,
        factory: Any,
        listeners: Iterable[Any],
        timeout: Callable[[], float],
        health: Any = None,
        install_signals: bool = True,
    ):
        """``factory``: the `mtop.server.TunnelFactory` (its ``tunnels``);
        ``listeners``: the listening services (each has `stop_accepting`);
        ``timeout``: gives ``server.drain_timeout`` (a reload changes it)."""
        self.clock = clock
        self.factory = factory
        self.listeners = list(listeners)
        self.timeout = timeout
        self.health = health
        self.install_signals = install_signals
        self.draining = False
        self._done: Deferred | None = None
        self._poll: Any = None
        self._previous: dict[int, Any] = {}
        self._started = 0.0
        self._deadline = 0.0

    def __call__(self) -> Deferred:
        timeout = self.timeout()
        if self.install_signals:
            self._take_signals()
        if timeout <= 0 or self.draining:
            return succeed(None)
        self.draining = True
        self._started = self.clock.seconds()
        if self.health is not None:
            self.health.draining = True
        for listener in self.listeners:
            maybeDeferred(listener.stop_accepting)
        idle = self.factory.close_idle()
        open_now = len(self.factory.tunnels)
        self._log.info(
            "draining: accepting no new tunnels; {open} open get up to {timeout:g}s to finish "
            "({idle} idle connections closed; SIGTERM again to close them now)",
            open=open_now,
            timeout=timeout,
            idle=idle,
        )
        self._done = Deferred()
        self._deadline = self.clock.seconds() + timeout
        self._check()
        return self._done

    def cut(self) -> None:
        """End the wait now (the second stop signal)."""
        if self._done is not None and not self._done.called:
            self._finish(f"stop signal repeated after {self.clock.seconds() - self._started:.1f}s")

    def _check(self) -> None:
        self._poll = None
        if self._done is None or self._done.called:
            return
        if not self.factory.tunnels:
            self._finish(None)
        elif self.clock.seconds() >= self._deadline:
            self._finish(f"drain_timeout ({self.timeout():g}s) reached")
        else:
            self._poll = self.clock.callLater(POLL, self._check)

    def _finish(self, cut: str | None) -> None:
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        took = self.clock.seconds() - self._started
        if cut is None:
            self._log.info("drained: every tunnel ended within {took:.1f}s", took=took)
        else:
            self._log.warn(
                "drain cut short: {reason}; closing the {open} tunnels still open",
                reason=cut,
                open=len(self.factory.tunnels),
            )
        done, self._done = self._done, None
        done.callback(None)

    # Signals: from the first stop on, SIGTERM and SIGINT end the drain's
    # wait, and after it are noted and ignored: twistd's own handlers would
    # try to stop a reactor already stopping, with a traceback (shadowsocks'
    # ss-server, for one, sends its plugin a second SIGTERM).

    def _take_signals(self) -> None:
        if self._previous:
            return

        def handler(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(self._signalled)

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # not the main thread
                pass

    def restore_signals(self) -> None:
        """Give the stop signals back to whoever had them (for a process
        that goes on after a drain: tests)."""
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, OSError, TypeError):
                pass
        self._previous = {}

    def _signalled(self) -> None:
        if self._done is not None and not self._done.called:
            self.cut()
        else:
            self._log.info("stop signal repeated: already stopping (the last traffic flush is bounded by its timeout)")

