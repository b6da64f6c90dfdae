"""Readiness for load balancers: ``/health`` (also ``/healthz`` and
``/readyz``) on the metrics listener, and on ``health.listen`` if given.

A server is **ready** (``200``) while

* every listener of the config is listening,
* the user database answers (a ``SELECT 1`` every `PROBE_INTERVAL`
  seconds, `Health.probe`), or has stopped answering for less than
  ``db.outage_grace`` (logins verified before still work meanwhile),
* and it is not draining (`mtop.drain.Drain`: a SIGTERM with
  ``server.drain_timeout`` above 0).

Otherwise it is **not ready** (``503``).  The body's first line is
``ready`` or ``not ready: REASONS``; the lines after it say what was
looked at (listeners, database, tunnels open).  ``/livez`` answers ``200``
while the process runs, whatever the rest.

With ``server.workers``, every worker binds ``health.listen`` with
``SO_REUSEPORT`` (as its tunnel listeners), so a check reaches one of them;
workers share the database and drain together, so any one answers for the
server.  ``metrics.listen`` stays one port per worker.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mtop.logs import logger

#: Seconds between database probes.
PROBE_INTERVAL = 2.0
#: Paths answering readiness; `LIVE_PATH` answers liveness.
READY_PATHS = (b"health", b"healthz", b"readyz")
LIVE_PATH = b"livez"


class Health(Service):
    """What makes the server ready (see the module docstring).  A service:
    while running it probes the database every `PROBE_INTERVAL` seconds."""

    _log = logger()

    def __init__(
        self,
        clock: Any,
        listeners: Iterable[Any] = (),
        store: Any = None,
        outage_grace: Any = 0.0,
        tunnels: Any = None,
        query_timeout: float = 5.0,
    ):
        """``listeners``: services with a ``port`` (``None`` while not
        listening) and a ``label``; ``store``: the user store (its
        ``ping()`` is the probe); ``outage_grace``: seconds, or a callable
        giving them (the authenticator's, which a reload changes);
        ``tunnels``: a sized collection of the open tunnels."""
        self.clock = clock
        self.listeners = list(listeners)
        self.store = store
        self._grace = outage_grace
        self.tunnels = tunnels
        self.query_timeout = query_timeout
        #: Set when a drain starts (`mtop.drain.Drain`).
        self.draining = False
        #: When the database last answered, and since when it has not
        #: (``None``: it answers, or no probe has failed yet).
        self.db_answered: float | None = None
        self.db_failing_since: float | None = None
        self.db_error = ""
        self._probe: LoopingCall | None = None
        self._probing = False

    @property
    def outage_grace(self) -> float:
        return self._grace() if callable(self._grace) else self._grace

    # Service

    def startService(self) -> None:
        super().startService()
        if self.store is not None and hasattr(self.store, "ping"):
            self._probe = LoopingCall(self.probe)
            self._probe.clock = self.clock
            self._probe.start(PROBE_INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None

    def probe(self) -> Deferred | None:
        """Ask the database once (unless the last probe is still out)."""
        if self._probing:
            return None
        self._probing = True
        d = maybeDeferred(self.store.ping)
        d.addTimeout(self.query_timeout, self.clock)
        d.addCallbacks(self._answered, self._failed)
        d.addBoth(self._probed)
        return d

    def _answered(self, _: Any) -> None:
        self.db_answered = self.clock.seconds()
        self.db_failing_since = None
        self.db_error = ""

    def _failed(self, failure: Failure) -> None:
        if self.db_failing_since is None:
            self.db_failing_since = self.clock.seconds()
        text = failure.getErrorMessage().strip().splitlines()
        self.db_error = text[0] if text else failure.type.__name__

    def _probed(self, _: Any) -> None:
        self._probing = False

    # The answer

    def status(self) -> tuple[bool, list[str], list[str]]:
        """(ready, reasons it is not, what was looked at)."""
        reasons: list[str] = []
        notes: list[str] = []
        if self.draining:
            reasons.append("draining")
        down = [service.label for service in self.listeners if service.port is None]
        if down:
            reasons.append("not listening: " + ", ".join(sorted(set(down))))
        notes.append(f"listeners: {len(self.listeners) - len(down)} of {len(self.listeners)} listening")
        if self.store is not None:
            now = self.clock.seconds()
            if self.db_failing_since is not None:
                failing = now - self.db_failing_since
                grace = self.outage_grace
                if failing < grace:
                    notes.append(
                        f"database: not answering for {failing:.0f}s ({self.db_error}); "
                        f"logins verified in the last {grace:g}s still accepted"
                    )
                else:
                    reasons.append("database not answering")
                    notes.append(f"database: not answering for {failing:.0f}s ({self.db_error})")
            elif self.db_answered is None:
                reasons.append("database not asked yet")
            else:
                notes.append(f"database: answered {now - self.db_answered:.1f}s ago")
        if self.tunnels is not None:
            notes.append(f"tunnels: {len(self.tunnels)} open")
        return not reasons, reasons, notes


def health_resource(health: Health) -> Any:
    """A twisted.web resource tree serving ``health`` at the
    `READY_PATHS` and `LIVE_PATH` (children of the root)."""
    from twisted.web.resource import Resource

    class Ready(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            ready, reasons, notes = health.status()
            request.setResponseCode(200 if ready else 503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            first = "ready" if ready else "not ready: " + "; ".join(reasons)
            return ("\n".join([first, *notes]) + "\n").encode("utf-8")

        render_HEAD = render_GET

    class Live(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            return b"live\n"

        render_HEAD = render_GET

    return Ready(), Live()


def add_health(root: Any, health: Health) -> None:
    """Put ``health``'s paths under ``root`` (a twisted.web ``Resource``)."""
    ready, live = health_resource(health)
    for path in READY_PATHS:
        root.putChild(path, ready)
    root.putChild(LIVE_PATH, live)


def health_site(health: Health) -> Any:
    """A ``Site`` serving only ``health``'s paths (``health.listen``);
    requests are not logged (a check a second is not worth a line)."""
    from twisted.web.pages import notFound
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Root(Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            return notFound()

    root = Root()
    add_health(root, health)
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None
    return site


def health_service(reactor: Any, listen: Any, health: Health, reuse_port: bool = False) -> Any:
    """A listening service serving ``health`` on ``listen`` (``health.listen``),
    to clients that start with a PROXY header or without;  ``reuse_port``:
    bound with ``SO_REUSEPORT`` (server workers share it)."""
    from mtop.config import ListenAddress
    from mtop.listening import ListeningService, listening_endpoint

    if reuse_port:
        from mtop.workers import ReusePortEndpoint

        endpoint = ReusePortEndpoint(reactor, listen, listen.port)
    else:
        endpoint = listening_endpoint(reactor, listen)
    # HAProxy's check-send-proxy starts checks with a PROXY header: taken
    # when there is one.
    from mtop.proxyproto import ProxyHeaderFactory
    from mtop.stats import Counters

    site = ProxyHeaderFactory(health_site(health), reactor, 10.0, Counters(), optional=True)
    return ListeningService(endpoint, site, "Health check", ListenAddress(listen.host, listen.port), " (path /health)")
