"""climber's tunnel opener and port forwards against the in-process MTop
server (real TLS, real SQLite) on 127.0.0.1."""

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from helpers import EchoAfterEOF, send_half_close_read

from climber import http_codec as http
from climber import socks5_codec as codec
from climber.config import ServerEntry
from climber.forward import ForwardConnection
from climber.frontend import Climber, LocalFactory
from climber.httpproxy import HTTPProxyConnection
from climber.pool import ServerPool
from climber.socks5 import Socks5Connection
from climber.tunnel import TunnelError, TunnelOpener
from mtop.server import TunnelSettings


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
    resumed, groups = [], []
    connector = next(iter(climber.opener.connectors.values()))
    for _ in range(3):
        groups.append(connector.group)
        tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
        resumed.append(tunnel.resumed)
        tunnel.transport.loseConnection()
    assert resumed == [False, True, True]
    # The group the server chose is remembered: later tunnels send a key
    # share of it alone (tests/test_tlstransport_fastpath.py checks that).
    assert groups == [None, "X25519MLKEM768", "X25519MLKEM768"]


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
async def test_a_single_entry_is_tried_once_more_when_it_closes_without_a_reply(server, echo_target):
    """climber's only server is a load balancer whose server behind went
    away during this login (it closed after the handshake, no reply): the
    tunnel is tried once more, on a new connection, and opens."""
    factory, port, paths = server
    built = []
    plain = factory.buildProtocol

    def build(addr):
        protocol = plain(addr)
        built.append(protocol)
        if len(built) == 1:  # the first login's server dies
            protocol.handshake_data = lambda data: protocol.transport.abortConnection()
        return protocol

    factory.buildProtocol = build
    climber = make_climber([entry(port, paths, prewarm=0)])
    tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
    assert len(built) == 2 and climber.opener.pool.retries == 1
    tunnel.transport.loseConnection()
    # Only once: a server that keeps closing fails the tunnel.
    factory.buildProtocol = lambda addr: (p := plain(addr), setattr(p, "handshake_data", lambda data: p.transport.abortConnection()), p)[2]
    with pytest.raises(TunnelError) as failed:
        await climber.opener.open("127.0.0.1", echo_target, 5)
    assert failed.value.kind == "refused" and climber.opener.pool.retries == 2


@pytest_twisted.ensureDeferred
async def test_explicit_auth_failure_reply_is_final(server, echo_target):
    factory, port, paths = server
    factory.settings = TunnelSettings(reply_errors=True, handshake_timeout=5)
    climber = make_climber([entry(port, paths, password="nope"), entry(port, paths)])
    with pytest.raises(TunnelError) as info:
        await climber.opener.open("127.0.0.1", echo_target, 5)
    assert info.value.kind == "auth"


@pytest_twisted.ensureDeferred
async def test_target_failure_reply_is_reported(server):
    factory, port, paths = server
    factory.settings = TunnelSettings(reply_errors=True, handshake_timeout=5)
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


# SOCKS5


