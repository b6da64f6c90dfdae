"""The QUIC listener of the server (``server.type: quic``).

`QuicServerProtocol` is a Twisted `DatagramProtocol` on one UDP port.  It
routes datagrams to connections by destination connection ID, accepts new
connections from Initial packets, answers unknown versions with Version
Negotiation, and gives every bidirectional stream a client opens to a
protocol from the tunnel factory (the same `TunnelProtocol` as for TLS):
one stream, one tunnel, starting with one auth message.

ALPN is required and must be ``server.proto``; a client offering another
fails the handshake (``no_application_protocol``).  A connection must finish
its handshake within the handshake timeout; it is closed after the QUIC
idle timeout without packets (`mtop.listeners.quic_idle_timeout`).  Session tickets are issued and accepted
(single use, kept in memory), so clients resume; early data (0-RTT) is
neither offered in tickets nor accepted (see `FlowControlledConnection`):
a tunnel's first bytes are a replayable login.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from mtop.config import ListenAddress, ListenerConfig
from mtop.interfaces import ISettingsConsumer
from mtop.limits import client_key
from mtop.listening import ipv6_available, listen_failed
from mtop.logs import logger
from mtop.wire import format_address, format_hostport
from mtop.quic import backend as backends
from mtop.quic.connection import (
    DEFAULT_MAX_STREAMS,
    MAX_DATAGRAM_SIZE,
    QuicDriver,
    new_connection,
    size_socket_buffers,
    tuned_configuration,
)
from mtop.quic import udp
from mtop.quic.stream import QuicStreamTransport
from mtop.timers import cancel


#: Session tickets kept for resumption (each is used once).
MAX_TICKETS = 10000
#: A QUIC connection whose last tunnel has ended is closed after this many
#: seconds without a new one (clients open a new connection for the next
#: tunnel; the original's client gives up an idle connection after 10 s).
QUIC_LINGER = 10.0


class QuicConfigError(ValueError):
    """A certificate or key that cannot be loaded; the message names the file."""


def server_configuration(
    crt: str, key: str, proto: str, quic_idle_timeout: float, packet_size: int = MAX_DATAGRAM_SIZE,
    backend: str = "auto",
) -> Any:
    """The QUIC server configuration for ``server.crt``/``key``/``proto``,
    of the library ``backend`` names (`mtop.quic.backend`);
    ``quic_idle_timeout``: seconds without packets that close a connection
    (`mtop.listeners.quic_idle_timeout` derives it from the config)."""
    configuration = tuned_configuration(
        backend,
        is_client=False,
        max_datagram_size=packet_size,
        alpn_protocols=[proto],
        idle_timeout=quic_idle_timeout,
    )
    try:
        configuration.load_cert_chain(crt, key)
    except (OSError, ValueError) as e:
        raise QuicConfigError(f"server.crt/server.key: cannot load {crt} and {key} for QUIC: {e}") from None
    return configuration


def twisted_address(address: Any) -> Any:
    """A Twisted UDP address object for a socket address tuple."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    try:
        version = ipaddress.ip_address(host.split("%", 1)[0]).version
    except ValueError:
        version = 4
    return (IPv6Address if version == 6 else IPv4Address)("UDP", host, port)


class TicketStore:
    """Session tickets issued to clients, each usable once, oldest dropped
    first past `MAX_TICKETS`."""

    def __init__(self, limit: int = MAX_TICKETS):
        self.limit = limit
        self._tickets: OrderedDict[bytes, Any] = OrderedDict()

    def add(self, ticket: Any) -> None:
        self._tickets[ticket.ticket] = ticket
        while len(self._tickets) > self.limit:
            self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> Any:
        return self._tickets.pop(label, None)


