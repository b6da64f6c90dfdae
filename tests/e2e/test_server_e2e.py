"""End to end: the real ``twistd mtop`` server in a subprocess, a TLS client
written directly on pyOpenSSL (none of the project's TLS code), and plain
socket targets in threads.  All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import random
import re
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable

import pytest
from cryptography import x509
from OpenSSL import SSL

from mtop import wire
from peers import closed_port, banner_then_read, echo, reply_after_eof

MiB = 1 << 20
BULK_SIZE = 64 * MiB
REPLY_OK = b"\x01\x00"


# ---------------------------------------------------------------------------
# A TLS client on pyOpenSSL and plain sockets


def session_context(session: Any) -> SSL.Context:
    """The context ``session`` was made on (pyOpenSSL resumes a session only
    on it, and has no public way to name it)."""
    return session._context


class TLSClient:
    """One TLS 1.3 connection to the server, driven by a single-threaded
    select loop over a non-blocking socket.

    ``eof`` says how the server's direction ended: ``"close_notify"``,
    ``"eof"`` (TCP FIN without close_notify), ``"reset"``, or
    ``"error: ..."``; ``None`` while it is open.
    """

    def __init__(
        self,
        port: int,
        ca: str,
        alpn: Iterable[bytes] | None = (b"mtop",),
        max_version: int | None = None,
        prefix: bytes = b"",
        source: str | None = None,
        session: Any = None,
    ):
        """``source``: the local address to connect from; ``session``: a
        session (``conn.get_session()`` of an earlier client) to resume, on
        that client's context."""
        if session is not None:
            ctx = session_context(session)
        else:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            if max_version is None:
                ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
            else:
                ctx.set_max_proto_version(max_version)
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errnum, depth, ok: bool(ok))
            ctx.load_verify_locations(ca)
            if alpn:
                ctx.set_alpn_protos(list(alpn))
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None)
        if prefix:  # in the clear before TLS, e.g. a PROXY protocol header
            self.sock.sendall(prefix)
        self.sock.setblocking(False)
        self.local_port = self.sock.getsockname()[1]
        self.conn = SSL.Connection(ctx, self.sock)
        self.conn.set_tlsext_host_name(b"localhost")
        self.conn.set_connect_state()
        if session is not None:
            self.conn.set_session(session)
        self.eof: str | None = None
        self.write_closed = False
        #: What `pump` read without a sink of its own; the read methods
        #: return it first, so a fast reply is never lost.
        self.unread = bytearray()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _wait(self, read: bool, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS client: deadline passed")
        select.select([self.sock] if read else [], [self.sock] if write else [], [], min(left, 0.25))

    def handshake(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                self._wait(True, False, deadline)
            except SSL.WantWriteError:
                self._wait(False, True, deadline)
        # The name check, done here rather than by any project code.
        cert = self.conn.get_peer_certificate(as_cryptography=True)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)

    @property
    def alpn(self) -> bytes:
        return self.conn.get_alpn_proto_negotiated()

    def _drain(self, sink: Callable[[bytes], None]) -> None:
        """Read whatever is readable now; sets ``eof`` at the end."""
        while self.eof is None:
            try:
                data = self.conn.recv(256 * 1024)
            except SSL.WantReadError:
                return
            except SSL.WantWriteError:
                return
            except SSL.ZeroReturnError:
                self.eof = "close_notify"
                return
            except SSL.SysCallError as e:
                code = e.args[0] if e.args else None
                if code == -1:
                    self.eof = "eof"
                elif code in (errno.ECONNRESET, errno.EPIPE):
                    self.eof = "reset"
                else:
                    self.eof = f"error: {e!r}"
                return
            except SSL.Error as e:
                self.eof = "eof" if "unexpected eof" in str(e) else f"error: {e!r}"
                return
            if not data:  # pyOpenSSL does not do this, but be safe
                self.eof = "eof"
                return
            sink(data)

    def pump(
        self,
        outgoing: Iterable[bytes] = (),
        sink: Callable[[bytes], None] | None = None,
        half_close: bool = False,
        until_eof: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Send everything in ``outgoing`` while reading into ``sink``, both
        at once; then, with ``half_close``, send close_notify; with
        ``until_eof`` keep reading until the server's direction ends."""
        if sink is None:
            sink = self.unread.extend
        deadline = time.monotonic() + timeout
        chunks = iter(outgoing)
        current = memoryview(b"")
        sending = True
        shutdown_pending = half_close
        while True:
            want_read = want_write = False
            sent_now = 0
            while sending and sent_now < 4 * MiB:
                if not current:
                    chunk = next(chunks, None)
                    if chunk is None:
                        sending = False
                        break
                    current = memoryview(chunk)
                    continue
                try:
                    n = self.conn.send(current)
                except SSL.WantWriteError:
                    want_write = True
                    break
                except SSL.WantReadError:
                    want_read = True
                    break
                current = current[n:]
                sent_now += n
            if not sending and shutdown_pending:
                try:
                    self.conn.shutdown()
                    shutdown_pending = False
                    self.write_closed = True
                except SSL.WantWriteError:
                    want_write = True
                except SSL.WantReadError:
                    want_read = True
            self._drain(sink)
            if not sending and not shutdown_pending and (self.eof is not None or not until_eof):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"TLS client: pump not finished after {timeout:g}s "
                    f"(sending={sending}, shutdown_pending={shutdown_pending}, eof={self.eof})"
                )
            self._wait(self.eof is None or want_read, want_write, deadline)

    def send_all(self, data: bytes, timeout: float = 10.0) -> None:
        self.pump([data], until_eof=False, timeout=timeout)

    def shutdown_write(self, timeout: float = 10.0) -> None:
        self.pump(half_close=True, until_eof=False, timeout=timeout)

    def read_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        got = bytearray(self.unread)
        self.unread.clear()
        deadline = time.monotonic() + timeout
        while len(got) < n and self.eof is None:
            self._drain(got.extend)
            if len(got) >= n or self.eof is not None:
                break
            self._wait(True, False, deadline)
        assert len(got) >= n, f"wanted {n} bytes, got {bytes(got)!r} then {self.eof}"
        assert len(got) == n, f"more than the {n} bytes expected arrived: {bytes(got)!r}"
        return bytes(got)

    def read_to_eof(self, timeout: float = 10.0) -> bytes:
        got = bytearray(self.unread)
        self.unread.clear()
        self.pump(sink=got.extend, timeout=timeout)
        return bytes(got)


def _discard(data: bytes) -> None:
    pass


def auth_message(user, password: str | None, host: str, port: int) -> bytes:
    """``user`` is a `conftest.User` (its password is used unless
    ``password`` is given) or a plain name."""
    name = user if isinstance(user, str) else user.name
    if password is None:
        password = user.password
    return wire.encode_auth(wire.AuthRequest(name, password, host, port, wire.address_type_for(host)))


def connect(server, setup, **kwargs) -> TLSClient:
    client = TLSClient(server.port, str(setup.ca), **kwargs)
    try:
        client.handshake()
    except BaseException:
        client.close()
        raise
    return client




def outcome_line(server, client: TLSClient, since: int, timeout: float = 10.0) -> re.Match:
    """The server's outcome event for ``client``'s connection."""
    return server.wait_for(
        rf"tunnel (?P<outcome>\S+): client=127\.0\.0\.1:{client.local_port} user=(?P<user>\S+) "
        r"target=(?P<target>\S+) up=(?P<up>\d+) down=(?P<down>\d+)",
        timeout,
        since=since,
        what=f"outcome of client port {client.local_port}",
    )


# ---------------------------------------------------------------------------
# Target handlers (run in the target's threads, on blocking sockets)


def random_chunks(n: int, seed: int, chunk: int = MiB):
    rng = random.Random(seed)
    left = n
    while left:
        size = min(chunk, left)
        yield rng.randbytes(size)
        left -= size


def digest_of(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()




def bulk_handler(n: int, seed: int):
    """Receive to EOF (hashing) while sending ``n`` bytes; close when both
    are done."""
    def handle(sock: socket.socket) -> dict:
        received: dict = {}

        def receive() -> None:
            h = hashlib.sha256()
            count = 0
            try:
                while True:
                    chunk = sock.recv(MiB)
                    if not chunk:
                        break
                    h.update(chunk)
                    count += len(chunk)
            except BaseException as e:
                received["error"] = e
            received["digest"] = h.hexdigest()
            received["count"] = count

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        for chunk in random_chunks(n, seed):
            sock.sendall(chunk)
        reader.join(60)
        assert not reader.is_alive(), "target never saw EOF from the client"
        if "error" in received:
            raise received["error"]
        return received

    return handle








# ---------------------------------------------------------------------------
# 1. Bulk, both ways at once, with early data


def test_bulk_64mib_each_way_with_early_data(server, e2e_setup, make_target):
    up_seed, down_seed = 1, 2
    target = make_target(bulk_handler(BULK_SIZE, down_seed))
    expected_up = digest_of(random_chunks(BULK_SIZE, up_seed))
    expected_down = digest_of(random_chunks(BULK_SIZE, down_seed))
    since = server.mark()

    client = connect(server, e2e_setup)
    try:
        auth = auth_message(e2e_setup.alice, None, "127.0.0.1", target.port)

        def outgoing():
            chunks = random_chunks(BULK_SIZE, up_seed, chunk=256 * 1024)
            # The auth message and the first data in one write, before any
            # reply has been read.
            yield auth + next(chunks)
            yield from chunks

        head = bytearray()
        body = hashlib.sha256()
        counts = {"body": 0}

        def sink(data: bytes) -> None:
            if len(head) < 2:
                take = 2 - len(head)
                head.extend(data[:take])
                data = data[take:]
            if data:
                body.update(data)
                counts["body"] += len(data)

        started = time.monotonic()
        client.pump(outgoing(), sink, half_close=True, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        client.close()

    assert bytes(head) == REPLY_OK, f"reply {bytes(head)!r}" + server.describe(since)
    assert client.eof == "close_notify", client.eof
    got = target.result(timeout=30)
    assert got["count"] == BULK_SIZE, f"target received {got['count']} bytes" + server.describe(since)
    assert got["digest"] == expected_up, "client -> target data differ"
    assert counts["body"] == BULK_SIZE, f"client received {counts['body']} bytes" + server.describe(since)
    assert body.hexdigest() == expected_down, "target -> client data differ"
    line = outcome_line(server, client, since)
    assert line["outcome"] == "done", line.group(0)
    assert (int(line["up"]), int(line["down"])) == (BULK_SIZE, BULK_SIZE), line.group(0)
    print(f"bulk: 2 x {BULK_SIZE >> 20} MiB in {elapsed:.2f}s")


# ---------------------------------------------------------------------------
# 2, 3. Half-close in each direction


def test_client_half_close_then_target_replies(server, e2e_setup, make_target):
    target = make_target(reply_after_eof)
    since = server.mark()
    client = connect(server, e2e_setup)
    try:
        client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
        assert client.read_exactly(2) == REPLY_OK, server.describe(since)
        client.send_all(b"hello")
        client.shutdown_write()
        rest = client.read_to_eof()
    finally:
        client.close()
    assert target.result() == b"hello"
    assert rest == b"got:hello", f"{rest!r} then {client.eof}" + server.describe(since)
    assert client.eof == "close_notify", client.eof
    assert outcome_line(server, client, since)["outcome"] == "done"


def _target_half_closes_first(server, e2e_setup, make_target) -> tuple[TLSClient, int]:
    """The target sends "banner" and shuts its write side; the client reads
    to EOF, then sends "late" and half-closes."""
    target = make_target(banner_then_read)
    since = server.mark()
    client = connect(server, e2e_setup)
    try:
        client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
        received = client.read_to_eof()
        assert received == REPLY_OK + b"banner", f"{received!r} then {client.eof}" + server.describe(since)
        assert client.eof == "close_notify", f"the target's FIN arrived as {client.eof}" + server.describe(since)
        # Our direction is still open.
        client.send_all(b"late")
        client.shutdown_write()
    finally:
        client.close()
    assert target.result() == b"late", server.describe(since)
    return client, since


def test_target_half_close_then_client_sends(server, e2e_setup, make_target):
    _target_half_closes_first(server, e2e_setup, make_target)


def test_target_half_close_first_outcome_is_done(server, e2e_setup, make_target):
    """Both directions ended with a clean EOF, the target's first: the
    outcome event must say ``done``, as it does when the client's EOF comes
    first (test_client_half_close_then_target_replies)."""
    client, since = _target_half_closes_first(server, e2e_setup, make_target)
    line = outcome_line(server, client, since)
    assert line["outcome"] == "done", (
        f"both sides sent EOF but the outcome is {line['outcome']!r}: {line.group(0)}" + server.describe(since)
    )


# ---------------------------------------------------------------------------
# 4. Refusals


def _refusal_message(e2e_setup, kind: str, target_port: int) -> tuple[bytes, bool]:
    """The bytes to send and whether to half-close after them."""
    if kind == "bad-password":
        return auth_message(e2e_setup.alice, e2e_setup.wrong_password, "127.0.0.1", target_port), False
    if kind == "unknown-user":
        return auth_message("nobody-here", e2e_setup.wrong_password, "127.0.0.1", target_port), False
    if kind == "bad-version":
        message = auth_message(e2e_setup.alice, None, "127.0.0.1", target_port)
        return b"\x02" + message[1:], False
    if kind == "truncated":
        message = auth_message(e2e_setup.alice, None, "127.0.0.1", target_port)
        return message[: len(message) // 2], True
    if kind == "unreachable":
        return auth_message(e2e_setup.alice, None, "127.0.0.1", closed_port()), False
    raise AssertionError(kind)


REFUSALS = ["bad-password", "unknown-user", "bad-version", "truncated", "unreachable"]

#: What a reply_errors server answers; the default server answers nothing.
ERROR_REPLIES = {
    "bad-password": b"\x01\x02",
    "unknown-user": b"\x01\x02",
    "bad-version": b"\x01\x01",
    "truncated": b"",
    "unreachable": b"\x01\x03",
}


def _refused(server, setup, target, kind: str) -> tuple[bytes, TLSClient, int]:
    since = server.mark()
    message, half_close = _refusal_message(setup, kind, target.port)
    client = connect(server, setup)
    try:
        client.pump([message], half_close=half_close, until_eof=False)
        received = client.read_to_eof(timeout=10)
    finally:
        client.close()
    return received, client, since


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusal_default_closes_silently(server, e2e_setup, make_target, kind):
    target = make_target(echo)
    received, client, since = _refused(server, e2e_setup, target, kind)
    assert received == b"", f"{kind}: server sent {received!r}" + server.describe(since)
    assert client.eof in ("close_notify", "eof"), f"{kind}: ended with {client.eof}" + server.describe(since)
    outcome_line(server, client, since)
    assert target.accepted == 0


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusal_reply_errors(errors_server, e2e_setup, make_target, kind):
    target = make_target(echo)
    received, client, since = _refused(errors_server, e2e_setup, target, kind)
    expected = ERROR_REPLIES[kind]
    assert received == expected, (
        f"{kind}: expected {expected!r}, got {received!r} then {client.eof}" + errors_server.describe(since)
    )
    assert client.eof in ("close_notify", "eof"), f"{kind}: ended with {client.eof}" + errors_server.describe(since)
    assert target.accepted == 0


# ---------------------------------------------------------------------------
# 5. Legacy password hashes


def test_legacy_user_authenticates(server, e2e_setup, make_target):
    target = make_target(echo)
    since = server.mark()
    client = connect(server, e2e_setup)
    try:
        client.send_all(auth_message(e2e_setup.legacy, None, "127.0.0.1", target.port) + b"ping")
        client.shutdown_write()
        received = client.read_to_eof()
    finally:
        client.close()
    assert received == REPLY_OK + b"ping", f"{received!r} then {client.eof}" + server.describe(since)
    assert target.result() == b"ping"
    line = outcome_line(server, client, since)
    assert (line["outcome"], line["user"]) == ("done", e2e_setup.legacy.name), line.group(0)


# ---------------------------------------------------------------------------
# 6. The handshake deadline

def test_silent_tcp_client_is_closed(server, e2e_setup):
    limit = e2e_setup.handshake_timeout + 2.0
    since = server.mark()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    started = time.monotonic()
    try:
        sock.settimeout(limit + 5)
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            pytest.fail(f"still open after {limit + 5:g}s" + server.describe(since))
    finally:
        elapsed = time.monotonic() - started
        sock.close()
    assert data == b""
    assert elapsed <= limit, f"closed after {elapsed:.2f}s" + server.describe(since)
    assert elapsed >= e2e_setup.handshake_timeout * 0.8, f"closed already after {elapsed:.2f}s" + server.describe(since)
    server.wait_for(r"tunnel handshake-timeout: client=127\.0\.0\.1:\d+ user=None", 5, since=since)


def test_trickling_client_is_closed(server, e2e_setup, make_target):
    limit = e2e_setup.handshake_timeout + 2.0
    target = make_target(echo)
    since = server.mark()
    started = time.monotonic()
    client = connect(server, e2e_setup)
    message = auth_message(e2e_setup.alice, None, "127.0.0.1", target.port)
    closed_after = None
    try:
        for i in range(len(message)):
            try:
                client.send_all(message[i : i + 1], timeout=2)
            except SSL.Error:
                closed_after = time.monotonic() - started
                break
            end = time.monotonic() + 0.3
            while client.eof is None and time.monotonic() < end:
                select.select([client.sock], [], [], max(0.0, end - time.monotonic()))
                client._drain(_discard)
            if client.eof is not None:
                closed_after = time.monotonic() - started
                break
            if time.monotonic() - started > limit + 3:
                break
    finally:
        client.close()
    assert closed_after is not None, (
        f"still open after {time.monotonic() - started:.2f}s of trickling" + server.describe(since)
    )
    assert closed_after <= limit, f"closed after {closed_after:.2f}s" + server.describe(since)
    line = outcome_line(server, client, since)
    assert line["outcome"] == "handshake-timeout", line.group(0)
    assert target.accepted == 0


# ---------------------------------------------------------------------------
# 7. TLS version and ALPN


def test_tls12_only_client_fails(server, e2e_setup):
    since = server.mark()
    client = TLSClient(server.port, str(e2e_setup.ca), max_version=SSL.TLS1_2_VERSION)
    try:
        with pytest.raises(SSL.Error):
            client.handshake()
    finally:
        client.close()
    server.wait_for(rf"tunnel tls-error: client=127\.0\.0\.1:{client.local_port} ", 5, since=since)


def test_other_alpn_only_fails(server, e2e_setup):
    since = server.mark()
    client = TLSClient(server.port, str(e2e_setup.ca), alpn=[b"h2"])
    try:
        with pytest.raises(SSL.Error) as raised:
            client.handshake()
    finally:
        client.close()
    assert "no application protocol" in str(raised.value), raised.value
    server.wait_for(rf"tunnel tls-error: client=127\.0\.0\.1:{client.local_port} ", 5, since=since)


def test_no_alpn_succeeds(server, e2e_setup, make_target):
    target = make_target(echo)
    since = server.mark()
    client = connect(server, e2e_setup, alpn=None)
    try:
        assert client.alpn == b""
        assert client.conn.get_protocol_version_name() == "TLSv1.3"
        client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"no-alpn")
        client.shutdown_write()
        received = client.read_to_eof()
    finally:
        client.close()
    assert received == REPLY_OK + b"no-alpn", f"{received!r} then {client.eof}" + server.describe(since)


def test_mtop_alpn_is_selected(server, e2e_setup):
    client = connect(server, e2e_setup)
    try:
        assert client.alpn == b"mtop"
        assert client.conn.get_protocol_version_name() == "TLSv1.3"
    finally:
        client.close()


# ---------------------------------------------------------------------------
# 8. Passwords stay out of the log


def test_password_not_logged(server, errors_server, e2e_setup, make_target):
    target = make_target(echo)
    for srv in (server, errors_server):
        since = srv.mark()
        clients = []
        for user, password in ((e2e_setup.alice, None), (e2e_setup.legacy, None), (e2e_setup.alice, e2e_setup.wrong_password)):
            client = connect(srv, e2e_setup)
            clients.append(client)
            try:
                client.send_all(auth_message(user, password, "127.0.0.1", target.port) + b"x")
                client.shutdown_write()
                client.read_to_eof()
            finally:
                client.close()
        for client in clients:
            outcome_line(srv, client, since)
    for srv in (server, errors_server):
        log = srv.log()
        for password in e2e_setup.passwords:
            for form in (password, password.encode().hex(), repr(password.encode())):
                assert form not in log, f"{form!r} appears in the log" + srv.describe()
    assert "debug" in server.config.read_text()
