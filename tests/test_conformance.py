"""Conformance with the original MTop (the Go server ``mtop``, client
``climber`` and CLI ``mctl``), written down and tested without the original.

Our server and climber were run beside the original on loopback, in all
four directions over TLS and QUIC; this module holds us to what was
measured then, so that the suite keeps checking it on any machine.  Every
fact below is restated here (from the original's source and from those
runs) and nothing in this module reads a file outside ``tests/``.

What the original does, and what this module checks against it:

* **Its climber's auth message** (checked byte for byte against the wire
  vectors in ``tests/vectors/mtop-v1.json`` by `original_auth_message`):
  ``VER 01, METHOD 01, ULEN, USERNAME, PLEN, PASSWORD, ATYP, ADDR, PORT``
  with the port 2 bytes big-endian.  A target that parses as an IP address
  is sent as such (ATYP 01 with 4 bytes when it is IPv4, including an
  IPv4-mapped IPv6 address; ATYP 04 with 16 bytes otherwise); anything else
  is a domain name (ATYP 03, one length byte, the name as given).
* **Its climber's transports.**  TLS: one TLS connection per tunnel,
  offering one ALPN protocol, the configured ``proto`` (default ``mtop``),
  TLS 1.2 or newer, no session resumption.  QUIC: one connection per
  server, one bidirectional stream per tunnel.  On either it writes the
  auth message, reads the two-byte reply, and only then relays; a reply
  other than ``01 00``, or a close, fails the tunnel.  It reads the reply
  through a buffered reader and refuses it if more bytes came in the same
  read, so over TLS the reply must be a record of its own
  (`test_the_reply_is_a_tls_record_of_its_own`).  Our server must also keep
  bytes a client sends right behind the auth message (our climber can
  pipeline them), although the original's climber never does.
* **Its server** answers ``01 00`` only after it has connected to the
  target, and on any failure (wrong password, unknown user, target
  unreachable) just closes the connection or stream, with no reply bytes.
  It has no destination ACL; ours refuses by ACL in the same silent way.
  Our ``server.reply_errors: true`` sends the protocol's statuses
  ``01 02`` (authentication) and ``01 03`` (connection) instead.
* **Its server's input.**  It reads the auth message through a buffered
  reader and drops a client that sends anything before the ``01 00``
  reply, so our climber must send exactly one auth message and wait for
  the reply before sending data (``pipelining`` is off unless a server
  entry asks for it).  It checks ALPN against its ``server.proto``.
* **Its users**: table ``mtop_user(username, salt, password, created_time,
  updated_time)``; ``mctl user add`` makes a 12-character salt from
  ``a-z``, ``A-Z`` and ``0-9`` and stores the lowercase hex SHA-256 of
  ``salt + "@" + password``; the server reads one row per login.  Its
  DDL (PostgreSQL and MySQL/MariaDB) is `ORIGINAL_DDL`; it has no SQLite
  support, so `ORIGINAL_DDL` carries the same columns in SQLite's words.
* **Its share links** (``mctl config url``):
  ``mtop://user:pass@host:port/<type>?proto=<proto>``, built with Go's
  ``net/url``: user and password are percent-encoded as URL userinfo, where
  Go escapes ``@ / ? :`` and everything outside ``A-Z a-z 0-9 - _ . ~``
  except ``$ & + , ; =``, which it leaves as they are; ``type`` is ``tls``
  or ``quic``; ``proto`` defaults to ``mtop``.
* **Its example configs** (``tests/conformance/mtop.yaml`` and
  ``climber.yaml`` restate them with every key it documents):
  ``server.{type, listen, crt, key, proto}``, ``log.{level, format}``,
  ``db.{driverName, dsn, debug}``; climber: ``log``, ``socks5.{listen,
  timeout, username, password}``, ``http.{listen, timeout}``,
  ``servers[].{host, type, username, password, ca, proto, enabled}`` with
  ``host`` as ``host:port``.  (One deliberate difference: a listen address
  without a host, ``:1080``, means loopback in our climber, every interface
  in the original's.)

Everything here runs on loopback with real TLS and QUIC: our server in
this process (`server` from conftest, plus its QUIC listener), replayed
against by small blocking clients in threads that use only the standard
library's ``ssl`` and aioquic's sans-IO connection; our climber against
fake servers built on ``asyncio`` and aioquic's asyncio server, which
record the bytes they receive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import re
import secrets
import select
import shutil
import socket
import sqlite3
import ssl
import string
import struct
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread, deferToThreadPool

from helpers import LOOPBACK_ACL

from climber.config import DEFAULT_PREWARM, ServerEntry, load_climber_config, load_climber_data
from climber.pool import ServerPool
from climber.tunnel import TunnelError, TunnelOpener
from mtop import wire
from mtop.auth import Authenticator
from mtop.certs import init_certs
from mtop.config import load_config
from mtop.dialer import Dialer
from mtop.quic.server import QuicServerProtocol, server_configuration
from mtop.server import TunnelFactory, TunnelSettings
from mtop.tls import server_context
from mtop.tlstransport import server_tls_factory
from mtop.urls import parse_url

FIXTURES = Path(__file__).resolve().parent / "conformance"

# The original, written down.

#: ``mctl user add`` salts: 12 characters from this alphabet.
ORIGINAL_SALT_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits
ORIGINAL_SALT_LENGTH = 12
#: The original's default ALPN protocol (``server.proto`` and ``servers[].proto``).
ORIGINAL_DEFAULT_PROTO = "mtop"
SUCCESS = b"\x01\x00"
AUTH_FAILURE = b"\x01\x02"
CONNECTION_FAILURE = b"\x01\x03"

#: The original's ``mtop_user`` table, as its documentation creates it.
ORIGINAL_DDL = {
    "postgres": (
        'CREATE TABLE "mtop_user"('
        '"username" VARCHAR(128) NOT NULL PRIMARY KEY, '
        '"salt" VARCHAR(32) NOT NULL, '
        "\"password\" VARCHAR(1024) NOT NULL DEFAULT '', "
        '"created_time" TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP, '
        '"updated_time" TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP)'
    ),
    "mysql": (
        "CREATE TABLE `mtop_user`("
        "`username` VARCHAR(128) NOT NULL, "
        "`salt` VARCHAR(32) NOT NULL, "
        "`password` VARCHAR(1024) NOT NULL DEFAULT '', "
        "`created_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
        "`updated_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
        "PRIMARY KEY(`username`)) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    ),
    "sqlite": (
        "CREATE TABLE mtop_user("
        "username VARCHAR(128) NOT NULL PRIMARY KEY, "
        "salt VARCHAR(32) NOT NULL, "
        "password VARCHAR(1024) NOT NULL DEFAULT '', "
        "created_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
        "updated_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
    ),
}


def original_auth_message(username: str, password: str, host: str, port: int) -> bytes:
    """The auth message the original's climber sends for a tunnel to
    ``host:port`` (written from its description, not from `mtop.wire`)."""
    user, secret = username.encode("utf-8"), password.encode("utf-8")
    try:
        ip = None if "%" in host else ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None:
        name = host.encode("utf-8")
        address = b"\x03" + bytes([len(name)]) + name
    elif ip.version == 4 or ip.ipv4_mapped is not None:
        address = b"\x01" + (ip if ip.version == 4 else ip.ipv4_mapped).packed
    else:
        address = b"\x04" + ip.packed
    return b"\x01\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret + address + struct.pack(">H", port)


def parse_v1_auth(buf: bytes) -> tuple[dict, int] | None:
    """A v1 auth message at the start of ``buf`` as the original's server
    reads it: (its fields, its length), or None while incomplete.  Raises
    AssertionError for anything it would refuse."""
    if len(buf) < 3:
        return None
    assert buf[0] == 0x01, f"VER {buf[0]:#04x}"
    assert buf[1] == 0x01, f"METHOD {buf[1]:#04x}"
    at = 2
    fields = {}
    for name in ("username", "password"):
        if len(buf) < at + 1 or len(buf) < at + 1 + buf[at]:
            return None
        fields[name] = buf[at + 1 : at + 1 + buf[at]].decode("utf-8")
        at += 1 + buf[at]
    if len(buf) < at + 1:
        return None
    atyp = fields["atyp"] = buf[at]
    at += 1
    if atyp in (0x01, 0x04):
        size = 4 if atyp == 0x01 else 16
        if len(buf) < at + size:
            return None
        fields["host"] = str(ipaddress.ip_address(buf[at : at + size]))
        at += size
    else:
        assert atyp == 0x03, f"ATYP {atyp:#04x}"
        if len(buf) < at + 1 or len(buf) < at + 1 + buf[at]:
            return None
        fields["host"] = buf[at + 1 : at + 1 + buf[at]].decode("utf-8")
        at += 1 + buf[at]
    if len(buf) < at + 2:
        return None
    (fields["port"],) = struct.unpack(">H", buf[at : at + 2])
    return fields, at + 2


def original_salt() -> str:
    return "".join(secrets.choice(ORIGINAL_SALT_ALPHABET) for _ in range(ORIGINAL_SALT_LENGTH))


def original_password_hash(salt: str, password: str) -> str:
    return hashlib.sha256(f"{salt}@{password}".encode("utf-8")).hexdigest()


def sleep(seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def eventually(predicate, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        await sleep(0.02)
    return predicate()


# The original's climber, as blocking clients (run them in threads: the
# server under test runs on this process's reactor).


class TLSTunnel:
    """One tunnel of the original's climber over TLS: its own connection,
    ALPN ``proto``, the server's IP address as the name to verify."""

    def __init__(self, port: int, ca: str, proto: str = ORIGINAL_DEFAULT_PROTO, timeout: float = 10):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(ca)
        context.set_alpn_protocols([proto])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.alpn = self.sock.selected_alpn_protocol()
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """The next read (one TLS record at most), b"" at the end."""
        self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return b""

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.recv()
            if not chunk:
                break
            data += chunk
        return data

    def read_to_end(self) -> bytes:
        data = b""
        while chunk := self.recv():
            data += chunk
        return data

    def quiet_for(self, seconds: float) -> bool:
        """Whether nothing (neither bytes nor a close) comes for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return True
        except (ssl.SSLError, ConnectionError):
            return False
        return False

    def close(self) -> None:
        self.sock.close()


@dataclasses.dataclass
class _StreamState:
    data: bytearray = dataclasses.field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False


class QuicLink:
    """The original's climber's QUIC connection to one server, driven by
    aioquic's sans-IO `QuicConnection` over a UDP socket in this thread."""

    def __init__(self, port: int, ca: str, proto: str = ORIGINAL_DEFAULT_PROTO, timeout: float = 10):
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection

        configuration = QuicConfiguration(is_client=True, alpn_protocols=[proto], server_name="127.0.0.1", idle_timeout=10)
        configuration.load_verify_locations(ca)
        self.address = ("127.0.0.1", port)
        self.conn = QuicConnection(configuration=configuration)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(self.address)
        self.streams: dict[int, _StreamState] = {}
        self.alpn: str | None = None
        self.terminated = False
        self.timeout = timeout
        self.conn.connect(self.address, now=time.monotonic())
        assert self.wait(lambda: self.alpn is not None or self.terminated), "no QUIC handshake"
        assert not self.terminated, "the QUIC handshake failed"

    def _flush(self) -> None:
        for datagram, _ in self.conn.datagrams_to_send(now=time.monotonic()):
            self.sock.send(datagram)

    def _events(self) -> None:
        from aioquic.quic import events

        while (event := self.conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self.alpn = event.alpn_protocol
            elif isinstance(event, events.StreamDataReceived):
                state = self.streams.setdefault(event.stream_id, _StreamState())
                state.data += event.data
                state.ended |= event.end_stream
            elif isinstance(event, events.StreamReset):
                self.streams.setdefault(event.stream_id, _StreamState()).reset = True
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated = True

    def wait(self, predicate, timeout: float | None = None) -> bool:
        """Run the connection until ``predicate()`` holds or time is up."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._flush()
            if predicate():
                return True
            now = time.monotonic()
            if now >= deadline or self.terminated:
                return predicate()
            timer = self.conn.get_timer()
            until = deadline if timer is None else min(deadline, timer)
            readable, _, _ = select.select([self.sock], [], [], max(0.0, until - now))
            if readable:
                self.conn.receive_datagram(self.sock.recv(65536), self.address, now=time.monotonic())
            elif timer is not None and time.monotonic() >= timer:
                self.conn.handle_timer(now=time.monotonic())
            self._events()

    def tunnel(self) -> "QuicTunnel":
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(stream_id, b"")  # takes the id (nothing is sent yet)
        self.streams[stream_id] = _StreamState()
        return QuicTunnel(self, stream_id)

    def close(self) -> None:
        self.conn.close()
        self._flush()
        self.sock.close()


class QuicTunnel:
    """One tunnel of the original's climber over QUIC: a bidirectional
    stream of the shared `QuicLink`."""

    def __init__(self, link: QuicLink, stream_id: int):
        self.link, self.stream_id = link, stream_id
        self.state = link.streams[stream_id]
        self.alpn = link.alpn
        self.taken = 0

    def send(self, data: bytes) -> None:
        self.link.conn.send_stream_data(self.stream_id, data)
        self.link._flush()

    def _closed(self) -> bool:
        return self.state.ended or self.state.reset or self.link.terminated

    def read(self, n: int) -> bytes:
        self.link.wait(lambda: len(self.state.data) - self.taken >= n or self._closed())
        data = bytes(self.state.data[self.taken : self.taken + n])
        self.taken += len(data)
        return data

    def read_to_end(self) -> bytes:
        self.link.wait(self._closed)
        assert self._closed(), "the stream did not end"
        data = bytes(self.state.data[self.taken :])
        self.taken = len(self.state.data)
        return data

    def quiet_for(self, seconds: float) -> bool:
        return not self.link.wait(lambda: len(self.state.data) > self.taken or self._closed(), seconds)

    def close(self) -> None:
        if not self._closed():
            self.link.conn.reset_stream(self.stream_id, 0)
            self.link._flush()


class OriginalClimber:
    """Opens tunnels to our server as the original's climber does over
    ``transport``: TLS (a connection per tunnel) or QUIC (a stream per
    tunnel, one connection).  Blocking: use it in a thread."""

    def __init__(self, transport: str, port: int, ca: str, proto: str = ORIGINAL_DEFAULT_PROTO):
        self.transport, self.port, self.ca, self.proto = transport, port, ca, proto
        self.link: QuicLink | None = None

    def tunnel(self) -> TLSTunnel | QuicTunnel:
        if self.transport == "tls":
            return TLSTunnel(self.port, self.ca, self.proto)
        if self.link is None:
            self.link = QuicLink(self.port, self.ca, self.proto)
        return self.link.tunnel()

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


# Our server, TLS and QUIC, with targets.


@dataclasses.dataclass
class ServerUnderTest:
    transport: str
    factory: TunnelFactory
    port: int
    ca: str
    db_path: Path
    quic: QuicServerProtocol | None

    def add_original_user(self, username: str, password: str) -> None:
        """A row as the original's ``mctl user add`` writes it."""
        salt = original_salt()
        db = sqlite3.connect(self.db_path)
        db.execute(
            "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
            (username, salt, original_password_hash(salt, password)),
        )
        db.commit()
        db.close()

    def climber(self) -> OriginalClimber:
        return OriginalClimber(self.transport, self.port, self.ca)


@pytest.fixture(params=["tls", "quic"])
def ours(request, server, tmp_path):
    """Our server in this process over TLS or QUIC (the same tunnel factory
    and SQLite store), with user test111 / 123456 as the original writes it."""
    factory, tls_port, paths = server
    quic = None
    if request.param == "tls":
        port = tls_port
    else:
        quic = QuicServerProtocol(
            reactor, factory, server_configuration(paths.server_crt, paths.server_key, "mtop", 30), 5
        )
        listening = reactor.listenUDP(0, quic, interface="127.0.0.1")
        port = listening.getHost().port
    under_test = ServerUnderTest(request.param, factory, port, paths.ca_crt, tmp_path / "users.db", quic)
    under_test.add_original_user("test111", "123456")
    yield under_test
    if quic is not None:
        quic.close_all()
        listening.stopListening()


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Banner(Echo):
    """Speaks first (as SSH or SMTP servers do), then echoes."""

    def connectionMade(self):
        self.transport.write(b"SSH-2.0-banner\r\n")


def listen_target(protocol, interface: str):
    return reactor.listenTCP(0, Factory.forProtocol(protocol), interface=interface)


@pytest.fixture
def targets():
    """Echo servers on 127.0.0.1 and ::1; yields {"ipv4": port, "ipv6": port}."""
    ports = {"ipv4": listen_target(Echo, "127.0.0.1"), "ipv6": listen_target(Echo, "::1")}
    yield {name: p.getHost().port for name, p in ports.items()}
    for p in ports.values():
        p.stopListening()


def target_address(kind: str, targets: dict) -> tuple[str, int]:
    """The host the original's climber is asked for (a domain, an IPv4 or an
    IPv6 literal) and the port."""
    return {
        "domain": ("localhost", targets["ipv4"]),
        "ipv4": ("127.0.0.1", targets["ipv4"]),
        "ipv6": ("::1", targets["ipv6"]),
    }[kind]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The original's auth messages.


def test_the_original_auth_message_is_the_wire_vectors(vectors):
    for case in vectors["auth_valid"]:
        message = original_auth_message(case["username"], case["password"], case["host"], case["port"])
        assert message.hex() == case["hex"], case["name"]
        request = wire.AuthRequest(case["username"], case["password"], case["host"], case["port"], case["address_type"])
        assert wire.encode_auth(request) == message, case["name"]
        fields, length = parse_v1_auth(message)
        assert length == len(message) and fields["atyp"] == case["address_type"]
    # As the original classifies hosts: an IPv4-mapped IPv6 literal is sent as IPv4.
    assert original_auth_message("u", "p", "::ffff:127.0.0.1", 80)[6:] == b"\x01\x7f\x00\x00\x01\x00\x50"


@pytest.mark.parametrize("target", ["domain", "ipv4", "ipv6"])
@pytest_twisted.ensureDeferred
async def test_the_original_climbers_tunnel_is_relayed(ours, targets, target):
    """Auth message, wait for ``01 00``, then data both ways, as the
    original's climber does it."""
    host, port = target_address(target, targets)
    message = original_auth_message("test111", "123456", host, port)
    assert message[len("test111") + len("123456") + 4] == {"domain": 3, "ipv4": 1, "ipv6": 4}[target]

    def climb():
        climber = ours.climber()
        try:
            tunnel = climber.tunnel()
            assert tunnel.alpn == ORIGINAL_DEFAULT_PROTO
            tunnel.send(message)
            assert tunnel.read(2) == SUCCESS
            for payload in (b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 64):
                tunnel.send(payload)
                assert tunnel.read(len(payload)) == payload
            tunnel.close()
        finally:
            climber.close()

    await deferToThread(climb)


@pytest_twisted.ensureDeferred
async def test_auth_message_and_first_bytes_in_one_write(ours, targets):
    """Bytes right behind the auth message are kept and relayed once the
    target is connected, after the reply."""
    payload = b"early bytes " * 100

    def climb():
        climber = ours.climber()
        try:
            tunnel = climber.tunnel()
            tunnel.send(original_auth_message("test111", "123456", "127.0.0.1", targets["ipv4"]) + payload)
            assert tunnel.read(2 + len(payload)) == SUCCESS + payload
            tunnel.close()
        finally:
            climber.close()

    await deferToThread(climb)


@pytest.mark.parametrize("ours", ["quic"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_quic_tunnels_are_streams_of_one_connection(quic_backend, ours, targets):
    climber = ours.climber()

    def climb():
        tunnels = [climber.tunnel() for _ in range(5)]
        for tunnel in tunnels:
            tunnel.send(original_auth_message("test111", "123456", "127.0.0.1", targets["ipv4"]))
        for i, tunnel in enumerate(tunnels):
            assert tunnel.read(2) == SUCCESS
            tunnel.send(b"tunnel %d" % i)
            assert tunnel.read(8) == b"tunnel %d" % i
        return tunnels

    try:
        tunnels = await deferToThread(climb)
        assert len({t.stream_id for t in tunnels}) == 5
        assert len(set(ours.quic.connections.values())) == 1
        assert len(ours.factory.tunnels) == 5
    finally:
        await deferToThread(climber.close)


@pytest_twisted.ensureDeferred
async def test_the_reply_is_a_tls_record_of_its_own(server):
    """The original's climber refuses a reply read together with more
    bytes: with a target that speaks first, the first TLS record still
    holds exactly ``01 00``."""
    factory, port, paths = server
    banner = listen_target(Banner, "127.0.0.1")
    db = sqlite3.connect(Path(paths.ca_crt).parent / "users.db")
    salt = original_salt()
    db.execute(
        "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
        ("test111", salt, original_password_hash(salt, "123456")),
    )
    db.commit()
    db.close()

    def climb():
        for _ in range(10):
            tunnel = TLSTunnel(port, paths.ca_crt)
            tunnel.send(original_auth_message("test111", "123456", "127.0.0.1", banner.getHost().port))
            assert tunnel.recv() == SUCCESS
            assert tunnel.read(16) == b"SSH-2.0-banner\r\n"
            tunnel.close()

    try:
        await deferToThread(climb)
    finally:
        banner.stopListening()


# Our server's behaviours the original's climber depends on.


class Backlogged:
    """A target whose accept queue is full, so that connecting to it hangs
    (Linux drops the SYN) until `release` makes room."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))
        self.accepted: list[socket.socket] = []

    def release(self) -> None:
        self.listener.settimeout(10)
        for _ in range(2):
            connection, _ = self.listener.accept()
            self.accepted.append(connection)

    def close(self) -> None:
        for s in [self.listener, self.filler, *self.accepted]:
            s.close()


@pytest_twisted.ensureDeferred
async def test_no_reply_before_the_target_is_connected(ours):
    target = Backlogged()

    def climb():
        climber = ours.climber()
        try:
            tunnel = climber.tunnel()
            tunnel.send(original_auth_message("test111", "123456", "127.0.0.1", target.port) + b"ping")
            assert tunnel.quiet_for(1.5), "the server answered before the target was connected"
            target.release()  # the server's SYN is retried within about a second
            assert tunnel.read(2) == SUCCESS
            assert target.accepted[-1].recv(4) == b"ping"
            tunnel.close()
        finally:
            climber.close()

    try:
        await deferToThread(climb)
    finally:
        target.close()


FAILURES = {
    # case: (username, password, host, port or None for a closed port, reply with reply_errors)
    "wrong-password": ("test111", "654321", "127.0.0.1", "echo", AUTH_FAILURE),
    "unknown-user": ("nobody", "123456", "127.0.0.1", "echo", AUTH_FAILURE),
    "unreachable-target": ("test111", "123456", "127.0.0.1", "closed", CONNECTION_FAILURE),
    "refused-by-acl": ("test111", "123456", "192.0.2.1", "echo", CONNECTION_FAILURE),
}


def failure_message(case: str, targets: dict) -> bytes:
    username, password, host, port, _ = FAILURES[case]
    port = targets["ipv4"] if port == "echo" else closed_port()
    return original_auth_message(username, password, host, port)


@pytest.mark.parametrize("case", sorted(FAILURES))
@pytest_twisted.ensureDeferred
async def test_a_failure_is_a_close_without_reply(ours, targets, case):
    """As the original's server: no status bytes, just the end of the
    connection (TLS) or stream (QUIC)."""
    message = failure_message(case, targets)

    def climb():
        climber = ours.climber()
        try:
            tunnel = climber.tunnel()
            tunnel.send(message)
            return tunnel.read_to_end()
        finally:
            climber.close()

    assert await deferToThread(climb) == b""


@pytest.mark.parametrize("case", sorted(FAILURES))
@pytest_twisted.ensureDeferred
async def test_with_reply_errors_a_failure_is_a_status(ours, targets, case):
    ours.factory.settings = dataclasses.replace(ours.factory.settings, reply_errors=True)
    message = failure_message(case, targets)

    def climb():
        climber = ours.climber()
        try:
            tunnel = climber.tunnel()
            tunnel.send(message)
            return tunnel.read_to_end()
        finally:
            climber.close()

    assert await deferToThread(climb) == FAILURES[case][4]


# Our climber against what the original's server accepts.


@dataclasses.dataclass
class Received:
    """What a fake original server saw on one tunnel."""

    alpn: str | None
    connection: int
    data: bytearray = dataclasses.field(default_factory=bytearray)
    at_reply: int | None = None
    ended: bool = False

    @property
    def before_reply(self) -> bytes:
        return bytes(self.data[: self.at_reply])


class FakeOriginalServer:
    """The original's server as our climber meets it, on asyncio in a
    thread: TLS (ALPN ``proto``) or QUIC (a tunnel per stream).  It reads
    one auth message, then after ``delay`` replies ``01 00`` (``reply``
    true) or closes without a word (``reply`` false), then records the rest."""

    def __init__(self, transport: str, paths, proto: str = ORIGINAL_DEFAULT_PROTO, delay: float = 0.0, reply: bool = True):
        self.transport, self.paths, self.proto = transport, paths, proto
        self.delay, self.reply = delay, reply
        self.tunnels: list[Received] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        if self.transport == "tls":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.paths.server_crt, self.paths.server_key)
            context.set_alpn_protocols([self.proto])
            self.server = await asyncio.start_server(self._tunnel, "127.0.0.1", 0, ssl=context)
            return self.server.sockets[0].getsockname()[1]
        from aioquic.asyncio import serve
        from aioquic.quic.configuration import QuicConfiguration

        configuration = QuicConfiguration(is_client=False, alpn_protocols=[self.proto])
        configuration.load_cert_chain(self.paths.server_crt, self.paths.server_key)
        port = closed_port()
        self.server = await serve("127.0.0.1", port, configuration=configuration, stream_handler=self._stream)
        return port

    def _stream(self, reader, writer) -> None:
        asyncio.ensure_future(self._tunnel(reader, writer))

    async def _tunnel(self, reader, writer) -> None:
        if self.transport == "tls":
            alpn, connection = writer.get_extra_info("ssl_object").selected_alpn_protocol(), id(writer)
        else:
            quic = writer.transport.protocol._quic
            alpn, connection = quic.tls.alpn_negotiated, id(writer.transport.protocol)
        seen = Received(alpn, connection)
        self.tunnels.append(seen)
        reading = asyncio.ensure_future(self._read(reader, seen))
        while (parsed := parse_v1_auth(bytes(seen.data))) is None and not reading.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.delay)
        seen.at_reply = len(seen.data)
        if not self.reply:
            if self.transport == "tls":
                writer.close()
            else:
                writer.write_eof()  # what closing a quic-go stream sends
            return
        writer.write(SUCCESS)
        await reading

    async def _read(self, reader, seen: Received) -> None:
        while chunk := await reader.read(65536):
            seen.data += chunk
        seen.ended = True

    def close(self) -> None:
        async def stop():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def certificates(tmp_path):
    return init_certs(str(tmp_path / "fake"), ["localhost"], ["127.0.0.1"])


@pytest.fixture
def fake_original():
    made = []

    def make(*args, **kw) -> FakeOriginalServer:
        made.append(FakeOriginalServer(*args, **kw))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@pytest.fixture
def our_climber():
    made = []

    def make(entry: ServerEntry) -> TunnelOpener:
        opener = TunnelOpener(reactor, ServerPool((entry,), "failover", reactor), 30)
        made.append(opener)
        return opener

    yield make
    for opener in made:
        opener.close()


def entry_for(fake: FakeOriginalServer, certificates, **kw) -> ServerEntry:
    values = dict(username="test111", password="123456", type=fake.transport, ca=certificates.ca_crt, proto=fake.proto)
    values.update(kw)
    return ServerEntry("127.0.0.1", fake.port, **values)


@pytest.mark.parametrize("transport", ["tls", "quic"])
@pytest.mark.parametrize("host, port", [("example.com", 443), ("127.0.0.1", 8080), ("2001:db8::1", 80)])
@pytest_twisted.ensureDeferred
async def test_our_climber_sends_exactly_the_original_auth_message(
    fake_original, our_climber, certificates, vectors, transport, host, port
):
    fake = fake_original(transport, certificates, proto="mtop-example")
    opener = our_climber(entry_for(fake, certificates))
    tunnel = await opener.open(host, port, 5)
    (seen,) = fake.tunnels
    assert seen.alpn == "mtop-example"
    expected = original_auth_message("test111", "123456", host, port)
    assert seen.before_reply == expected
    fields, length = parse_v1_auth(seen.before_reply)
    assert length == len(expected) and (fields["username"], fields["password"]) == ("test111", "123456")
    if (host, port) == ("example.com", 443):
        (vector,) = [v for v in vectors["auth_valid"] if v["name"] == "domain"]
        assert seen.before_reply.hex() == vector["hex"]
    tunnel.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_our_climber_sends_an_ipv4_mapped_address_as_the_original_does(fake_original, our_climber, certificates):
    """An IPv4-mapped IPv6 literal travels as the IPv4 address (ATYP 01),
    byte for byte what the original's climber sends."""
    fake = fake_original("tls", certificates)
    opener = our_climber(entry_for(fake, certificates))
    tunnel = await opener.open("::ffff:127.0.0.1", 22, 5)
    (seen,) = fake.tunnels
    assert seen.before_reply == original_auth_message("test111", "123456", "::ffff:127.0.0.1", 22)
    fields, _ = parse_v1_auth(seen.before_reply)
    assert fields["atyp"] == 0x01 and fields["host"] == "127.0.0.1"
    tunnel.transport.abortConnection()


@pytest.mark.parametrize("transport", ["tls", "quic"])
@pytest_twisted.ensureDeferred
async def test_our_climber_waits_for_the_reply_before_sending_data(fake_original, our_climber, certificates, transport):
    fake = fake_original(transport, certificates, delay=0.5)
    opener = our_climber(entry_for(fake, certificates))
    assert opener.pool.servers[0].entry.pipelining is False
    opening = opener.open("example.com", 443, 5)
    await sleep(0.3)
    assert not opening.called, "the tunnel counted as open before the server's 01 00"
    tunnel = await opening
    (seen,) = fake.tunnels
    assert seen.before_reply == original_auth_message("test111", "123456", "example.com", 443)
    tunnel.transport.write(b"after the reply")
    assert await eventually(lambda: bytes(seen.data[seen.at_reply :]) == b"after the reply")
    tunnel.transport.abortConnection()


@pytest.mark.parametrize("transport", ["tls", "quic"])
@pytest_twisted.ensureDeferred
async def test_our_climber_takes_a_close_without_reply_as_failure(fake_original, our_climber, certificates, transport):
    fake = fake_original(transport, certificates, reply=False)
    opener = our_climber(entry_for(fake, certificates))
    with pytest.raises(TunnelError) as info:
        await opener.open("example.com", 443, 5)
    assert info.value.kind == "refused"
    # A pool's only server that closes without a reply gets the login once
    # more on a new connection (a balancer may have lost its server during
    # the first); a second close is the failure, with no third try.
    assert len(fake.tunnels) == 2
    assert opener.pool.retries == 1


@pytest_twisted.ensureDeferred
async def test_our_climber_opens_quic_tunnels_as_streams_of_one_connection(quic_backend, fake_original, our_climber, certificates):
    fake = fake_original("quic", certificates)
    opener = our_climber(entry_for(fake, certificates))
    tunnels = [await opener.open("example.com", 443, 5) for _ in range(3)]
    assert len(fake.tunnels) == 3 and len({seen.connection for seen in fake.tunnels}) == 1
    for tunnel in tunnels:
        tunnel.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_our_climber_opens_a_tls_connection_per_tunnel(fake_original, our_climber, certificates):
    fake = fake_original("tls", certificates)
    opener = our_climber(entry_for(fake, certificates))
    tunnels = [await opener.open("example.com", 443, 5) for _ in range(3)]
    assert len({seen.connection for seen in fake.tunnels}) == 3
    assert {seen.alpn for seen in fake.tunnels} == {ORIGINAL_DEFAULT_PROTO}
    for tunnel in tunnels:
        tunnel.transport.abortConnection()


# Users as the original's mctl writes them.


def _plain_sql(driver: str, dsn: str, statements: list[tuple[str, tuple]]) -> None:
    """Run ``statements`` with the database's own client library, not ours."""
    if driver == "sqlite":
        db = sqlite3.connect(dsn)
    elif driver == "postgres":
        import psycopg2

        db = psycopg2.connect(dsn)
    else:
        import pymysql

        match = re.fullmatch(r"(\w+):(.*)@tcp\(([\d.]+):(\d+)\)/(\w+)(\?.*)?", dsn)
        user, password, host, port, name = match.group(1, 2, 3, 4, 5)
        db = pymysql.connect(host=host, port=int(port), user=user, password=password, database=name)
    try:
        cursor = db.cursor()
        for text, params in statements:
            if driver != "sqlite":
                text = text.replace("?", "%s")
            cursor.execute(text, params)
        db.commit()
    finally:
        db.close()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def original_table(request, tmp_path):
    """(driver, DSN) of a database holding the original's ``mtop_user``
    table (and nothing of ours), made by plain SQL."""
    driver = request.param
    if driver == "sqlite":
        dsn = str(tmp_path / "original.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn" if driver == "postgres" else "mysql_dsn")
    drops = [(f"DROP TABLE IF EXISTS {name}", ()) for name in ("mtop_user", "mtop_usage_flush")]
    _plain_sql(driver, dsn, drops + [(ORIGINAL_DDL[driver], ())])
    return driver, dsn


def _store(driver: str, dsn: str):
    if driver == "sqlite":
        from mtop.userstore.sqlite import SQLiteUserStore

        return SQLiteUserStore(dsn)
    if driver == "postgres":
        from mtop.userstore.postgres import PostgresUserStore

        return PostgresUserStore(dsn, reactor)
    from mtop.userstore.mysql import MySQLUserStore

    return MySQLUserStore(dsn)


@pytest_twisted.ensureDeferred
async def test_a_user_row_as_the_original_writes_it_logs_in(original_table, certificates, targets):
    driver, dsn = original_table
    salt = original_salt()
    assert len(salt) == 12 and set(salt) <= set(ORIGINAL_SALT_ALPHABET)
    stored = original_password_hash(salt, "s3cret!")
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    _plain_sql(driver, dsn, [("INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", ("alice", salt, stored))])

    store = _store(driver, dsn)
    store.startService()
    auth = Authenticator(
        store, reactor, lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a), cache_ttl=0
    )
    factory = TunnelFactory(auth, Dialer(reactor, 5, LOOPBACK_ACL), reactor, TunnelSettings(handshake_timeout=5))
    context = server_context(certificates.server_crt, certificates.server_key, "mtop")
    listening = reactor.listenTCP(0, server_tls_factory(factory, lambda: context), interface="127.0.0.1")
    port = listening.getHost().port

    def climb():
        tunnel = TLSTunnel(port, certificates.ca_crt)
        tunnel.send(original_auth_message("alice", "s3cret!", "127.0.0.1", targets["ipv4"]) + b"hello")
        assert tunnel.read(7) == SUCCESS + b"hello"
        tunnel.close()
        tunnel = TLSTunnel(port, certificates.ca_crt)
        tunnel.send(original_auth_message("alice", "s3cret", "127.0.0.1", targets["ipv4"]))
        assert tunnel.read_to_end() == b""

    try:
        await deferToThread(climb)
    finally:
        await listening.stopListening()
        for tunnel in list(factory.tunnels):
            tunnel.transport.abortConnection()
        await maybeDeferred(store.stopService)


# Share links as the original's `mctl config url` prints them.

SHARE_LINKS = [
    # (link, host, port, username, password, type, proto)
    ("mtop://test111:123456@127.0.0.1:4433/quic?proto=mtop-example", "127.0.0.1", 4433, "test111", "123456", "quic", "mtop-example"),
    ("mtop://alice:pw@example.com:443/tls?proto=mtop", "example.com", 443, "alice", "pw", "tls", "mtop"),
    ("mtop://alice:pw@example.com:443/tls", "example.com", 443, "alice", "pw", "tls", "mtop"),
    ("mtop://alice:pw@example.com:8443/quic", "example.com", 8443, "alice", "pw", "quic", "mtop"),
    # Go's userinfo escaping: '@ / ? :', space, '!', '#', '%' and non-ASCII
    # escaped; '$ & + , ; =' left as they are.
    (
        "mtop://al%20ice:p%40ss%3Aw%2Frd%3F&=+$,;%21%23%25%C3%A9@vpn.example.org:443/tls?proto=mtop",
        "vpn.example.org", 443, "al ice", "p@ss:w/rd?&=+$,;!#%é", "tls", "mtop",
    ),
]


@pytest.mark.parametrize("link, host, port, username, password, kind, proto", SHARE_LINKS)
def test_an_original_share_link_is_the_same_server_in_our_climber(link, host, port, username, password, kind, proto):
    parsed = parse_url(link)
    assert (parsed.host, parsed.port, parsed.username, parsed.password, parsed.type, parsed.proto) == (
        host, port, username, password, kind, proto,
    )
    config = load_climber_data({"servers": [{"url": link}], "socks5": {"listen": ":1080"}})
    assert config.warnings == ()
    # What the original's climber would use from the same values in
    # climber.yaml, and our default prewarming of TLS servers.
    prewarm = DEFAULT_PREWARM if kind == "tls" else 0
    assert config.servers == (ServerEntry(host, port, username, password, type=kind, proto=proto, prewarm=prewarm),)
    assert config.servers[0].pipelining is False


def test_the_share_link_vectors_are_the_same_servers(vectors):
    for case in vectors["share_url"]["cases"]:
        parsed = parse_url(case["url"])
        assert (parsed.host, parsed.port, parsed.username, parsed.password, parsed.type, parsed.proto) == (
            case["host"], case["port"], case["username"], case["password"], case["type"], case["proto"],
        )


# The original's example configs.


@pytest.fixture
def original_configs(tmp_path):
    """The two example files in a directory with the keys they name."""
    for name in ("mtop.yaml", "climber.yaml"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    init_certs(str(tmp_path / "keys"), ["localhost"], ["127.0.0.1"])
    return tmp_path


def test_the_original_mtop_yaml_loads_without_a_warning(original_configs):
    config = load_config(str(original_configs / "mtop.yaml"))
    assert config.warnings == ()
    assert config.server.type == "quic"
    assert config.server.proto == "mtop-example"
    assert (config.server.listen.host, config.server.listen.port) == (None, 4433)
    assert config.server.crt == str(original_configs / "keys" / "server.crt")
    assert config.db.driverName == "postgres"
    assert config.db.dsn == "postgres://postgres@127.0.0.1/mtop?sslmode=disable"


def test_the_original_climber_yaml_loads_without_a_warning(original_configs):
    config = load_climber_config(str(original_configs / "climber.yaml"))
    assert config.warnings == ()
    first, second = config.servers
    ca = str(original_configs / "keys" / "ca.crt")
    assert first == ServerEntry("127.0.0.1", 4433, "test111", "123456", type="quic", ca=ca, proto="mtop-example")
    assert second == ServerEntry("example.com", 1312, "test", "123456", type="tls", ca=ca, enabled=False, prewarm=DEFAULT_PREWARM)
    assert config.usable_servers == (first,)
    assert (config.socks5.listen.port, config.socks5.timeout, config.socks5.username) == (1080, 60, "local")
    assert (config.http.listen.port, config.http.timeout) == (1081, 60)
