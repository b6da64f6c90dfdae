"""Client side of MTop over QUIC: connections to one server, each carrying
many tunnels (a bidirectional stream each).

`QuicClientConnection` is one connection on its own UDP port.
`QuicClientPool` hands out streams for one server: a stream on a
connection that has room (fewer than ``max_streams`` streams), else on a
new connection.  Connections that end (idle timeout, error, the server
going away) leave the pool, so the next tunnel opens a new one; a
connection left without streams closes itself after a short linger, so no
stale connection is picked up after the server idled it out.

Session tickets from the server are kept and used by the next connection
(resumption).  They are stripped of their early-data permission: 0-RTT data
is replayable, and a tunnel's first bytes are its login.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from mtop.logs import logger
from mtop.quic.connection import (
    MAX_DATAGRAM_SIZE,
    QuicDriver,
    new_connection,
    size_socket_buffers,
    tuned_configuration,
)
from mtop.quic.server import twisted_address
from mtop.quic import udp
from mtop.quic.stream import QuicStreamTransport
from mtop.timers import cancel

#: Streams per connection before another connection is opened.
DEFAULT_MAX_STREAMS = 100
#: Seconds a connection without streams stays open for the next tunnel.
LINGER = 20.0
#: Seconds between PINGs that keep a connection with tunnels alive.
KEEPALIVE = 15.0


class QuicConnectError(Exception):
    """A QUIC connection could not be established; the message says why."""


def client_configuration(
    server_name: str, proto: str, ca: str | None, insecure: bool, idle_timeout: float,
    packet_size: int = MAX_DATAGRAM_SIZE, backend: str = "auto",
) -> Any:
    """The client configuration for one server, of the library ``backend``
    names (`mtop.quic.backend`)."""
    import ssl

    configuration = tuned_configuration(
        backend,
        is_client=True,
        max_datagram_size=packet_size,
        alpn_protocols=[proto],
        server_name=server_name,
        idle_timeout=idle_timeout,
        verify_mode=ssl.CERT_NONE if insecure else ssl.CERT_REQUIRED,
    )
    if ca and not insecure:
        # Without a CA file the library's default store is trusted.
        configuration.load_verify_locations(cafile=ca)
    return configuration


class _ClientUDP(DatagramProtocol):
    noisy = False

    def __init__(self, connection: "QuicClientConnection"):
        self.connection = connection

    def datagramReceived(self, data: bytes, address: Any) -> None:
        self.connection.datagram_received(data, address)

    def datagramsReceived(self, datagrams: list[bytes], address: Any) -> None:
        self.connection.datagrams_received(datagrams, address)


class QuicClientConnection(QuicDriver):
    """One connection to a server; `open_stream` once `when_ready` fired."""

    _ended = False

    def __init__(
        self,
        reactor: Any,
        configuration: Any,
        host: str,
        port: int,
        handshake_timeout: float,
        on_ended: Callable[["QuicClientConnection"], None],
        on_ticket: Callable[[Any], None],
    ):
        quic = new_connection(configuration, session_ticket_handler=on_ticket)
        super().__init__(reactor, quic, self._send_datagram, None)
        self.server = (host, port)
        self.on_ended = on_ended
        self.reserved = 0  # streams open or promised
        self.resumed = False
        self._waiters: list[Deferred] = []
        self._udp_port: Any = None
        self._linger: Any = None
        self._keepalive: Any = None
        self._deadline = reactor.callLater(handshake_timeout, self._handshake_expired)
        self._resolve(host, port)

    @property
    def usable(self) -> bool:
        return not self.terminated and not self.quic.closing

    # Connecting

    def _resolve(self, host: str, port: int) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d = deferToThread(socket.getaddrinfo, host, port, 0, socket.SOCK_DGRAM)
            d.addCallbacks(self._resolved, self._resolve_failed, callbackArgs=(port,), errbackArgs=(host,))
            return
        self._connect(host, port)

    def _resolved(self, infos: list, port: int) -> None:
        # IPv4 first, as Go's net.ResolveUDPAddr (the original client) does.
        infos = sorted(infos, key=lambda info: info[0] != socket.AF_INET)
        self._connect(infos[0][4][0], port)

    def _resolve_failed(self, failure: Failure, host: str) -> None:
        self.shut(f"cannot resolve {host}")

    def _connect(self, ip: str, port: int) -> None:
        if self.terminated:
            return
        family_any = "::" if ":" in ip else "0.0.0.0"
        try:
            self._udp_port = udp.listen(self.reactor, 0, _ClientUDP(self), family_any)
        except Exception as e:
            self.shut(f"cannot open a UDP socket: {e}")
            return
        size_socket_buffers(self._udp_port)
        self.peer = twisted_address((ip, port))
        self.host = self._udp_port.getHost()
        self.quic.connect((ip, port), self.reactor.seconds())
        self.flush()

    def socket(self) -> Any:
        return None if self._udp_port is None else self._udp_port.socket

    def _send_datagram(self, data: bytes, address: Any) -> None:
        self._udp_port.socket.sendto(data, address)

    def _handshake_expired(self) -> None:
        self._deadline = None
        if not self.handshake_complete:
            self.shut("no QUIC handshake within the timeout")

    def shut(self, reason: str) -> None:
        """Close (CONNECTION_CLOSE if it got as far as sending) and leave
        the pool."""
        if self.terminated:
            return
        if self._udp_port is not None and not self.quic.closing:
            self.close(reason=reason)
        self._end(reason)


    def when_ready(self) -> Deferred:
        """Fires with this connection once the handshake is done, or fails
        with `QuicConnectError`."""
        d: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        if self.terminated:
            d.errback(QuicConnectError(self.close_reason or "connection closed"))
        elif self.handshake_complete:
            d.callback(self)
        else:
            self._waiters.append(d)
        return d

    # Streams

    def open_stream(self, protocol: Any) -> QuicStreamTransport:
        """A new stream carrying ``protocol`` (connected, and told the
        handshake is done when it listens for that)."""
        self._cancel_linger()
        stream = QuicStreamTransport(self, self.quic.get_next_available_stream_id(), protocol)
        stream.start()
        if IHandshakeListener.providedBy(protocol) and not stream.lost:
            protocol.handshakeCompleted()
        return stream

    def stream_closed(self, stream: QuicStreamTransport) -> None:
        self.reserved -= 1
        if self.reserved <= 0 and not self.terminated:
            self._cancel_linger()
            self._linger = self.reactor.callLater(LINGER, self._linger_expired)

    def release(self) -> None:
        """A promised stream that will not be opened after all."""
        self.stream_closed(None)  # type: ignore[arg-type]

    def _linger_expired(self) -> None:
        self._linger = None
        if self.reserved <= 0:
            self._log.debug("QUIC connection to {server} unused; closing", server=self.peer)
            self.shut("unused")

    def _cancel_linger(self) -> None:
        cancel(self._linger)
        self._linger = None

    def _keep_alive(self) -> None:
        self._keepalive = None
        if self.terminated:
            return
        if self.streams:
            self.quic.send_ping(0)
            self.schedule_flush()
        self._keepalive = self.reactor.callLater(KEEPALIVE, self._keep_alive)

    # Driver hooks

    def handshake_completed(self, event: Any) -> None:
        cancel(self._deadline)
        self._deadline = None
        self.resumed = bool(event.session_resumed)
        self._keepalive = self.reactor.callLater(KEEPALIVE, self._keep_alive)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    def connection_terminated(self, reason: str) -> None:
        self._end(reason)

    def _end(self, reason: str) -> None:
        """Leave the pool; fail whoever waits; give the UDP port back once
        the library has nothing more to send."""
        first = not self._ended
        self._ended = True
        self.close_reason = self.close_reason or reason
        for call in (self._deadline, self._linger, self._keepalive):
            cancel(call)
        self._deadline = self._linger = self._keepalive = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(QuicConnectError(reason))
        if first:
            self.on_ended(self)
            # The CONNECTION_CLOSE has gone out in flush(); the port can go.
            self.reactor.callLater(0.5, self._stop_udp)
        for stream in list(self.streams.values()):
            stream.connection_lost(reason)

    def _stop_udp(self) -> None:
        self.abandon(self.close_reason or "closed")
        if self._udp_port is not None:
            port, self._udp_port = self._udp_port, None
            port.stopListening()


class QuicClientPool:
    """The QUIC connections to one server, and streams on them."""

    _log = logger()

    def __init__(self, reactor: Any, host: str, port: int, configuration: Any, max_streams: int = DEFAULT_MAX_STREAMS):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.configuration = configuration
        self.max_streams = max_streams
        self.connections: list[QuicClientConnection] = []
        self.ticket: Any = None

    def open(self, protocol: Any, timeout: float) -> Deferred:
        """A Deferred that fires with the stream transport once ``protocol``
        is connected over a stream, or fails with `QuicConnectError`.
        Cancelling it gives up the attempt."""
        connection = next((c for c in self.connections if c.usable and c.reserved < self.max_streams), None)
        if connection is None:
            connection = self._new_connection(timeout)
        connection.reserved += 1
        waiting = connection.when_ready()
        opened: list[QuicStreamTransport] = []

        def ready(conn: QuicClientConnection) -> QuicStreamTransport:
            if not conn.usable:
                conn.release()
                raise QuicConnectError(conn.close_reason or "connection closed")
            stream = conn.open_stream(protocol)
            opened.append(stream)
            return stream

        def failed(failure: Failure) -> Failure:
            if not opened:
                connection.release()
            return failure

        waiting.addCallbacks(ready, failed)
        return waiting

    def _new_connection(self, timeout: float) -> QuicClientConnection:
        configuration = self.configuration
        if self.ticket is not None and self.ticket.is_valid:
            configuration = replace(configuration, session_ticket=self.ticket)
        connection = QuicClientConnection(
            self.reactor, configuration, self.host, self.port, timeout, self._ended, self._keep_ticket
        )
        self.connections.append(connection)
        return connection

    def _keep_ticket(self, ticket: Any) -> None:
        ticket.max_early_data_size = None  # no 0-RTT
        self.ticket = ticket

    def _ended(self, connection: QuicClientConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.shut("client shutting down")