@pytest.fixture
def socks(server):
    """A SOCKS5 listener of a climber using the in-process server; yields
    (port, factory of the server) so tests can change server settings."""
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    listening = reactor.listenTCP(
        0, LocalFactory(Socks5Connection, climber, timeout=5), interface="127.0.0.1"
    )
    yield listening.getHost().port, factory
    listening.stopListening()
    climber.close_all()


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks_connect(port, host, target_port, command=codec.CMD_CONNECT):
    """Blocking SOCKS5 client: returns (socket, reply code)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(codec.encode_greeting([codec.METHOD_NO_AUTH]))
    assert recv_exactly(s, 2) == b"\x05\x00"
    s.sendall(codec.encode_request(command, host, target_port))
    buf = b""
    while True:
        chunk = s.recv(512)
        if not chunk:
            return s, None
        buf += chunk
        parsed = codec.parse_reply(buf)
        if parsed is not None:
            return s, parsed[0]


def socks_echo(port, host, target_port, payload):
    s, rep = socks_connect(port, host, target_port)
    with s:
        assert rep == codec.REP_SUCCEEDED
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_socks5_connect(socks, echo_target, host):
    port, _ = socks
    answer = await deferToThread(socks_echo, port, host, echo_target, b"x" * 100000)
    assert answer == b"got:" + b"x" * 100000


@pytest_twisted.ensureDeferred
async def test_socks5_ipv6_target(socks):
    port, _ = socks
    v6 = reactor.listenTCP(0, Factory.forProtocol(EchoAfterEOF), interface="::1")
    try:
        answer = await deferToThread(socks_echo, port, "::1", v6.getHost().port, b"six")
        assert answer == b"got:six"
    finally:
        v6.stopListening()


def socks_reply_code(port, host, target_port, command=codec.CMD_CONNECT):
    s, rep = socks_connect(port, host, target_port, command)
    s.close()
    return rep


@pytest.mark.parametrize(
    "command,expected",
    [(codec.CMD_BIND, codec.REP_COMMAND_NOT_SUPPORTED), (codec.CMD_UDP_ASSOCIATE, codec.REP_COMMAND_NOT_SUPPORTED)],
)
@pytest_twisted.ensureDeferred
async def test_socks5_unsupported_commands(socks, echo_target, command, expected):
    port, _ = socks
    assert await deferToThread(socks_reply_code, port, "127.0.0.1", echo_target, command) == expected


@pytest.mark.parametrize(
    "reply_errors,expected",
    [(False, codec.REP_CONNECTION_REFUSED), (True, codec.REP_HOST_UNREACHABLE)],
)
@pytest_twisted.ensureDeferred
async def test_socks5_unreachable_target_reply(socks, reply_errors, expected):
    port, factory = socks
    factory.settings = TunnelSettings(reply_errors=reply_errors, handshake_timeout=5)
    assert await deferToThread(socks_reply_code, port, "127.0.0.1", free_port()) == expected


def raw_exchange(port, data):
    """Send ``data``, return what comes back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b""),  # SOCKS4
        (b"\x05\x00", b""),  # no methods
        (b"GET / HTTP/1.1\r\n\r\n", b""),
        (b"\x05\x01\x02", b"\x05\xff"),  # only user/pass offered, none configured
        (b"\x05\x01\x00\x05\x01\x00\x02\x01\x02\x03\x04\x00\x50", b"\x05\x00\x05\x08"),  # bad ATYP
    ],
)
@pytest_twisted.ensureDeferred
async def test_socks5_malformed_input_is_a_clean_close(socks, data, expected):
    port, _ = socks
    answer = await deferToThread(raw_exchange, port, data)
    assert answer[: len(expected)] == expected
    assert len(answer) in (len(expected), len(expected) + 8)  # at most one full reply


@pytest_twisted.ensureDeferred
async def test_socks5_local_authentication(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    listening = reactor.listenTCP(
        0, LocalFactory(Socks5Connection, climber, timeout=5, username="me", password="secret"), interface="127.0.0.1"
    )
    socks_port = listening.getHost().port

    def login(password):
        with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as s:
            s.sendall(codec.encode_greeting([codec.METHOD_NO_AUTH, codec.METHOD_USERPASS]))
            assert recv_exactly(s, 2) == b"\x05\x02"
            s.sendall(codec.encode_userpass("me", password))
            status = recv_exactly(s, 2)
            if status != b"\x01\x00":
                return status
            s.sendall(codec.encode_request(codec.CMD_CONNECT, "127.0.0.1", echo_target) + b"hi")
            s.shutdown(socket.SHUT_WR)
            return recv_exactly(s, 10 + 6)

    try:
        assert await deferToThread(login, "wrong") == b"\x01\x01"
        assert await deferToThread(login, "secret") == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00got:hi"
    finally:
        listening.stopListening()
        climber.close_all()


# HTTP proxy


class ScriptedOrigin(Protocol):
    """An HTTP origin that records each request (head and body, framed by
    the codec under test's sibling) and answers with ``script(head, body)``:
    a list of byte strings, and whether to close afterwards."""

    def __init__(self, script, seen, on_head=None):
        self.script = script
        self.seen = seen
        self.on_head = on_head
        self.buffer = b""
        self.head = None
        self.body = None
        self.framer = None

    def dataReceived(self, data):
        self.buffer += data
        if self.head is None:
            parsed = http.parse_request_head(self.buffer)
            if parsed is None:
                return
            self.head, used = parsed
            self.buffer = self.buffer[used:]
            self.framer = http.request_body(self.head)
            self.body = b""
            if self.on_head is not None:
                self.transport.write(self.on_head)
        used = self.framer.feed(self.buffer)
        self.body += self.buffer[:used]
        self.buffer = self.buffer[used:]
        if self.framer.done:
            self.seen.append((self.head, self.body))
            for chunk in self.script(self.head, self.body):
                self.transport.write(chunk)
            self.transport.loseConnection()


def ok(body, extra=b""):
    return lambda head, _: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra), body]


