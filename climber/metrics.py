"""Prometheus metrics for climber (``metrics: {listen: "127.0.0.1:9101"}``),
served like the server's (`mtop.metrics.metrics_service`) and read at scrape
time from what climber keeps anyway.

=====================================  ======================================
``climber_tunnels_open{frontend}``     open local connections (socks5, http,
                                       forward)
``climber_tunnels_total``              finished ones by ``frontend``,
                                       ``server`` (empty if none was reached)
                                       and ``outcome``
``climber_traffic_bytes_total``        bytes by ``server`` and ``direction``
``climber_server_up{server}``          1 while the server is not marked down
``climber_server_tunnels_opened_total``  tunnels opened through each server
``climber_server_unreachable_total``   attempts that could not reach it
``climber_server_handshake_seconds``   its moving-average TLS handshake time
``climber_failovers_total``            tunnels tried on another server after
                                       one failed
``climber_retries_total``              tunnels tried once more on a pool's only
                                       server after it closed without a reply
``climber_prewarm_ready{server}``      prewarmed connections ready now
                                       (``type: tls`` servers with
                                       ``prewarm``)
``climber_prewarm_used_total{server}``  those taken by tunnels
``climber_prewarm_wasted_total``       prewarmed connections never used, by
                                       ``server`` and ``reason``: expired,
                                       closed (by the server), failed
``process_*``                          memory, CPU, open files
=====================================  ======================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from climber.prewarm import CLOSED, EXPIRED, FAILED
from climber.tunnel import ServerConnector


class _ClimberCollector:
    def __init__(self, climber: Any, pool: Any):
        self.climber = climber
        self.pool = pool

    def collect(self) -> Iterable[Any]:
        climber, pool = self.climber, self.pool
        open_ = GaugeMetricFamily("climber_tunnels_open", "Open local connections by front end.", labels=["frontend"])
        for kind, count in sorted(Counter(c.kind for c in climber.connections).items()):
            open_.add_metric([kind], count)
        yield open_
        done = CounterMetricFamily(
            "climber_tunnels", "Finished local connections by front end, server and outcome.", labels=["frontend", "server", "outcome"]
        )
        for (kind, server, outcome), count in sorted(climber.outcomes.items()):
            done.add_metric([kind, server, outcome], count)
        yield done
        traffic = {name: list(totals) for name, totals in climber.traffic.items()}
        for connection in climber.connections:
            relay = connection.relay
            if relay is not None and connection.server is not None:
                totals = traffic.setdefault(connection.server, [0, 0])
                totals[0] += relay.bytes_up
                totals[1] += relay.bytes_down
        family = CounterMetricFamily("climber_traffic_bytes", "Bytes relayed by server (up: to the server).", labels=["server", "direction"])
        for name, (up, down) in sorted(traffic.items()):
            family.add_metric([name, "up"], up)
            family.add_metric([name, "down"], down)
        yield family
        up = GaugeMetricFamily("climber_server_up", "1 while the server is not marked down.", labels=["server"])
        opened = CounterMetricFamily("climber_server_tunnels_opened", "Tunnels opened through the server.", labels=["server"])
        unreachable = CounterMetricFamily("climber_server_unreachable", "Attempts that could not reach the server.", labels=["server"])
        handshake = GaugeMetricFamily(
            "climber_server_handshake_seconds", "Moving average of the server's TLS handshake time.", labels=["server"]
        )
        for state in pool.servers:
            up.add_metric([state.name], 0 if state.down else 1)
            opened.add_metric([state.name], state.opened)
            unreachable.add_metric([state.name], state.unreachable)
            if state.handshake_time is not None:
                handshake.add_metric([state.name], state.handshake_time)
        yield from (up, opened, unreachable, handshake)
        yield CounterMetricFamily("climber_failovers", "Tunnels tried on another server after one failed.", value=pool.failovers)
        yield CounterMetricFamily(
            "climber_retries", "Tunnels tried once more on the only server after it closed without a reply.", value=pool.retries
        )
        yield from self._prewarm()

    def _prewarm(self) -> Iterable[Any]:
        ready = GaugeMetricFamily("climber_prewarm_ready", "Prewarmed TLS connections ready now.", labels=["server"])
        used = CounterMetricFamily("climber_prewarm_used", "Prewarmed TLS connections taken by tunnels.", labels=["server"])
        wasted = CounterMetricFamily(
            "climber_prewarm_wasted",
            "Prewarmed TLS connections never used: expired, closed by the server, or failed.",
            labels=["server", "reason"],
        )
        for state in self.pool.servers:
            connector = self.climber.opener.connectors[id(state)]
            if not isinstance(connector, ServerConnector) or connector.prewarm is None:
                continue
            ready.add_metric([state.name], connector.prewarm.ready_count)
            used.add_metric([state.name], connector.prewarm.used)
            for reason in (EXPIRED, CLOSED, FAILED):
                wasted.add_metric([state.name, reason], connector.prewarm.wasted[reason])
        yield from (ready, used, wasted)


def climber_registry(climber: Any, pool: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ClimberCollector(climber, pool))
    ProcessCollector(registry=registry)
    return registry