class _ServerConnection(QuicDriver):
    """One client's connection to the server.

    It is held to what a TLS connection is held to: it counts toward the
    per-address and global connection limits, and holds a pre-login slot
    (`mtop.limits.ConnectionLimits`) until one of its tunnels logs in.  It
    must finish its QUIC handshake, open a stream and send that stream's
    auth message within the handshake timeout, and it is closed
    `QUIC_LINGER` seconds after its last tunnel ended.  Each connection
    ends with one outcome log line (``quic connection {outcome}``).

    States (metrics): ``handshake`` (QUIC handshake), ``login`` (no tunnel
    logged in yet), ``active`` (tunnels open), ``idle`` (lingering)."""

    #: Why the server closed it, when it did.
    outcome: str | None = None
    logged_in = False
    _requests = 0

    def __init__(self, listener: "QuicServerProtocol", quic: Any, address: Any, client_key: str):
        super().__init__(listener.reactor, quic, listener.send, twisted_address(address))
        self.listener = listener
        self.host = listener.host
        self.client_key = client_key
        self.started = self.reactor.seconds()
        self._tunnels = 0
        self._deadline = self.reactor.callLater(listener.handshake_timeout, self._handshake_expired)
        self._linger: Any = None
        self.limits.opened(self)

    @property
    def limits(self) -> Any:
        return self.listener.factory.limits

    @property
    def state(self) -> str:
        if not self.handshake_complete:
            return "handshake"
        if not self.logged_in:
            return "login"
        return "active" if self._tunnels else "idle"

    def _end(self, outcome: str, reason: str) -> None:
        if self.terminated:
            return
        self.outcome = outcome
        self.close(reason=reason)

    def _handshake_expired(self) -> None:
        self._deadline = None
        if not self.handshake_complete:
            self._end("handshake-timeout", "handshake timeout")
        elif not self.logged_in and not self._requests:
            self._end("no-tunnel", "no tunnel opened in time")
        elif not self.logged_in:
            # A login is pending (its own deadline covers it): look again.
            self._deadline = self.reactor.callLater(1.0, self._handshake_expired)

    def socket(self) -> Any:
        return self.listener.transport.socket

    def evict(self) -> None:
        """`mtop.limits.Holder`: its pre-login slot goes to a client from an
        address holding fewer."""
        self._end("evicted", "server busy")

    def idle_now(self) -> bool:
        """Whether no tunnel is open or asked for on this connection."""
        return self._tunnels <= 0 and not self.terminated

    def tunnel_request(self, tunnel: Any) -> None:
        """A tunnel on this connection has sent its auth message."""
        self._requests += 1

    def tunnel_logged_in(self, tunnel: Any) -> None:
        if not self.logged_in:
            self.logged_in = True
            self.limits.logged_in(self)
            cancel(self._deadline)
            self._deadline = None

    def tunnel_ended(self, tunnel: Any) -> None:
        self._tunnels -= 1
        if self._tunnels <= 0 and not self.terminated:
            self._cancel_linger()
            self._linger = self.reactor.callLater(QUIC_LINGER, self._linger_expired)

    def _cancel_linger(self) -> None:
        cancel(self._linger)
        self._linger = None

    def _linger_expired(self) -> None:
        self._linger = None
        if self._tunnels <= 0:
            self._end("idle", "idle")

    def handshake_completed(self, event: Any) -> None:
        self._log.debug(
            "QUIC connection from {client} ready (ALPN {alpn}, resumed {resumed})",
            client=self.peer, alpn=event.alpn_protocol, resumed=event.session_resumed,
        )

    def accept_stream(self, stream_id: int) -> QuicStreamTransport | None:
        # Only client-initiated bidirectional streams carry tunnels.
        if stream_id & 3 != 0 or not self.handshake_complete or self.listener.stopping:
            return None
        protocol = self.listener.factory.build_stream_protocol(self.peer, self)
        if protocol is None:
            return None
        self._tunnels += 1
        self._cancel_linger()
        stream = QuicStreamTransport(self, stream_id, protocol)
        stream.start()
        return stream

    def connection_id_issued(self, cid: bytes) -> None:
        self.listener.connections[cid] = self

    def connection_id_retired(self, cid: bytes) -> None:
        if self.listener.connections.get(cid) is self:
            del self.listener.connections[cid]

    def connection_terminated(self, reason: str) -> None:
        cancel(self._deadline)
        self._deadline = None
        self._cancel_linger()
        self.listener.forget(self)
        self.limits.closed(self)
        outcome = self.outcome
        if outcome is None:
            if self.listener.stopping:
                outcome = "shutdown"
            elif not self.handshake_complete:
                outcome = "quic-handshake-failed"
            else:
                outcome = "closed"
        self.listener.factory.counters.inc(f"quic.{outcome}")
        self._log.info(
            "quic connection {outcome}: client={client} duration={duration:.3f}s ({reason})",
            outcome=outcome,
            client=format_address(self.peer),
            duration=self.reactor.seconds() - self.started,
            reason=reason,
            quic_outcome=outcome,
        )


