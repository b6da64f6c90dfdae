"""Abuse resistance on 127.0.0.0/8 with real TLS and real SQLite: the
probe-resistant fallback, the PROXY protocol, failed-login throttling,
connection limits, slowloris, equal failure timing."""

import socket
import sqlite3
import ssl
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread, deferToThreadPool

from helpers import LOOPBACK_ACL
from mtop import passwords, wire
from mtop.auth import Authenticator
from mtop.certs import init_certs
from mtop.database import BASE_TABLE
from mtop.dialer import Dialer
from mtop.limits import AuthThrottle, ConnectionLimits, LimitSettings, ThrottleSettings
from mtop.proxyproto import ProxyHeaderFactory
from mtop.server import TunnelSettings, TunnelFactory
from mtop.tls import server_context
from mtop.tlstransport import server_tls_factory
from mtop.userstore.sqlite import SQLiteUserStore

PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nordinary site"


class FakeWebServer(Protocol):
    """Answers whatever arrives with a page, like any web server would
    answer a request it does not understand, and records what it got."""

    received: list

    def dataReceived(self, data):
        self.factory.received.append(data)
        self.transport.write(PAGE)
        self.transport.loseConnection()


class CountingStore(SQLiteUserStore):
    """The real SQLite store, counting its lookups."""

    lookups = 0

    def lookup(self, username):
        self.lookups += 1
        return super().lookup(username)


#: (username, salt, stored hash) of the test users.
USERS = (("alice", "s", passwords.legacy_hash("s", "pw")), ("bob", "", passwords.scrypt_hash("bob-pw")))


class Server:
    """An MTop server in this process on 127.0.0.1 (real TLS) with alice
    (legacy hash, password pw) and bob (scrypt, bob-pw) in real SQLite, or
    in ``store`` (a started store holding them); ``workers``: a
    `FairWorkers` for the password checks (else the reactor's threads)."""

    def __init__(
        self, tmp_path, settings=TunnelSettings(handshake_timeout=5), limits=None, throttle=None, proxy=False, store=None, workers=None
    ):
        self.paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
        if store is None:
            db_path = tmp_path / "users.db"
            db = sqlite3.connect(db_path)
            db.execute(BASE_TABLE)
            for name, salt, hashed in USERS:
                db.execute("INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", (name, salt, hashed))
            db.commit()
            db.close()
            store = CountingStore(str(db_path))
            store.startService()
        self.store = store
        self.workers = workers
        auth = Authenticator(
            self.store,
            reactor,
            lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a),
            cache_ttl=0,
            workers=workers,
        )
        self.factory = TunnelFactory(
            auth,
            Dialer(reactor, 5, LOOPBACK_ACL),
            reactor,
            settings,
            limits=ConnectionLimits(limits) if limits else None,
            throttle=AuthThrottle(reactor, throttle) if throttle else None,
        )
        ctx = server_context(self.paths.server_crt, self.paths.server_key, "mtop", fallback=settings.fallback is not None)
        listening = server_tls_factory(self.factory, lambda: ctx)
        if proxy:
            listening = ProxyHeaderFactory(listening, reactor, settings.handshake_timeout, self.factory.counters)
        # The backlog twistd's listeners use (mtop.listening.BACKLOG).
        self.listening = reactor.listenTCP(0, listening, backlog=1024, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def close(self):
        if self.workers is not None:
            self.workers.stop()
        self.store.stopService()
        for tunnel in list(self.factory.tunnels):
            tunnel.transport.abortConnection()
        return self.listening.stopListening()


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(**kwargs):
        server = Server(tmp_path / f"s{len(servers)}", **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def web():
    factory = Factory.forProtocol(FakeWebServer)
    factory.received = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    port.stopListening()


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def echo_target():
    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def tls_client(server, alpn=("mtop",), source="127.0.0.1", prefix=b""):
    """A blocking TLS client socket to the server (after ``prefix`` in the
    clear, e.g. a PROXY header)."""
    context = ssl.create_default_context(cafile=server.paths.ca_crt)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        context.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0))
    if prefix:
        raw.sendall(prefix)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_all(sock):
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return b"".join(chunks)


def tunnel_echo(server, user="alice", password="pw", target_port=0, payload=b"ping", **kwargs):
    """One tunnel to the echo target: auth, then ``payload``; the reply
    and the echo (or, when refused, all that came back)."""
    with tls_client(server, **kwargs) as s:
        s.sendall(wire.encode_auth(wire.AuthRequest(user, password, "127.0.0.1", target_port)) + payload)
        reply = s.recv(2)
        if reply != wire.REPLY_SUCCESS:
            return reply + read_all(s)
        echoed = b""
        while len(echoed) < len(payload) and (chunk := s.recv(65536)):
            echoed += chunk
        return reply + echoed


async def settled(server):
    """Wait (up to 5 s) until the server has finished every tunnel."""
    for _ in range(100):
        if not server.factory.tunnels:
            return
        await deferLater(reactor, 0.05, lambda: None)


# Probe resistance