@pytest.fixture
def origins():
    """``start(script, on_head=None)`` -> (port, list of (head, body) seen)."""
    ports = []

    def start(script, on_head=None):
        seen = []
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: ScriptedOrigin(script, seen, on_head)), interface="127.0.0.1"
        )
        ports.append(port)
        return port.getHost().port, seen

    yield start
    for port in ports:
        port.stopListening()


@pytest.fixture
def proxy(server):
    """An HTTP proxy listener of a climber using the in-process server;
    yields (port, server factory)."""
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    listening = reactor.listenTCP(
        0, LocalFactory(HTTPProxyConnection, climber, timeout=5), interface="127.0.0.1"
    )
    yield listening.getHost().port, factory
    listening.stopListening()
    climber.close_all()


def read_response(s, buffer=b""):
    """One response (head + Content-Length or chunked body) from socket
    ``s``; returns (head, body, leftover)."""
    while (parsed := http.parse_response_head(buffer)) is None:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-head: {buffer!r}"
        buffer += chunk
    head, used = parsed
    buffer = buffer[used:]
    framer = http.response_body(head, "GET")
    body = b""
    while True:
        used = framer.feed(buffer)
        body += buffer[:used]
        buffer = buffer[used:]
        if framer.done:
            return head, body, buffer
        chunk = s.recv(65536)
        if not chunk:
            assert isinstance(framer, http.UntilClose), "connection closed mid-body"
            return head, body, b""
        buffer += chunk


def exchange(port, data, responses=1):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        results, leftover = [], b""
        for _ in range(responses):
            head, body, leftover = read_response(s, leftover)
            results.append((head, body))
        return results


@pytest_twisted.ensureDeferred
async def test_http_pipelined_requests_to_two_origins_on_one_connection(proxy, origins):
    port, _ = proxy
    one, seen_one = origins(ok(b"first"))
    two, seen_two = origins(ok(b"second"))
    request = (
        f"GET http://127.0.0.1:{one}/a HTTP/1.1\r\nHost: 127.0.0.1:{one}\r\n\r\n"
        f"POST http://localhost:{two}/b?q=1 HTTP/1.1\r\nHost: wrong.example\r\nContent-Length: 5\r\n\r\nhello"
        f"GET http://127.0.0.1:{one}/c HTTP/1.1\r\nHost: 127.0.0.1:{one}\r\n\r\n"
    ).encode()
    results = await deferToThread(exchange, port, request, 3)
    assert [body for _, body in results] == [b"first", b"second", b"first"]
    assert all(head.status == 200 and head.get("Connection") is None for head, _ in results)
    (head_b, body_b), = seen_two
    assert (head_b.method, head_b.target, body_b) == ("POST", "/b?q=1", b"hello")
    assert head_b.get("Host") == f"localhost:{two}"
    assert [h.target for h, _ in seen_one] == ["/a", "/c"]


