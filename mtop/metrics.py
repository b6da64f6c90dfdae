"""Prometheus metrics for the server (``metrics: {listen: "127.0.0.1:9100"}``).

Served in the Prometheus text format at ``/metrics`` by twisted.web, with
prometheus_client doing the exposition (its format rules, escaping and
histograms are what Prometheus expects; hand-written exposition would only
repeat them).  Almost everything is read when Prometheus scrapes, from the
counters and objects the server keeps anyway, so the data path does no
work for metrics; only the two latency histograms are observed as events
happen, once per tunnel.

Metrics (all per process):

=================================  =========================================
``mtop_tunnels_open{state}``       open connections by state: handshake,
                                   auth, connecting, relay, fallback, ...
``mtop_tunnels_total{outcome}``    finished connections by outcome
``mtop_checks_total``              load balancers' health checks on a tunnel
                                   port: a PROXY v2 ``LOCAL`` header, or
                                   nothing sent (not counted as tunnels)
``mtop_traffic_bytes_total``       bytes relayed, ``direction`` up (client to
                                   target) or down, open tunnels included
``mtop_user_traffic_bytes_total``  the same per ``user`` (only with
                                   ``metrics.per_user: true``)
``mtop_auth_total{result}``        logins: ok, failed, unavailable
``mtop_unflushed_bytes``           traffic not yet in the user table (what a
                                   crash would leave uncounted)
``mtop_password_checks_total{how}`` passwords checked: hashed (scrypt ran),
                                   reused, shared (by another worker), fast
``mtop_refused_total{reason}``     connections refused: acl, banned,
                                   client-denied, max-tunnels, max-handshakes,
                                   max-handshakes-per-client,
                                   max-per-client, proxy-header
``mtop_evicted_total``             connections before their login closed for a
                                   newcomer from a less busy address
``mtop_fallback_total``            clients spliced to the fallback site
``mtop_db_errors_total``           failed user lookups, rechecks, flushes
``mtop_throttled_addresses``       addresses banned now
``mtop_quic_connections{state}``   open QUIC connections: handshake, login
                                   (no tunnel logged in yet), active, idle
``mtop_quic_streams``              open QUIC streams
``mtop_handshake_seconds``         histogram: accept to complete auth message
``mtop_connect_seconds``           histogram: dialling the target
``process_*``                      memory, CPU, open files of the process
=================================  =========================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service

from mtop.config import ListenAddress

#: Latency buckets in seconds: loopback (sub-millisecond) to a slow
#: handshake over a bad mobile link.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REFUSED = (
    "acl",
    "banned",
    "client-denied",
    "max-tunnels",
    "max-handshakes",
    "max-handshakes-per-client",
    "max-per-client",
    "proxy-header",
)


def prefixed(counters: dict[str, int], prefix: str) -> dict[str, int]:
    """The counters named ``prefix.X``, as ``{X: value}``."""
    start = len(prefix) + 1
    return {name[start:]: value for name, value in counters.items() if name.startswith(prefix + ".")}


class _HistogramTimings:
    """`mtop.server.Timings` into two histograms."""

    def __init__(self, registry: CollectorRegistry):
        self.handshake_seconds = Histogram(
            "mtop_handshake_seconds",
            "Seconds from accepting a connection to its complete auth message (TLS handshake included).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connect_seconds = Histogram(
            "mtop_connect_seconds", "Seconds to resolve and connect to a tunnel's target.", buckets=LATENCY_BUCKETS, registry=registry
        )

    def handshake(self, seconds: float) -> None:
        self.handshake_seconds.observe(seconds)

    def connect(self, seconds: float) -> None:
        self.connect_seconds.observe(seconds)


class _ServerCollector:
    """Reads the server's state when Prometheus scrapes."""

    def __init__(self, factory: Any, quic_protocols: list[Any]):
        self.factory = factory
        self.quic_protocols = quic_protocols

    def collect(self) -> Iterable[Any]:
        factory = self.factory
        counters = factory.counters.snapshot()

        states = Counter(tunnel.state for tunnel in factory.tunnels)
        open_ = GaugeMetricFamily("mtop_tunnels_open", "Open connections by state.", labels=["state"])
        for state in ("handshake", "auth", "connecting", "relay", "fallback", "failing"):
            open_.add_metric([state], states.get(state, 0))
        yield open_

        outcomes = CounterMetricFamily("mtop_tunnels", "Finished connections by outcome.", labels=["outcome"])
        for outcome, value in sorted(prefixed(counters, "tunnels").items()):
            outcomes.add_metric([outcome], value)
        yield outcomes

        up, down = counters.get("bytes.up", 0), counters.get("bytes.down", 0)
        live_users: dict[str, list[int]] = {}
        for tunnel in factory.tunnels:
            relay = tunnel.relay
            if relay is not None:
                up += relay.bytes_up
                down += relay.bytes_down
                if factory.user_bytes is not None and tunnel.request is not None:
                    totals = live_users.setdefault(tunnel.request.username, [0, 0])
                    totals[0] += relay.bytes_up
                    totals[1] += relay.bytes_down
        traffic = CounterMetricFamily("mtop_traffic_bytes", "Bytes relayed (up: client to target).", labels=["direction"])
        traffic.add_metric(["up"], up)
        traffic.add_metric(["down"], down)
        yield traffic
        if factory.user_bytes is not None:
            per_user = CounterMetricFamily(
                "mtop_user_traffic_bytes", "Bytes relayed per user (up: client to target).", labels=["user", "direction"]
            )
            for user in sorted(set(factory.user_bytes) | set(live_users)):
                done = factory.user_bytes.get(user, (0, 0))
                live = live_users.get(user, (0, 0))
                per_user.add_metric([user, "up"], done[0] + live[0])
                per_user.add_metric([user, "down"], done[1] + live[1])
            yield per_user

        auth = CounterMetricFamily("mtop_auth", "Logins by result.", labels=["result"])
        for result in ("ok", "failed", "unavailable"):
            auth.add_metric([result], counters.get(f"auth.{result}", 0))
        yield auth

        checks = CounterMetricFamily(
            "mtop_password_checks",
            "Passwords checked after a user lookup, by how: hashed (scrypt ran), reused (verified against this hash "
            "here before), shared (by another worker), fast (a legacy hash).",
            labels=["how"],
        )
        for how, count in factory.authenticator.checks.items():
            checks.add_metric([how], count)
        yield checks

        sessions = factory.sessions
        if sessions is not None:
            yield GaugeMetricFamily(
                "mtop_unflushed_bytes",
                "Traffic counted here and not yet written to the user table: what a crash now would leave uncounted "
                "(db.flush_interval bounds it).",
                value=sessions.unflushed_total(),
            )

        refused = CounterMetricFamily("mtop_refused", "Connections refused, by reason.", labels=["reason"])
        reasons = prefixed(counters, "refused")
        for reason in sorted(set(_REFUSED) | set(reasons)):
            refused.add_metric([reason], reasons.get(reason, 0))
        yield refused

        yield CounterMetricFamily(
            "mtop_evicted", "Connections before their login closed for a newcomer from a less busy address.",
            value=counters.get("evicted", 0),
        )
        yield CounterMetricFamily(
            "mtop_checks", "Health checks on a tunnel port (PROXY LOCAL, or nothing sent); not tunnels.",
            value=counters.get("checks", 0),
        )
        yield CounterMetricFamily("mtop_fallback", "Clients spliced to the fallback web server.", value=counters.get("fallback", 0))
        yield CounterMetricFamily(
            "mtop_db_errors", "Failed user lookups, rechecks and traffic flushes.", value=counters.get("db.errors", 0)
        )
        yield GaugeMetricFamily("mtop_throttled_addresses", "Client addresses banned now.", value=factory.throttle.banned_count)
        connections = set()
        for protocol in self.quic_protocols:
            connections.update(protocol.connections.values())
        quic = GaugeMetricFamily("mtop_quic_connections", "Open QUIC connections by state.", labels=["state"])
        quic_states = Counter(connection.state for connection in connections)
        for state in ("handshake", "login", "active", "idle"):
            quic.add_metric([state], quic_states.get(state, 0))
        yield quic
        yield GaugeMetricFamily(
            "mtop_quic_streams", "Open QUIC streams.", value=sum(len(connection.streams) for connection in connections)
        )