@pytest_twisted.ensureDeferred
async def test_browser_alpn_gets_the_fallback_site(make_server, web):
    factory, web_port = web
    server = make_server(settings=TunnelSettings(handshake_timeout=5, fallback=("127.0.0.1", web_port)))

    def browse():
        with tls_client(server, alpn=("h2", "http/1.1")) as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            s.sendall(b"GET / HTTP/1.1\r\nHost: vpn.example.com\r\n\r\n")
            return read_all(s)

    assert await deferToThread(browse) == PAGE
    assert factory.received == [b"GET / HTTP/1.1\r\nHost: vpn.example.com\r\n\r\n"]
    assert server.store.lookups == 0


@pytest_twisted.ensureDeferred
async def test_non_mtop_bytes_and_failed_logins_get_the_fallback_site(make_server, web, echo_target):
    factory, web_port = web
    server = make_server(settings=TunnelSettings(handshake_timeout=5, fallback=("127.0.0.1", web_port)))

    def probe():
        with tls_client(server) as s:  # a client that offers our ALPN, then speaks HTTP
            s.sendall(b"GET /probe HTTP/1.1\r\n\r\n")
            return read_all(s)

    assert await deferToThread(probe) == PAGE
    answer = await deferToThread(tunnel_echo, server, password="wrong", target_port=echo_target)
    assert answer == PAGE
    sent = wire.encode_auth(wire.AuthRequest("alice", "wrong", "127.0.0.1", echo_target))
    assert factory.received[-1].startswith(wire.without_password(sent))  # the password masked
    # A real client still gets its tunnel.
    assert await deferToThread(tunnel_echo, server, target_port=echo_target) == b"\x01\x00ping"
    assert server.factory.counters["fallback"] == 2


@pytest_twisted.ensureDeferred
async def test_without_fallback_other_alpn_fails_the_handshake(make_server):
    server = make_server()

    def browse():
        with tls_client(server, alpn=("http/1.1",)):
            pass

    with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
        await deferToThread(browse)


# PROXY protocol


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_gives_the_real_client_address_to_logs_and_throttle(make_server, echo_target, events):
    server = make_server(proxy=True, throttle=ThrottleSettings(max_failures=2, window=60, ban=60))
    v1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 50123 443\r\n"
    other = b"PROXY TCP4 198.51.100.8 192.0.2.1 50124 443\r\n"
    assert await deferToThread(tunnel_echo, server, target_port=echo_target, prefix=v1) == b"\x01\x00ping"
    for _ in range(2):
        assert await deferToThread(tunnel_echo, server, password="bad", target_port=echo_target, prefix=v1) == b""
    # 198.51.100.7 is banned now; 198.51.100.8 (same TCP peer) is not.
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        await deferToThread(tunnel_echo, server, target_port=echo_target, prefix=v1)
    assert await deferToThread(tunnel_echo, server, target_port=echo_target, prefix=other) == b"\x01\x00ping"
    await settled(server)
    clients = {
        e["client"] for e in events if e.get("tunnel_event") and getattr(e.get("log_source"), "factory", None) is server.factory
    }
    assert clients == {"198.51.100.7:50123", "198.51.100.8:50124"}
    assert server.factory.counters["refused.banned"] == 1


