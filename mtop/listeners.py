"""The server's listeners, from ``listeners:`` (or the ``server:`` block):
TLS on TCP and QUIC on UDP, possibly both on the same port number, and
WebSocket (``wss``: over TLS; ``ws``: behind a TLS-terminating proxy) on
TCP (`mtop.websocket`).

`prepare_listeners` loads what each listener needs from the config (its
certificate, as a TLS context or a QUIC configuration) and checks the
reactor; it runs for every config read (`mtop.settings.runtime_settings`:
at start, in ``postOptions``, so problems are usage errors before anything
starts, and on each reload).  `listener_services` builds the services in
``makeService``: `TLSListener` here and `mtop.quic.server.QuicListenerService`
(with aioquic, which only QUIC needs), each a settings consumer
(`mtop.interfaces.ISettingsConsumer`) that takes its renewed certificate
from each reloaded config.

QUIC has an idle timeout of its own (a connection without packets is
closed), derived from the tunnels' one: `quic_idle_timeout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from zope.interface import implementer

from mtop.config import Config, ConfigError, ListenAddress, ListenerConfig, ServerConfig
from mtop.interfaces import ISettingsConsumer
from mtop.listening import ListeningService, listening_endpoint
from mtop.wire import format_hostport


#: What to run when QUIC is configured but the reactor cannot host it.
QUIC_COMMAND = "twistd -r asyncio mtop --config FILE"

#: The ALPN protocol of ``wss`` listeners and climber's ``wss`` servers.
WSS_ALPN = "http/1.1"

#: The QUIC idle timeout when tunnels never idle out (``idle_timeout: 0``):
#: a connection (not a tunnel) with no packets for this long is closed.
QUIC_LONGEST_IDLE = 3600.0


def quic_idle_timeout(server: ServerConfig) -> float:
    """Seconds a QUIC connection may go without packets before it is closed
    (QUIC's ``max_idle_timeout``): the tunnels' ``server.idle_timeout``, or
    `QUIC_LONGEST_IDLE` when tunnels never idle out (0)."""
    return server.idle_timeout if server.idle_timeout > 0 else QUIC_LONGEST_IDLE


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
            from mtop.quic.backend import BackendUnavailable
            from mtop.quic.server import QuicConfigError, server_configuration

            try:
                security = server_configuration(
                    listener.crt, listener.key, listener.proto, quic_idle_timeout(server), server.quic_packet_size,
                    config.quic.backend,
                )
            except (QuicConfigError, BackendUnavailable) as e:
                raise ConfigError(str(e)) from None
        elif listener.type == "ws":
            security = None  # TLS is the reverse proxy's
        elif listener.type == "wss":
            # A web server's ALPN: HTTP/1.1 (a client offering only h2 gets
            # none, and its request goes to the fallback or a 404).
            security = server_context(listener.crt, listener.key, WSS_ALPN, server.tls_min_version, fallback=True)
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
    prepared: tuple[PreparedListener, ...] | list[PreparedListener],
    factory: Any,
    reactor: Any,
    handshake_timeout: float,
    worker_ports: dict[int, int] | None = None,
    quic_max_streams: int = 512,
    ws_ping_interval: float = 30.0,
    steer: int = 0,
) -> list[Any]:
    """One listening service per prepared listener, serving ``factory``'s
    tunnel protocols; each has ``listener`` (its `ListenerConfig`) and
    ``index`` (its place in the config).  In a worker (``worker_ports``:
    listener index -> port), listeners bind with ``SO_REUSEPORT``.
    ``quic_max_streams``: concurrent tunnels per QUIC connection.
    ``steer``: in a worker, the number of workers to spread clients over
    by address (`mtop.workers.steer_by_address`; 0: by address pair); a
    listener behind a proxy (``proxy_protocol``, ``ws``), where the
    address the kernel sees is the proxy's, spreads by address pair."""
    from mtop.server import DestinationFactory

    services: list[Any] = []
    for index, item in enumerate(prepared):
        listener = item.config
        port = listener.listen.port if worker_ports is None else worker_ports.get(index, listener.listen.port)
        tunnels = factory if listener.destination is None else DestinationFactory(factory, listener.destination)
        if listener.type == "quic":
            from mtop.quic.server import QuicListenerService, QuicServerProtocol

            protocol = QuicServerProtocol(reactor, tunnels, item.security, handshake_timeout, quic_max_streams)
            services.append(
                QuicListenerService(reactor, protocol, listener, index, port, reuse_port=worker_ports is not None, steer=steer)
            )
            continue
        if worker_ports is None:
            endpoint = listening_endpoint(reactor, listener.listen)
        else:
            from mtop.workers import ReusePortEndpoint

            behind_proxy = listener.proxy_protocol or listener.type == "ws"
            endpoint = ReusePortEndpoint(reactor, listener.listen, port, steer=0 if behind_proxy else steer)
        address = ListenAddress(listener.listen.host, port)
        if listener.type in ("ws", "wss"):
            from mtop.websocket import WebSocketFactory

            tunnels = WebSocketFactory(tunnels, reactor, listener.path, listener.trusted_proxies, ws_ping_interval)
        serving = partial(_tls_serving, tunnels, reactor, handshake_timeout, listener.proxy_protocol, listener.type != "ws")
        services.append(TLSListener(listener, index, endpoint, address, item.security, serving))
    return services


def _tls_serving(
    factory: Any, reactor: Any, handshake_timeout: float, proxy_protocol: bool, tls: bool, current: Callable[[], Any]
) -> Any:
    """The protocol factory of a TCP listener: ``factory``'s protocols over
    TLS with the context ``current()`` returns (``tls``; a ``ws`` listener
    has none), behind a PROXY protocol header if the listener wants one."""
    from mtop.tlstransport import server_tls_factory

    serving = server_tls_factory(factory, current, reactor) if tls else factory
    if proxy_protocol:
        from mtop.proxyproto import ProxyHeaderFactory

        serving = ProxyHeaderFactory(serving, reactor, handshake_timeout, factory.counters)
    return serving


@implementer(ISettingsConsumer)
class TLSListener(ListeningService):
    """A TLS listener of the config (an `IService`): serves the tunnel
    factory over TLS (behind a PROXY protocol header if configured) on
    its address.  New connections get the TLS context of the latest
    settings (`apply_settings`); open ones keep theirs."""

    def __init__(
        self,
        listener: ListenerConfig,
        index: int,
        endpoint: Any,
        address: ListenAddress,
        security: Any,
        serving: Callable[[Callable[[], Any]], Any],
    ):
        """``listener``: its config (number ``index`` in the config);
        ``address``: what ``endpoint`` listens on (a worker's port may
        differ from the config's); ``serving(current)``: the protocol
        factory serving connections with the TLS context ``current()``
        returns."""
        self.listener = listener
        self.index = index
        self.security = security
        note = " (PROXY protocol header required)" if listener.proxy_protocol else ""
        if listener.destination is not None:
            note += f" (every tunnel to {format_hostport(*listener.destination)})"
        label = "MTop TLS"
        if listener.type in ("ws", "wss"):
            label = f"MTop WebSocket ({listener.type})"
            note = f" (path {listener.path})" + note
        super().__init__(endpoint, serving(self.current_security), label, address, note)

    def current_security(self) -> Any:
        """The TLS context a new connection gets."""
        return self.security

    def apply_settings(self, settings: Any) -> None:  # an mtop.settings.RuntimeSettings
        security = settings.listener_security(self.listener, self.index)
        if security is not None:
            self.security = security
