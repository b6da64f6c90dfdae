"""The server's listeners, from ``listeners:`` (or the ``server:`` block):
TLS on TCP and QUIC on UDP, possibly both on the same port number.

`prepare_listeners` runs in ``postOptions`` (it loads certificates and
checks the reactor, so problems are usage errors before anything starts);
`listener_services` builds the services in ``makeService``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtop.config import Config, ConfigError, ListenerConfig

#: What to run when QUIC is configured but the reactor cannot host it.
QUIC_COMMAND = "twistd -r asyncio mtop --config FILE"


@dataclass(frozen=True)
class PreparedListener:
    """A listener with its loaded TLS context or QUIC configuration."""

    config: ListenerConfig
    security: Any


def prepare_listeners(config: Config, reactor: Any = None) -> list[PreparedListener]:
    """Load each listener's certificate (a `TLSConfigError` or `ConfigError`
    names the file); for QUIC, check that ``reactor`` (the installed one by
    default) can host it."""
    from mtop.tls import server_context

    prepared = []
    server = config.server
    for listener in config.listeners:
        if listener.type == "quic":
            from mtop.quic import reactor_problem

            if reactor is None:
                from twisted.internet import reactor

            problem = reactor_problem(reactor, QUIC_COMMAND.replace("FILE", config.path or "FILE"))
            if problem:
                raise ConfigError(f"{_name(config, listener)} is QUIC: {problem}")
            from mtop.quic.server import QuicConfigError, server_configuration

            try:
                security = server_configuration(
                    listener.crt, listener.key, listener.proto, server.idle_timeout, server.quic_packet_size
                )
            except QuicConfigError as e:
                raise ConfigError(str(e)) from None
        else:
            security = server_context(
                listener.crt, listener.key, listener.proto, server.tls_min_version, fallback=server.fallback is not None
            )
        prepared.append(PreparedListener(listener, security))
    return prepared


def _name(config: Config, listener: ListenerConfig) -> str:
    if len(config.listeners) == 1:
        return "server.type"
    return f"listeners[{config.listeners.index(listener)}]"


def listener_services(
    prepared: list[PreparedListener],
    factory: Any,
    reactor: Any,
    handshake_timeout: float,
    worker_ports: dict[int, int] | None = None,
) -> list[Any]:
    """One listening service per prepared listener, serving ``factory``'s
    tunnel protocols.  Each has ``listener`` (its `ListenerConfig`) and
    ``use_security(security)``, which makes new connections use a reloaded
    certificate (open ones keep theirs).  In a worker (``worker_ports``:
    listener index -> port), listeners bind with ``SO_REUSEPORT``."""
    from mtop.listen import ListenerService, server_endpoint
    from mtop.tlstransport import server_tls_factory

    services = []
    for index, item in enumerate(prepared):
        listener = item.config
        port = listener.listen.port if worker_ports is None else worker_ports.get(index, listener.listen.port)
        if listener.type == "quic":
            from mtop.quic.server import QuicListenerService, QuicServerProtocol

            protocol = QuicServerProtocol(reactor, factory, item.security, handshake_timeout)
            service = QuicListenerService(reactor, protocol, listener.listen.host, port, reuse_port=worker_ports is not None)
            service.use_security = lambda security, protocol=protocol: setattr(protocol, "configuration", security)
        else:
            holder = _Security(item.security)
            tls_factory = server_tls_factory(factory, holder.get, reactor)
            note = ""
            if listener.proxy_protocol:
                from mtop.proxyproto import ProxyHeaderFactory

                tls_factory = ProxyHeaderFactory(tls_factory, reactor, handshake_timeout, factory.counters)
                note = " (PROXY protocol header required)"
            if worker_ports is None:
                endpoint = server_endpoint(reactor, listener.listen)
            else:
                from mtop.workers import ReusePortEndpoint

                endpoint = ReusePortEndpoint(reactor, listener.listen, port)
            service = ListenerService(endpoint, tls_factory, "MTop TLS", note)
            service.use_security = holder.set
        service.listener = listener
        services.append(service)
    return services


class _Security:
    """The TLS context new connections of a listener get."""

    def __init__(self, security: Any):
        self.security = security

    def get(self) -> Any:
        return self.security

    def set(self, security: Any) -> None:
        self.security = security