def _connect_and_close(port: int, send: bytes = b"", reset: bool = False) -> None:
    """A load balancer's TCP check: connect, maybe send, close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if send:
        sock.sendall(send)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("proxy", [False, True])
async def test_health_checks_are_counted_as_checks_and_not_logged_at_info(make_server, echo_target, events, proxy):
    """A TCP check (connect, close; by FIN or by reset) and HAProxy's
    ``check-send-proxy`` (a PROXY v2 LOCAL header, then close or a TLS
    hello it does not finish) are checks: counted as such, not as
    tunnels, and logged at debug level only; a client that sends bytes
    and fails is still a tunnel."""
    from test_proxyproto import v2

    server = make_server(proxy=proxy)
    local = v2(command=0, family=0, body=b"") if proxy else b""
    await deferToThread(_connect_and_close, server.port, local)
    await deferToThread(_connect_and_close, server.port, local, True)
    if proxy:
        await deferToThread(_connect_and_close, server.port, local + b"\x16\x03\x01\x00\x05hello")
    counters = server.factory.counters
    for _ in range(100):  # the server may not have seen the last close yet
        if counters["checks"] >= (3 if proxy else 2):
            break
        await deferLater(reactor, 0.05, lambda: None)
    await settled(server)
    assert counters["checks"] == (3 if proxy else 2)
    assert not [name for name in counters.snapshot() if name.startswith("tunnels.")]
    # A real client's failure is a tunnel's.
    prefix = v2() if proxy else b""
    await deferToThread(_connect_and_close, server.port, prefix + b"\x16\x03\x01\x00\x05hello")
    assert await deferToThread(tunnel_echo, server, target_port=echo_target, prefix=prefix) == b"\x01\x00ping"
    for _ in range(100):
        if sum(n for name, n in counters.snapshot().items() if name.startswith("tunnels.")) >= 2:
            break
        await deferLater(reactor, 0.05, lambda: None)
    await settled(server)
    assert counters["checks"] == (3 if proxy else 2)
    tunnels = {name: n for name, n in counters.snapshot().items() if name.startswith("tunnels.")}
    assert tunnels["tunnels.tls-error"] == 1 and sum(tunnels.values()) == 2, tunnels
    mine = [e for e in events if e.get("tunnel_event") and getattr(e.get("log_source"), "factory", None) is server.factory]
    assert len(mine) == 2 and "check" not in {e["outcome"] for e in mine}


@pytest_twisted.ensureDeferred
async def test_proxy_listener_refuses_connections_without_a_header(make_server):
    server = make_server(proxy=True)
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        await deferToThread(tunnel_echo, server)
    assert server.factory.counters["refused.proxy-header"] == 1


# Throttling, limits, timing


@pytest_twisted.ensureDeferred
async def test_banned_address_is_closed_before_tls_without_touching_the_store(make_server, echo_target):
    server = make_server(throttle=ThrottleSettings(max_failures=3, window=60, ban=60))
    for _ in range(3):
        assert await deferToThread(tunnel_echo, server, password="bad", target_port=echo_target) == b""
    assert server.store.lookups == 3

    def handshake():
        with tls_client(server):
            pass

    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        await deferToThread(handshake)
    assert server.store.lookups == 3
    # Another address is unaffected.
    answer = await deferToThread(tunnel_echo, server, target_port=echo_target, source="127.0.0.2")
    assert answer == b"\x01\x00ping"


@pytest_twisted.ensureDeferred
async def test_per_client_limit_with_real_connections(make_server, echo_target):
    server = make_server(limits=LimitSettings(max_per_client=2))

    def scenario():
        held = [tls_client(server), tls_client(server)]
        try:
            with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
                with tls_client(server):
                    pass
            return tunnel_echo(server, target_port=echo_target, source="127.0.0.3")
        finally:
            for s in held:
                s.close()

    assert await deferToThread(scenario) == b"\x01\x00ping"
    assert server.factory.counters["refused.max-per-client"] == 1
    await settled(server)
    assert await deferToThread(tunnel_echo, server, target_port=echo_target) == b"\x01\x00ping"


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_wrong_password_take_the_same_time(make_server, echo_target):
    delay = 0.6
    server = make_server(settings=TunnelSettings(handshake_timeout=5, auth_failure_delay=delay))

    def timed(user, password):
        with tls_client(server) as s:
            start = time.monotonic()
            s.sendall(wire.encode_auth(wire.AuthRequest(user, password, "127.0.0.1", echo_target)))
            assert read_all(s) == b""
            return time.monotonic() - start

    # alice has a fast legacy hash, bob scrypt, nobody no row at all.
    times = {}
    for user in ("alice", "bob", "nobody"):
        times[user] = await deferToThread(timed, user, "wrong")
    assert all(delay - 0.02 <= t < delay + 0.3 for t in times.values()), times
    assert max(times.values()) - min(times.values()) < 0.25, times


# Slowloris


def client_hello():
    """The bytes of a real TLS 1.3 ClientHello."""
    context = ssl.create_default_context()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="vpn.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Trickler(Protocol):
    """Sends a real ClientHello one byte every 0.25 s (it would take
    minutes to finish)."""

    def __init__(self, done, hello):
        self.done = done
        self.hello = hello
        self.closed_at = None

    def connectionMade(self):
        self.loop = LoopingCall(self._next)
        self.loop.clock = reactor
        self.loop.start(0.25)

    def _next(self):
        byte, self.hello = self.hello[:1], self.hello[1:]
        self.transport.write(byte)

    def connectionLost(self, reason):
        self.closed_at = time.monotonic()
        if self.loop.running:
            self.loop.stop()
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_slowloris_tricklers_are_cut_at_the_deadline_while_clients_are_served(make_server, echo_target):
    deadline = 2.0
    server = make_server(settings=TunnelSettings(handshake_timeout=deadline))
    started = time.monotonic()
    tricklers, waits = [], []
    hello = client_hello()
    assert len(hello) > 100
    for i in range(400):
        done = Deferred()
        trickler = Trickler(done, hello)
        tricklers.append(trickler)
        waits.append(done)
        source = f"127.0.{1 + i // 200}.{1 + i % 200}"
        reactor.connectTCP("127.0.0.1", server.port, ClientFactory.forProtocol(lambda t=trickler: t), bindAddress=(source, 0))
    await deferLater(reactor, 0.5, lambda: None)
    assert len(server.factory.tunnels) >= 390
    served = []
    for _ in range(5):
        served.append(await deferToThread(tunnel_echo, server, target_port=echo_target))
    assert served == [b"\x01\x00ping"] * 5
    await DeferredList(waits)
    closed = [t.closed_at - started for t in tricklers]
    assert min(closed) >= deadline - 0.1
    assert max(closed) <= deadline + 3.0, max(closed)
    outcomes_left = len(server.factory.tunnels)
    assert outcomes_left == 0