def server_registry(factory: Any, quic_protocols: list[Any] = (), per_user: bool = False) -> CollectorRegistry:
    """A registry with the server's metrics (from ``factory`` and its
    counters, which the user sessions share); installs the latency
    histograms as ``factory.timings``."""
    registry = CollectorRegistry(auto_describe=True)
    factory.timings = _HistogramTimings(registry)
    if per_user and factory.user_bytes is None:
        factory.user_bytes = {}
    registry.register(_ServerCollector(factory, list(quic_protocols)))
    ProcessCollector(registry=registry)
    return registry


def metrics_service(reactor: Any, listen: ListenAddress, registry: CollectorRegistry, health: Any = None) -> Service:
    """A listening service serving ``registry`` at ``http://LISTEN/metrics``
    (a `mtop.listening.ListeningService`: if it cannot listen, it says so
    and raises `mtop.listening.ListenFailed` from its start), and
    ``health`` (an `mtop.health.Health`) at ``/health`` and its other
    paths."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from mtop.listening import ListeningService, listening_endpoint

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    note = " (path /metrics)"
    if health is not None:
        from mtop.health import add_health

        add_health(root, health)
        note = " (paths /metrics, /health)"
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # scrapes are not worth a log line each
    return ListeningService(listening_endpoint(reactor, listen), site, "Prometheus metrics", listen, note)
