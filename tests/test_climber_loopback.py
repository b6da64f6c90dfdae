"""climber's tunnel opener and port forwards against the in-process MTop
server (real TLS, real SQLite) on 127.0.0.1."""

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from climber.config import ServerEntry
from climber.forward import ForwardConnection
from climber.frontend import Climber, LocalFactory
from climber.pool import ServerPool
from climber.tunnel import TunnelError, TunnelOpener
from mtop.server import ServerSettings


@implementer(IHalfCloseableProtocol)
class EchoAfterEOF(Protocol):
    """Collects until EOF, then answers and closes: needs half-close."""

    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.transport.write(b"got:" + self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def entry(port, paths, **kw):
    values = dict(host="127.0.0.1", port=port, username="alice", password="pw", ca=paths.ca_crt)
    values.update(kw)
    return ServerEntry(**values)


def make_climber(entries, strategy="failover"):
    pool = ServerPool(tuple(entries), strategy, reactor)
    return Climber(TunnelOpener(reactor, pool), reactor, idle_timeout=30, handshake_timeout=5)


def free_port():
    """A local port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def echo_target():
    port = reactor.listenTCP(0, Factory.forProtocol(EchoAfterEOF), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def send_half_close_read(port, data):
    """Blocking client: send, shut the write side, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def forward(server, echo_target):
    """A port forward to the echo target through the server; yields
    (listening port, climber)."""
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    listening = reactor.listenTCP(
        0,
        LocalFactory(ForwardConnection, climber, timeout=5, host="127.0.0.1", port=echo_target),
        interface="127.0.0.1",
    )
    yield listening.getHost().port, climber
    listening.stopListening()
    climber.close_all()


@pytest_twisted.ensureDeferred
async def test_port_forward_carries_data_and_half_close(forward):
    port, climber = forward
    payload = bytes(range(256)) * 4096  # 1 MiB
    answer = await deferToThread(send_half_close_read, port, payload)
    assert answer == b"got:" + payload


@pytest_twisted.ensureDeferred
async def test_repeat_tunnels_resume_the_tls_session(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    resumed = []
    for _ in range(3):
        tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
        resumed.append(tunnel.resumed)
        tunnel.transport.loseConnection()
    assert resumed == [False, True, True]


@pytest_twisted.ensureDeferred
async def test_failover_skips_a_dead_server_and_marks_it_down(server, echo_target):
    factory, port, paths = server
    dead = entry(free_port(), paths)
    climber = make_climber([dead, entry(port, paths)], "failover")
    tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
    assert tunnel.server.entry.port == port
    tunnel.transport.loseConnection()
    first, second = climber.opener.pool.servers
    assert first.down and first.failures == 1
    assert not second.down
    # While it is down the live server comes first: no second failure.
    tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
    tunnel.transport.loseConnection()
    assert first.failures == 1


@pytest_twisted.ensureDeferred
async def test_close_without_reply_is_retried_on_the_next_server(server, echo_target):
    factory, port, paths = server
    # Our server, like the original, closes without a reply on a wrong
    # login: the next server (with the right password) is tried.
    climber = make_climber([entry(port, paths, password="nope"), entry(port, paths)])
    tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
    assert tunnel.server.entry.password == "pw"
    tunnel.transport.loseConnection()
    # A refused login says nothing bad about the server's health.
    assert not any(s.down for s in climber.opener.pool.servers)


@pytest_twisted.ensureDeferred
async def test_explicit_auth_failure_reply_is_final(server, echo_target):
    factory, port, paths = server
    factory.settings = ServerSettings(reply_errors=True, handshake_timeout=5)
    climber = make_climber([entry(port, paths, password="nope"), entry(port, paths)])
    with pytest.raises(TunnelError) as info:
        await climber.opener.open("127.0.0.1", echo_target, 5)
    assert info.value.kind == "auth"


@pytest_twisted.ensureDeferred
async def test_target_failure_reply_is_reported(server):
    factory, port, paths = server
    factory.settings = ServerSettings(reply_errors=True, handshake_timeout=5)
    climber = make_climber([entry(port, paths)])
    with pytest.raises(TunnelError) as info:
        await climber.opener.open("127.0.0.1", free_port(), 5)
    assert info.value.kind == "target"


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_name_is_refused(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(port, paths, host="localhost", sni="wrong.example")])
    with pytest.raises(TunnelError) as info:
        await climber.opener.open("127.0.0.1", echo_target, 5)
    assert info.value.kind == "unreachable"
    assert "wrong.example" in info.value.message


@pytest_twisted.ensureDeferred
async def test_all_servers_down_is_reported(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(free_port(), paths), entry(free_port(), paths)])
    with pytest.raises(TunnelError) as info:
        await climber.opener.open("127.0.0.1", echo_target, 5)
    assert info.value.kind == "unreachable"
    assert all(s.down for s in climber.opener.pool.servers)