class QuicServerProtocol(DatagramProtocol):
    """Serves MTop over QUIC on one UDP port, with streams handed to
    ``factory``'s protocols."""

    _log = logger()
    noisy = False
    stopping = False

    def __init__(
        self, reactor: Any, factory: Any, configuration: Any, handshake_timeout: float,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ):
        """``configuration``: the library's server configuration (its type
        says which library, `mtop.quic.backend.of`); ``max_streams``:
        concurrent tunnels a client may open on one connection."""
        self.reactor = reactor
        self.factory = factory
        self.configuration = configuration
        self.handshake_timeout = handshake_timeout
        self.max_streams = max_streams
        self.connections: dict[bytes, _ServerConnection] = {}
        self.tickets = TicketStore()
        self.host: Any = None

    def startProtocol(self) -> None:
        size_socket_buffers(self.transport)
        self.host = self.transport.getHost()

    def send(self, data: bytes, address: Any) -> None:
        # Straight to the socket: Twisted's UDP write re-validates the
        # address on every datagram.
        self.transport.socket.sendto(data, address)

    def datagramReceived(self, data: bytes, address: Any) -> None:
        configuration = self.configuration
        library = backends.of(configuration)
        try:
            header = library.header(data, configuration.connection_id_length)
        except ValueError:
            return
        supported = configuration.supported_versions
        if header.version is not None and header.version not in supported:
            # Never answer a Version Negotiation packet (reflection loops).
            if not header.version_negotiation:
                self._send_quietly(
                    library.version_negotiation(header.destination_cid, header.source_cid, supported), address
                )
            return
        connection = self.connections.get(header.destination_cid)
        if connection is None:
            if (
                self.stopping
                or not header.initial
                or len(data) < library.SMALLEST_MAX_DATAGRAM_SIZE
                or not self._admissible(address)
            ):
                return
            try:
                quic = new_connection(
                    configuration,
                    self.max_streams,
                    original_destination_connection_id=header.destination_cid,
                    session_ticket_fetcher=self.tickets.pop,
                    session_ticket_handler=self.tickets.add,
                )
            except Exception as e:
                self._log.debug("QUIC connection from {client} refused: {error!r}", client=address, error=e)
                return
            connection = _ServerConnection(self, quic, address, client_key(address[0]))
            self.connections[header.destination_cid] = connection
            self.connections[quic.host_cid] = connection
        connection.datagram_received(data, address)

    def datagramsReceived(self, datagrams: list[bytes], address: Any) -> None:
        """A burst from one address (`mtop.quic.udp.BurstPort`): runs of
        datagrams for one known connection go to it together; the rest one
        by one (a client may send for several connections from one port)."""
        configuration = self.configuration
        header = backends.of(configuration).header
        cid_length = configuration.connection_id_length
        connections = self.connections
        run: list[bytes] = []
        owner = None
        for data in datagrams:
            try:
                connection = connections.get(header(data, cid_length).destination_cid)
            except ValueError:
                continue
            if connection is not owner and run:
                owner.datagrams_received(run, address)
                run = []
            if connection is None:
                owner = None
                self.datagramReceived(data, address)
                continue
            owner = connection
            run.append(data)
        if run:
            owner.datagrams_received(run, address)

    def _admissible(self, address: Any) -> bool:
        """A new connection from a banned address, or over a connection
        limit, is dropped before any handshake work (its streams would be
        refused anyway)."""
        return self.factory.admission_refusal(twisted_address(address)) is None

    def _send_quietly(self, data: bytes, address: Any) -> None:
        try:
            self.transport.write(data, address)
        except OSError:
            pass

    def forget(self, connection: _ServerConnection) -> None:
        for cid in [cid for cid, c in self.connections.items() if c is connection]:
            del self.connections[cid]

    def stop_accepting(self) -> None:
        """Take no new connection or stream; close the connections that
        carry no tunnel now (their clients open the next one elsewhere)."""
        self.stopping = True
        for connection in set(self.connections.values()):
            if connection.idle_now():
                connection.close(reason="server draining")

    def close_all(self) -> None:
        """Close every connection (CONNECTION_CLOSE goes out now) and accept
        no more; the socket can go right after."""
        self.stopping = True
        for connection in set(self.connections.values()):
            connection.close(reason="server shutting down")
            connection.abandon("server shutting down")