@pytest_twisted.ensureDeferred
async def test_http_hop_by_hop_headers_are_removed_both_ways(proxy, origins):
    port, _ = proxy
    origin, seen = origins(ok(b"x", b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\n"))
    request = (
        f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
        "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "Connection: X-Drop\r\nX-Drop: 1\r\nX-Keep: 1\r\nTE: trailers\r\n\r\n"
    ).encode()
    ((head, body),) = await deferToThread(exchange, port, request)
    names = {name.lower() for name, _ in seen[0][0].headers}
    assert {"proxy-connection", "proxy-authorization", "x-drop", "te"}.isdisjoint(names)
    assert seen[0][0].get("X-Keep") == "1" and seen[0][0].get("Connection") == "close"
    assert head.get("X-Kept") == "2"
    assert head.get("X-Secret") is None and head.get("Keep-Alive") is None


@pytest_twisted.ensureDeferred
async def test_http_chunked_both_ways_and_100_continue(proxy, origins):
    port, _ = proxy
    chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    origin, seen = origins(
        lambda head, body: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", body],
        on_head=b"HTTP/1.1 100 Continue\r\n\r\n",
    )

    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"PUT http://127.0.0.1:{origin}/u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                "Transfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n".encode()
            )
            interim, _, leftover = read_response(s)
            assert interim.status == 100
            s.sendall(chunked)
            return read_response(s, leftover)

    head, body, _ = await deferToThread(run)
    assert head.status == 200 and body == chunked
    assert seen[0][1] == chunked
    assert seen[0][0].get("Content-Length") is None  # dropped beside chunked


@pytest_twisted.ensureDeferred
async def test_http_truncated_response_is_not_passed_off_as_complete(proxy, origins):
    port, _ = proxy
    origin, _ = origins(lambda head, body: [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"short"])

    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            return data

    data = await deferToThread(run)
    assert data.endswith(b"\r\n\r\nshort")  # then the connection was cut


@pytest.mark.parametrize(
    "request_line,status",
    [
        ("GET / HTTP/1.1", 400),  # origin form: not a proxy request
        ("GET https://127.0.0.1/ HTTP/1.1", 501),
        ("BR@KEN", 400),
        ("GET http://127.0.0.1:1/ HTTP/2.0", 505),
    ],
)
@pytest_twisted.ensureDeferred
async def test_http_bad_requests_get_status_responses(proxy, request_line, status):
    port, _ = proxy
    ((head, body),) = await deferToThread(exchange, port, f"{request_line}\r\nHost: x\r\n\r\n".encode())
    assert head.status == status
    assert head.get("Connection") == "close"


@pytest_twisted.ensureDeferred
async def test_http_unreachable_target_is_502(proxy):
    port, factory = proxy
    factory.settings = TunnelSettings(reply_errors=True, handshake_timeout=5)
    target = free_port()
    ((head, body),) = await deferToThread(
        exchange, port, f"GET http://127.0.0.1:{target}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert head.status == 502
    assert b"could not connect to the target" in body


@pytest_twisted.ensureDeferred
async def test_http_connect_and_local_auth(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    listening = reactor.listenTCP(
        0,
        LocalFactory(HTTPProxyConnection, climber, timeout=5, username="me", password="secret"),
        interface="127.0.0.1",
    )
    proxy_port = listening.getHost().port

    def connect(auth):
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
            s.sendall(f"CONNECT 127.0.0.1:{echo_target} HTTP/1.1\r\nHost: x\r\n{auth}\r\npayload".encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    try:
        refused = await deferToThread(connect, "")
        assert refused.startswith(b"HTTP/1.1 407 ") and b'Proxy-Authenticate: Basic realm="climber"' in refused
        wrong = await deferToThread(connect, "Proxy-Authorization: Basic bWU6d3Jvbmc=\r\n")
        assert wrong.startswith(b"HTTP/1.1 407 ")
        answer = await deferToThread(connect, "Proxy-Authorization: Basic bWU6c2VjcmV0\r\n")
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\ngot:payload"
    finally:
        listening.stopListening()
        climber.close_all()


@pytest_twisted.ensureDeferred
async def test_http_origin_that_never_answers_gets_504_after_idle_timeout(server):
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    climber.idle_timeout = 0.5
    listening = reactor.listenTCP(0, LocalFactory(HTTPProxyConnection, climber, timeout=5), interface="127.0.0.1")
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        ((head, body),) = await deferToThread(
            exchange, listening.getHost().port,
            f"GET http://127.0.0.1:{silent.getHost().port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        assert head.status == 504
        assert b"no data either way" in body
    finally:
        silent.stopListening()
        listening.stopListening()
        climber.close_all()


@pytest_twisted.ensureDeferred
async def test_pipelining_server_entry_sends_before_the_reply(server, echo_target):
    factory, port, paths = server
    climber = make_climber([entry(port, paths, pipelining=True)])
    listening = reactor.listenTCP(
        0, LocalFactory(ForwardConnection, climber, timeout=5, host="127.0.0.1", port=echo_target), interface="127.0.0.1"
    )
    try:
        answer = await deferToThread(send_half_close_read, listening.getHost().port, b"early bird")
        assert answer == b"got:early bird"
    finally:
        listening.stopListening()
        climber.close_all()


@pytest_twisted.ensureDeferred
async def test_nagle_is_off_on_every_tunnel_socket(server, echo_target):
    """Small writes (replies, keystrokes) must not wait ~40 ms for a delayed
    ACK: climber's tunnel, the server's client side and its target side all
    set TCP_NODELAY, as Go does."""
    factory, port, paths = server
    climber = make_climber([entry(port, paths)])
    tunnel = await climber.opener.open("127.0.0.1", echo_target, 5)
    try:
        (server_side,) = factory.tunnels
        assert tunnel.transport.getTcpNoDelay()
        assert server_side.transport.getTcpNoDelay()
        assert server_side.relay.target.tcp.getTcpNoDelay()
    finally:
        tunnel.transport.loseConnection()
