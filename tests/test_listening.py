"""Listen endpoints: sockets passed by systemd (socket activation) are
adopted for the listen address they are bound to."""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory

from helpers import EchoAfterEOF, send_half_close_read
from mtop import listening
from mtop.config import ListenAddress


@pytest.fixture
def passed(monkeypatch):
    """``passed(*sockets)``: as if systemd had passed these (consecutive
    descriptors, as systemd numbers them), with ``LISTEN_*`` as it sets them."""
    monkeypatch.setattr(listening, "_systemd_sockets", None)
    opened: list[int] = []

    def pass_sockets(*sockets: socket.socket) -> dict:
        first = os.dup(sockets[0].fileno())
        opened.append(first)
        for i, sock in enumerate(sockets[1:], 1):
            os.dup2(sock.fileno(), first + i)
            opened.append(first + i)
        for sock in sockets:
            sock.close()
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(sockets)),
                   "LISTEN_FDNAMES": ":".join(["mtop.socket"] * len(sockets))}
        listening.systemd_sockets(environ, start=first)
        return environ

    yield pass_sockets
    for sock in listening._systemd_sockets or []:
        sock.close()
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def listening_socket(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(8)
    return sock, sock.getsockname()[1]


@pytest_twisted.inlineCallbacks
def test_a_passed_socket_bound_to_the_address_is_adopted(passed):
    sock, port = listening_socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    environ = passed(sock, udp)
    # ListenFDs consumed the variables, as under systemd.
    assert "LISTEN_FDS" not in environ
    assert len(listening.systemd_sockets()) == 1  # the UDP one is not for TCP listeners
    endpoint = listening.listening_endpoint(reactor, ListenAddress("127.0.0.1", port))
    assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    assert listening.systemd_sockets() == []  # adopted once
    port_listening = yield endpoint.listen(Factory.forProtocol(EchoAfterEOF))
    try:
        assert port_listening.getHost().port == port
        from twisted.internet.threads import deferToThread

        echoed = yield deferToThread(send_half_close_read, port, b"through the adopted socket")
        assert echoed == b"got:through the adopted socket"
    finally:
        yield port_listening.stopListening()


def test_other_addresses_bind_their_own(passed):
    sock, port = listening_socket()
    passed(sock)
    assert isinstance(listening.listening_endpoint(reactor, ListenAddress("127.0.0.1", port + 1)), TCP4ServerEndpoint)
    assert isinstance(listening.listening_endpoint(reactor, ListenAddress("127.0.0.2", port)), TCP4ServerEndpoint)
    # ":port" means every interface: only a socket bound to the wildcard.
    assert not isinstance(listening.listening_endpoint(reactor, ListenAddress(None, port)), AdoptedStreamServerEndpoint)
    assert len(listening.systemd_sockets()) == 1


def test_wildcard_address_adopts_a_wildcard_socket(passed):
    sock, port = listening_socket("0.0.0.0")
    passed(sock)
    assert isinstance(listening.listening_endpoint(reactor, ListenAddress(None, port)), AdoptedStreamServerEndpoint)


def test_no_sockets_without_systemd(monkeypatch):
    monkeypatch.setattr(listening, "_systemd_sockets", None)
    assert listening.systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}) == []


# A listener that cannot listen: one critical line, ListenFailed, and the
# tap's root ends the process (exit status 1).


def busy_port(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    return sock, sock.getsockname()[1]


def critical_lines(events) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.critical]


def test_a_listener_that_cannot_listen_says_where_and_why(events):
    from twisted.internet.protocol import Factory

    sock, port = busy_port()
    try:
        address = ListenAddress("127.0.0.1", port)
        service = listening.ListeningService(listening.listening_endpoint(reactor, address), Factory(), "Test proxy", address)
        with pytest.raises(listening.ListenFailed) as info:
            service.privilegedStartService()
        line = f"Test proxy cannot listen on 127.0.0.1:{port}: address already in use"
        assert str(info.value) == line
        assert critical_lines(events) == [line]
        assert service.port is None and not service.running
    finally:
        sock.close()


def test_the_tap_root_ends_the_process_with_status_1():
    from mtop.startup import TapService

    class Failing(listening.ListeningService):
        def __init__(self):
            pass

        def privilegedStartService(self):
            raise listening.ListenFailed("x cannot listen on :1: permission denied")

        startService = privilegedStartService

    root = TapService()
    Failing().setServiceParent(root)
    with pytest.raises(SystemExit) as info:
        root.privilegedStartService()
    assert info.value.code == 1
    with pytest.raises(SystemExit) as info:
        root.startService()
    assert info.value.code == 1


def test_listen_failure_causes():
    import errno

    from twisted.internet.error import CannotListenError

    in_use = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    assert listening.listen_failure_cause(CannotListenError("127.0.0.1", 80, in_use)) == "address already in use"
    assert listening.listen_failure_cause(PermissionError(errno.EACCES, "Permission denied")) == "permission denied"
    assert listening.listen_failure_cause(ValueError("Odd")) == "odd"


def quic_listener(port: int):
    from twisted.internet.protocol import DatagramProtocol

    from mtop.config import ListenerConfig
    from mtop.quic.server import QuicListenerService

    class Protocol(DatagramProtocol):
        def close_all(self):
            pass

    listener = ListenerConfig("quic", ListenAddress("127.0.0.1", port), "server.crt", "server.key", "mtop")
    return QuicListenerService(reactor, Protocol(), listener)


def test_a_quic_listener_that_cannot_listen_says_where_and_why(events):
    sock, port = busy_port(socket.SOCK_DGRAM)
    try:
        service = quic_listener(port)
        with pytest.raises(listening.ListenFailed) as info:
            service.privilegedStartService()
        line = f"MTop QUIC cannot listen on 127.0.0.1:{port}: address already in use"
        assert str(info.value) == line
        assert critical_lines(events) == [line]
    finally:
        sock.close()


def test_server_listeners_take_settings():
    from zope.interface.verify import verifyObject

    from mtop.interfaces import ISettingsConsumer

    assert verifyObject(ISettingsConsumer, quic_listener(0))
