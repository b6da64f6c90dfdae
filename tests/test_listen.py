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
from mtop import listen
from mtop.config import ListenAddress


@pytest.fixture
def passed(monkeypatch):
    """``passed(*sockets)``: as if systemd had passed these (consecutive
    descriptors, as systemd numbers them), with ``LISTEN_*`` as it sets them."""
    monkeypatch.setattr(listen, "_systemd_sockets", None)
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
        listen.systemd_sockets(environ, start=first)
        return environ

    yield pass_sockets
    for sock in listen._systemd_sockets or []:
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
    assert len(listen.systemd_sockets()) == 1  # the UDP one is not for TCP listeners
    endpoint = listen.server_endpoint(reactor, ListenAddress("127.0.0.1", port))
    assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    assert listen.systemd_sockets() == []  # adopted once
    listening = yield endpoint.listen(Factory.forProtocol(EchoAfterEOF))
    try:
        assert listening.getHost().port == port
        from twisted.internet.threads import deferToThread

        echoed = yield deferToThread(send_half_close_read, port, b"through the adopted socket")
        assert echoed == b"got:through the adopted socket"
    finally:
        yield listening.stopListening()


def test_other_addresses_bind_their_own(passed):
    sock, port = listening_socket()
    passed(sock)
    assert isinstance(listen.server_endpoint(reactor, ListenAddress("127.0.0.1", port + 1)), TCP4ServerEndpoint)
    assert isinstance(listen.server_endpoint(reactor, ListenAddress("127.0.0.2", port)), TCP4ServerEndpoint)
    # ":port" means every interface: only a socket bound to the wildcard.
    assert not isinstance(listen.server_endpoint(reactor, ListenAddress(None, port)), AdoptedStreamServerEndpoint)
    assert len(listen.systemd_sockets()) == 1


def test_wildcard_address_adopts_a_wildcard_socket(passed):
    sock, port = listening_socket("0.0.0.0")
    passed(sock)
    assert isinstance(listen.server_endpoint(reactor, ListenAddress(None, port)), AdoptedStreamServerEndpoint)


def test_no_sockets_without_systemd(monkeypatch):
    monkeypatch.setattr(listen, "_systemd_sockets", None)
    assert listen.systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}) == []