@implementer(ISettingsConsumer)
class QuicListenerService(Service):
    """A QUIC listener of the config (an `IService`): listens for QUIC on
    its UDP address while running and logs the address bound (``MTop QUIC
    listening on host:port``, as the TLS listener does).  New connections
    get the QUIC configuration (certificate) of the latest settings
    (`apply_settings`); open ones keep theirs.

    If it cannot listen, it logs one critical line naming the address and
    the cause and raises `mtop.listening.ListenFailed` from its start (the
    tap decides what happens then)."""

    _log = logger()

    def __init__(
        self,
        reactor: Any,
        protocol: QuicServerProtocol,
        listener: ListenerConfig,
        index: int = 0,
        port: int | None = None,
        label: str = "MTop QUIC",
        reuse_port: bool = False,
        steer: int = 0,
    ):
        """``listener``: its config (number ``index`` in the config);
        ``port``: the UDP port, if not the config's (a worker's);
        ``steer``: see `mtop.workers.reuseport_socket`."""
        self.reactor = reactor
        self.protocol = protocol
        self.listener = listener
        self.index = index
        self.interface = listener.listen.host
        self.port_number = listener.listen.port if port is None else port
        self.label = label
        #: Bind with SO_REUSEPORT (server workers share the port).
        self.reuse_port = reuse_port
        self.steer = steer
        self.port: Any = None

    def apply_settings(self, settings: Any) -> None:  # an mtop.settings.RuntimeSettings
        security = settings.listener_security(self.listener, self.index)
        if security is not None:
            self.protocol.configuration = security

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        super().startService()

    def _listen(self) -> None:
        interface = self.interface
        if interface is None:
            interface = "::" if ipv6_available() else "0.0.0.0"
        try:
            if self.reuse_port:
                self.port = self._adopt_reuseport()
            else:
                self.port = udp.listen(self.reactor, self.port_number, self.protocol, interface)
        except Exception as e:
            raise listen_failed(self._log, self.label, ListenAddress(self.interface, self.port_number), e) from None
        host = self.port.getHost()
        shown = f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        destination = getattr(self.protocol.factory, "destination", None)
        self._log.info(
            "{label} listening on {address} ({library}){note}",
            label=self.label, address=shown, port=host.port,
            library=backends.describe(backends.of(self.protocol.configuration)),
            note=f" (every tunnel to {format_hostport(*destination)})" if destination else "",
        )

    def _adopt_reuseport(self) -> Any:
        import socket

        from mtop.workers import reuseport_socket

        sock = reuseport_socket(ListenAddress(self.interface, self.port_number), socket.SOCK_DGRAM, steer=self.steer)
        try:
            return self.reactor.adoptDatagramPort(sock.fileno(), sock.family, self.protocol, maxPacketSize=65535)
        finally:
            sock.close()

    def stop_accepting(self) -> None:
        """A drain begins: no new connection and no new stream; connections
        that carry no tunnel are closed, the others go on (the port stays
        open for them until the service stops)."""
        self.protocol.stop_accepting()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is None:
            return None
        self.protocol.close_all()
        port, self.port = self.port, None
        return port.stopListening()
