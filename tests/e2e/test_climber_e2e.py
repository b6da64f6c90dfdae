"""End to end through climber: real ``twistd climber`` and ``twistd mtop``
subprocesses, real curl (or a raw socket) as the application, and small
threaded origins (HTTP, HTTPS, a strict fake MTop server) in this process.
All traffic stays on 127.0.0.1.

::

    curl --(SOCKS5 / HTTP proxy / forward)--> climber --(MTop, TLS 1.3)--> mtop --> origin

Bodies are deterministic (`body_chunks`), so their SHA-256 is computed here
without holding them; big downloads go to files (``curl -o``).

The session fixtures ``climber`` and ``errors_climber`` (conftest.py) serve
most tests; tests that need other settings (failover, local auth, timeouts,
a fake server) start their own with ``make_climber``.  Every climber logs at
debug level, and tests check its log holds no traceback and no password.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from mtop import wire
from peers import closed_port, TargetServer, banner_then_read, echo, recv_to_eof, reply_after_eof
from mtop.urls import ServerLink, make_url

MiB = 1 << 20
BULK_SIZE = 64 * MiB
#: Deterministic bodies repeat one random block; its odd length keeps the
#: repetition out of step with any power-of-two buffer size, so a lost,
#: doubled or reordered buffer changes the hash.
BLOCK_SIZE = MiB + 13
CURL_MAX_TIME = 60
SOCKET_TIMEOUT = 15.0


# ---------------------------------------------------------------------------
# Deterministic bodies


@functools.lru_cache(maxsize=8)
def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK_SIZE)


def body_chunks(size: int, seed: int) -> Iterator[memoryview]:
    """The first ``size`` bytes of ``seed``'s block repeated."""
    block = memoryview(_block(seed))
    position = 0
    left = size
    while left:
        n = min(BLOCK_SIZE - position, left)
        yield block[position : position + n]
        left -= n
        position = (position + n) % BLOCK_SIZE


def body_bytes(size: int, seed: int) -> bytes:
    return b"".join(body_chunks(size, seed))


@functools.lru_cache(maxsize=32)
def body_digest(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in body_chunks(size, seed):
        h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_body_file(path: Path, size: int, seed: int) -> Path:
    with open(path, "wb") as f:
        for chunk in body_chunks(size, seed):
            f.write(chunk)
    return path


# ---------------------------------------------------------------------------
# The origin: a threaded HTTP/1.1 server (optionally TLS)


class OriginHandler(BaseHTTPRequestHandler):
    """Routes (``size`` and ``seed`` are query parameters):

    ``/bulk``     the body with Content-Length;
    ``/chunked``  the body with Transfer-Encoding: chunked;
    ``/close``    the body delimited by closing the connection;
    ``/headers``  JSON of the request line and header fields as received;
    ``/truncate`` Content-Length ``size`` but only half the body, then close;
    ``/status``   status ``seed`` (204, 304) without a body;
    ``POST /upload``  reads the body (Content-Length or chunked) and answers
                  JSON with its length, SHA-256 and framing; ``delay``
                  seconds first, if given.
    """

    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds per socket operation
    # Every write goes out at once.  With Nagle's algorithm a write right
    # after another (``/reject``'s 413 just after the automatic 100
    # Continue) waits for the first one's acknowledgement, and closing with
    # the request body unread then resets the connection and drops it: the
    # client got a 100 Continue and no answer in a loaded CI run.
    disable_nagle_algorithm = True
    server: "Origin"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append({"line": self.requestline, "headers": list(self.headers.items())})

    def _query(self) -> tuple[str, int, int]:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        return parts.path, int(query.get("size", ["0"])[0]), int(query.get("seed", ["0"])[0])

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        self._record()
        path, size, seed = self._query()
        if path == "/headers":
            payload = json.dumps({"line": self.requestline, "headers": list(self.headers.items())}).encode()
            self._fixed(payload, "application/json", send_body)
        elif path == "/bulk":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if send_body:
                for chunk in body_chunks(size, seed):
                    self.wfile.write(chunk)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if send_body:
                for chunk in body_chunks(size, seed):
                    # Uneven chunk sizes, and never one chunk per block.
                    for piece in (chunk[:777], chunk[777:]):
                        if piece:
                            self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                self.wfile.write(b"0\r\nX-Trailer: end\r\n\r\n")
        elif path == "/truncate":
            # Promises ``size`` bytes, sends half, and closes.
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if send_body:
                self.wfile.write(body_bytes(size // 2, seed))
        elif path == "/status":
            # A status without a body, with a misleading Content-Length
            # (allowed for 304: the length the full response would have).
            code = seed
            self.send_response(code)
            if code == 304:
                self.send_header("Content-Length", "12345")
            self.end_headers()
        elif path == "/close":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if send_body:
                for chunk in body_chunks(size, seed):
                    self.wfile.write(chunk)
        else:
            self._fixed(b"not found\n", "text/plain", send_body, status=404)

    def _fixed(self, payload: bytes, content_type: str, send_body: bool, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if send_body:
            self.wfile.write(payload)

    def do_POST(self) -> None:
        self._record()
        if urlsplit(self.path).path == "/reject":
            # An early final response: the body is never read.
            self.close_connection = True
            self._fixed(b"too large\n", "text/plain", True, status=413)
            return
        delay = float(parse_qs(urlsplit(self.path).query).get("delay", ["0"])[0])
        if delay:
            time.sleep(delay)  # a slow reader: the sender must be held back
        h = hashlib.sha256()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            framing = "chunked"
            length = self._read_chunked(h)
        else:
            framing = "length"
            length = int(self.headers.get("Content-Length", "0"))
            left = length
            while left:
                data = self.rfile.read(min(left, MiB))
                if not data:
                    raise EOFError(f"request body ended {left} bytes early")
                h.update(data)
                left -= len(data)
        self._fixed(
            json.dumps({"length": length, "sha256": h.hexdigest(), "framing": framing}).encode(),
            "application/json",
            True,
        )

    def _read_chunked(self, h) -> int:
        total = 0
        while True:
            line = self.rfile.readline(4096)
            if not line.endswith(b"\n"):
                raise EOFError(f"bad chunk-size line {line!r}")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return total
            left = size
            while left:
                data = self.rfile.read(min(left, MiB))
                if not data:
                    raise EOFError("request body ended inside a chunk")
                h.update(data)
                left -= len(data)
            total += size
            if self.rfile.readline(4096) not in (b"\r\n", b"\n"):
                raise EOFError("chunk data not followed by CRLF")


class Origin(ThreadingHTTPServer):
    """An `OriginHandler` server on 127.0.0.1, port 0, in a thread."""

    daemon_threads = True

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), OriginHandler)
        self.tls_context = tls_context
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def finish_request(self, request, client_address) -> None:
        # Runs in the connection's own thread, so a slow TLS handshake
        # holds up nobody else.
        request.settimeout(60)
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        with self.tls_context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address) -> None:
        # Clients that leave early are part of some tests: keep the
        # exception (for assertions) instead of printing it.
        with self.lock:
            self.errors.append(sys.exc_info()[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def make_origin():
    origins: list[Origin] = []

    def make(tls_context: ssl.SSLContext | None = None) -> Origin:
        origin = Origin(tls_context)
        origins.append(origin)
        return origin

    yield make
    for origin in origins:
        origin.close()


@pytest.fixture
def origin(make_origin) -> Origin:
    return make_origin()


def server_tls_context(setup) -> ssl.SSLContext:
    """The e2e server certificate (valid for localhost and 127.0.0.1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(setup.dir / "certs" / "server.crt", setup.dir / "certs" / "server.key")
    return ctx




# ---------------------------------------------------------------------------
# curl


def curl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    return env


class CurlResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr.decode("utf-8", "replace")
        # The last line of stdout is -w's "status=NNN".
        match = re.search(rb"status=(\d{3})$", proc.stdout)
        self.status = int(match.group(1)) if match else None
        self.output = proc.stdout[: match.start()] if match else proc.stdout

    def __repr__(self) -> str:
        return f"<curl rc={self.returncode} status={self.status} stderr={self.stderr.strip()!r}>"


def curl(*args: str, max_time: float = CURL_MAX_TIME) -> CurlResult:
    """curl, silent but for errors, with ``status=NNN`` appended to stdout."""
    command = [
        "curl", "--silent", "--show-error", "--max-time", f"{max_time:g}",
        "--connect-timeout", "10", "-w", "status=%{http_code}", *args,
    ]
    proc = subprocess.run(command, capture_output=True, timeout=max_time + 30, env=curl_env(), stdin=subprocess.DEVNULL)
    return CurlResult(proc)


def proxy_args(climber) -> list[str]:
    return ["-x", f"http://127.0.0.1:{climber.http_port}"]


def assert_body(path: Path, size: int, seed: int, context: str = "") -> None:
    got_size, got_digest = file_digest(path)
    assert got_size == size, f"body is {got_size} bytes, expected {size}{context}"
    assert got_digest == body_digest(size, seed), f"body of {size} bytes differs{context}"


def assert_clean_log(process, since: int = 0) -> None:
    log = process.log(since)
    for bad in ("Traceback", "Unhandled Error", "Unhandled error"):
        assert bad not in log, f"{bad!r} in the log" + process.describe(since)


# ---------------------------------------------------------------------------
# Raw sockets: SOCKS5 requests, HTTP responses


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {bytes(data)!r}, wanted {n} bytes")
        data += chunk
    return bytes(data)




def socks5_request(port: int, host: str, target_port: int, command: int = 1) -> tuple[socket.socket, bytes]:
    """Greeting (no auth), then a request for an IPv4 ``host``; returns the
    socket and the complete reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05" + bytes([command]) + b"\x00\x01" + socket.inet_aton(host) + target_port.to_bytes(2, "big"))
        reply = recv_exactly(sock, 4)
        atyp = reply[3]
        if atyp == 1:
            rest = recv_exactly(sock, 6)
        elif atyp == 4:
            rest = recv_exactly(sock, 18)
        else:
            length = recv_exactly(sock, 1)
            rest = length + recv_exactly(sock, length[0] + 2)
        return sock, reply + rest
    except BaseException:
        sock.close()
        raise


class _Unclosable(io.BufferedReader):
    """http.client closes a response's file at its end; these bytes hold
    the next response too."""

    def close(self) -> None:
        pass


class _Replay:
    """Lets http.client parse responses out of bytes already received."""

    def __init__(self, fp):
        self.fp = fp

    def makefile(self, mode: str):
        return self.fp


def parse_responses(data: bytes, methods: list[str]) -> list[tuple[http.client.HTTPResponse, bytes]]:
    fp = _Unclosable(io.BytesIO(data))
    responses = []
    for method in methods:
        response = http.client.HTTPResponse(_Replay(fp), method=method)
        response.begin()
        body = response.read()
        responses.append((response, body))
    assert fp.read() == b"", "bytes after the last response"
    return responses


def read_response(sock: socket.socket, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """One response from a live socket (the socket stays usable)."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response, body


# ---------------------------------------------------------------------------
# Target handlers (for conftest's make_target)








def digest_to_eof(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    count = 0
    while chunk := sock.recv(MiB):
        h.update(chunk)
        count += len(chunk)
    sock.sendall(b"ok")
    return count, h.hexdigest()


# ---------------------------------------------------------------------------
# A strict fake MTop server


class StrictMTopServer(TargetServer):
    """A fake MTop server in threads, as strict as the original: after the
    auth message it waits `GRACE` seconds and closes if anything more
    arrived; otherwise it replies 01 00 and echoes to EOF.  Each
    connection's verdict is what `result` returns."""

    GRACE = 0.5

    def __init__(self, setup):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.set_alpn_protocols(["mtop"])
        self.context.load_cert_chain(setup.dir / "certs" / "server.crt", setup.dir / "certs" / "server.key")
        super().__init__(self._serve_tls)

    def _serve_tls(self, conn: socket.socket) -> dict:
        conn.settimeout(10)
        with self.context.wrap_socket(conn, server_side=True) as tls:
            return self._handle(tls)

    def _handle(self, tls: ssl.SSLSocket) -> dict:
        result: dict = {"alpn": tls.selected_alpn_protocol(), "version": tls.version()}
        buf = b""
        while (parsed := wire.parse_auth(buf)) is None:
            data = tls.recv(4096)
            if not data:
                return {**result, "verdict": "eof before the auth message"}
            buf += data
        result["request"] = parsed.request
        early = buf[parsed.consumed :]
        if not early:
            tls.settimeout(self.GRACE)
            try:
                early = tls.recv(4096)
            except (socket.timeout, TimeoutError):
                early = b""
            tls.settimeout(10)
        if early:
            return {**result, "verdict": "early data", "early": early}
        tls.sendall(wire.REPLY_SUCCESS)
        echoed = bytearray()
        while data := tls.recv(65536):
            echoed += data
            tls.sendall(data)
        return {**result, "verdict": "ok", "echoed": bytes(echoed)}


@pytest.fixture
def strict_server(e2e_setup):
    fake = StrictMTopServer(e2e_setup)
    yield fake
    fake.close()


# ---------------------------------------------------------------------------
# SOCKS5


def test_socks5_download_64mib(climber, server, origin, tmp_path):
    since = climber.mark()
    out = tmp_path / "bulk.bin"
    started = time.monotonic()
    result = curl(
        "--socks5-hostname", f"127.0.0.1:{climber.socks5_port}",
        f"http://localhost:{origin.port}/bulk?size={BULK_SIZE}&seed=11", "-o", str(out),
    )
    elapsed = time.monotonic() - started
    assert (result.returncode, result.status) == (0, 200), repr(result) + climber.describe(since)
    assert_body(out, BULK_SIZE, 11, climber.describe(since))
    line = climber.wait_for(
        rf"socks5 tunnel \S+: client=127\.0\.0\.1:\d+ target=localhost:{origin.port} "
        rf"via=127\.0\.0\.1:{server.port} up=\d+ down=(\d+)",
        10, since=since, what="the outcome of the download",
    )
    assert int(line.group(1)) >= BULK_SIZE, line.group(0)
    assert_clean_log(climber, since)
    print(f"SOCKS5: {BULK_SIZE >> 20} MiB down in {elapsed:.2f}s")


def test_socks5_client_half_close(climber, make_target):
    target = make_target(reply_after_eof)
    since = climber.mark()
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
    try:
        assert reply[:2] == b"\x05\x00", reply.hex()
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        received = recv_to_eof(sock)
    finally:
        sock.close()
    assert target.result() == b"hello"
    assert received == b"got:hello", f"{received!r}" + climber.describe(since)
    line = climber.wait_for(rf"socks5 tunnel (\S+): .* target=127\.0\.0\.1:{target.port} ", 10, since=since)
    assert line.group(1) == "done", line.group(0)


def test_socks5_target_half_close(climber, make_target):
    target = make_target(banner_then_read)
    since = climber.mark()
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
    try:
        assert reply[:2] == b"\x05\x00", reply.hex()
        received = recv_to_eof(sock)
        assert received == b"banner", f"{received!r}" + climber.describe(since)
        # Our direction is still open.
        sock.sendall(b"late")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    finally:
        sock.close()
    assert target.result() == b"late", climber.describe(since)
    line = climber.wait_for(rf"socks5 tunnel (\S+): .* target=127\.0\.0\.1:{target.port} ", 10, since=since)
    assert line.group(1) == "done", line.group(0)


def test_socks5_optimistic_data_and_eof_before_reply(climber, make_target):
    """Greeting, request, payload and EOF all at once: the payload and the
    EOF wait in climber while the tunnel opens, then go through."""
    target = make_target(reply_after_eof)
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.socks5_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(
            b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target.port.to_bytes(2, "big")
            + b"early payload"
        )
        sock.shutdown(socket.SHUT_WR)
        received = recv_to_eof(sock)
    finally:
        sock.close()
    assert target.result() == b"early payload", climber.describe(since)
    assert received[:4] == b"\x05\x00\x05\x00", received.hex()
    assert received[12:] == b"got:early payload", f"{received!r}" + climber.describe(since)


def test_socks5_optimistic_megabytes(climber, make_target):
    """Greeting, request and 8 MiB sent without waiting for any reply: all
    of it arrives (climber stops reading while the tunnel opens instead of
    buffering or dropping)."""
    target = make_target(digest_to_eof)
    since = climber.mark()
    size = 8 * MiB
    sock = socket.create_connection(("127.0.0.1", climber.socks5_port), timeout=SOCKET_TIMEOUT)
    received = bytearray()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target.port.to_bytes(2, "big"))
        for chunk in body_chunks(size, 142):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reader.join(SOCKET_TIMEOUT)
    finally:
        sock.close()
    assert target.result() == (size, body_digest(size, 142)), climber.describe(since)
    assert bytes(received[:4]) == b"\x05\x00\x05\x00" and bytes(received[12:]) == b"ok", bytes(received[:40])
    assert_clean_log(climber, since)


def test_socks5_client_leaves_mid_download(climber, server, origin):
    """A client that vanishes during a 64 MiB download: climber closes the
    tunnel (the origin's write fails) and logs the outcome, without
    tracebacks."""
    since, server_since = climber.mark(), server.mark()
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", origin.port)
    try:
        assert reply[:2] == b"\x05\x00", reply.hex()
        sock.sendall(f"GET /bulk?size={BULK_SIZE}&seed=3 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        recv_exactly(sock, MiB)
        # Unread data: the kernel answers the close with a reset.
    finally:
        sock.close()
    line = climber.wait_for(rf"socks5 tunnel (\S+): .* target=127\.0\.0\.1:{origin.port} .* down=(\d+)", 10, since=since)
    assert line.group(1) == "client-closed", line.group(0)
    assert int(line.group(2)) < BULK_SIZE, line.group(0)
    server.wait_for(rf"tunnel \S+: client=\S+ user=alice target=127\.0\.0\.1:{origin.port} ", 10, since=server_since)
    deadline = time.monotonic() + 10
    while not origin.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert origin.errors, "the origin went on sending: the tunnel was not closed"
    assert_clean_log(climber, since)
    assert_clean_log(server, server_since)


@pytest.mark.parametrize(
    "which,expected",
    [("climber", b"\x05\x05"), ("errors_climber", b"\x05\x04")],
    ids=["closed-without-reply:connection-refused", "reply-03:host-unreachable"],
)
def test_socks5_refused_target(request, which, expected):
    climber = request.getfixturevalue(which)
    since = climber.mark()
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", closed_port())
    sock.close()
    assert reply[:2] == expected, f"reply {reply.hex()}, expected {expected.hex()}" + climber.describe(since)
    assert_clean_log(climber, since)


def test_socks5_unknown_address_type(climber):
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.socks5_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x09" + b"\x7f\x00\x00\x01\x00\x50")
        answer = recv_to_eof(sock)
    finally:
        sock.close()
    assert answer[:2] == b"\x05\x08", f"{answer.hex()}, expected 05 08" + climber.describe(since)
    assert_clean_log(climber, since)


def test_socks5_bind_not_supported(climber, origin):
    since = climber.mark()
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", origin.port, command=2)
    try:
        assert reply[:2] == b"\x05\x07", f"reply {reply.hex()}, expected 05 07" + climber.describe(since)
        assert recv_to_eof(sock) == b""
    finally:
        sock.close()
    assert origin.requests == []
    assert_clean_log(climber, since)


@pytest.mark.parametrize(
    "greeting",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x05\x00"],
    ids=["http", "socks4", "no-methods"],
)
def test_socks5_malformed_greeting_closes_cleanly(climber, greeting):
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.socks5_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(greeting)
        sock.shutdown(socket.SHUT_WR)
        received = recv_to_eof(sock)
    finally:
        sock.close()
    # A greeting without methods may get "no acceptable methods"; nothing else.
    assert received in (b"", b"\x05\xff"), f"got {received!r}" + climber.describe(since)
    time.sleep(0.2)  # let climber log whatever it logs about it
    assert_clean_log(climber, since)
    assert "Traceback" not in climber.log(since)


# ---------------------------------------------------------------------------
# HTTP proxy, plain http:// requests


@pytest.mark.parametrize(
    "route, size",
    [("bulk", BULK_SIZE), ("chunked", 8 * MiB), ("close", 8 * MiB), ("bulk", 0)],
    ids=["content-length-64mib", "chunked-8mib", "close-delimited-8mib", "empty"],
)
def test_http_proxy_download(climber, origin, tmp_path, route, size):
    since = climber.mark()
    out = tmp_path / "body.bin"
    result = curl(*proxy_args(climber), f"http://127.0.0.1:{origin.port}/{route}?size={size}&seed=21", "-o", str(out))
    assert (result.returncode, result.status) == (0, 200), repr(result) + climber.describe(since)
    assert_body(out, size, 21, climber.describe(since))
    [request] = origin.requests
    assert request["line"] == f"GET /{route}?size={size}&seed=21 HTTP/1.1", request
    line = climber.wait_for(
        rf"http tunnel done: client=127\.0\.0\.1:\d+ target=127\.0\.0\.1:{origin.port} via=\S+ up=\d+ down=(\d+)",
        10, since=since, what="the request's outcome",
    )
    assert int(line.group(1)) >= size, line.group(0)
    assert_clean_log(climber, since)


def test_http_proxy_head(climber, origin):
    since = climber.mark()
    result = curl(
        *proxy_args(climber), "--head", f"http://127.0.0.1:{origin.port}/bulk?size={BULK_SIZE}&seed=1", max_time=20
    )
    assert (result.returncode, result.status) == (0, 200), repr(result) + climber.describe(since)
    head = result.output.decode("latin-1")
    assert re.search(rf"(?im)^content-length: {BULK_SIZE}\r?$", head), head
    assert origin.requests[0]["line"].startswith("HEAD /bulk?"), origin.requests


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory) -> Path:
    return write_body_file(tmp_path_factory.mktemp("upload") / "upload.bin", BULK_SIZE, 31)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_http_proxy_upload_64mib(climber, origin, upload_file, chunked):
    since = climber.mark()
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    result = curl(
        *proxy_args(climber), *extra, "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{upload_file}", f"http://127.0.0.1:{origin.port}/upload",
    )
    assert (result.returncode, result.status) == (0, 200), repr(result) + climber.describe(since)
    answer = json.loads(result.output)
    assert answer == {
        "length": BULK_SIZE,
        "sha256": body_digest(BULK_SIZE, 31),
        "framing": "chunked" if chunked else "length",
    }, climber.describe(since)
    assert_clean_log(climber, since)


def test_http_proxy_early_response_to_upload(climber, origin, upload_file):
    """The origin answers 413 without reading a 64 MiB body (curl gets the
    413 when it talks to the origin directly): through the proxy the client
    must still get the 413, not a reset or a 502."""
    since = climber.mark()
    result = curl(*proxy_args(climber), "--data-binary", f"@{upload_file}", f"http://127.0.0.1:{origin.port}/reject", max_time=30)
    assert (result.returncode, result.status) == (0, 413), repr(result) + climber.describe(since)
    assert result.output == b"too large\n"
    assert_clean_log(climber, since)


def test_http_proxy_truncated_response_is_cut(climber, origin, tmp_path):
    """The origin closes before the Content-Length it announced: the client
    must see a truncated transfer (not a complete one, not a hang)."""
    since = climber.mark()
    result = curl(
        *proxy_args(climber), f"http://127.0.0.1:{origin.port}/truncate?size={4 * MiB}&seed=5",
        "-o", str(tmp_path / "partial.bin"), max_time=20,
    )
    assert result.returncode == 18, f"expected curl's 18 (partial file), got {result!r}" + climber.describe(since)
    line = climber.wait_for(rf"http tunnel (\S+): .* target=127\.0\.0\.1:{origin.port} ", 10, since=since)
    assert line.group(1) == "origin-error", line.group(0)
    assert_clean_log(climber, since)


# ---------------------------------------------------------------------------
# HTTP proxy connections: keep-alive, hop-by-hop headers, pipelining


def test_http_proxy_keep_alive_two_origins(climber, make_origin):
    one, two = make_origin(), make_origin()
    since = climber.mark()
    conn = http.client.HTTPConnection("127.0.0.1", climber.http_port, timeout=SOCKET_TIMEOUT)
    sock = None

    def exchange(method: str, origin: Origin, path: str, body: bytes | None = None, **headers: str):
        nonlocal sock
        url = f"http://127.0.0.1:{origin.port}{path}"
        conn.request(method, url, body=body, headers={"Host": f"127.0.0.1:{origin.port}", **headers})
        response = conn.getresponse()
        data = response.read()
        if sock is None:
            sock = conn.sock
        assert conn.sock is not None and conn.sock is sock, (
            f"{method} {url}: the proxy connection was not kept open "
            f"(Connection: {response.getheader('Connection')})" + climber.describe(since)
        )
        return response, data

    try:
        hop_headers = {
            "Proxy-Connection": "keep-alive",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Connection": "keep-alive, X-Hop-Secret",
            "X-Hop-Secret": "must-not-pass",
            "Keep-Alive": "timeout=30",
            "X-End-To-End": "kept",
        }
        response, data = exchange("GET", one, "/headers", **hop_headers)
        assert response.status == 200
        seen = json.loads(data)
        names = {name.lower(): value for name, value in seen["headers"]}
        assert seen["line"] == "GET /headers HTTP/1.1", seen
        for hop in ("proxy-connection", "proxy-authorization", "x-hop-secret", "keep-alive"):
            assert hop not in names, f"the origin saw {hop}: {seen['headers']}"
        assert names.get("connection") == "close", seen["headers"]
        assert names.get("host") == f"127.0.0.1:{one.port}", seen["headers"]
        assert names.get("x-end-to-end") == "kept", seen["headers"]
        assert [n for n, _ in seen["headers"]].count("Host") == 1, seen["headers"]

        response, data = exchange("GET", two, f"/bulk?size={MiB + 5}&seed=51")
        assert (response.status, data) == (200, body_bytes(MiB + 5, 51))

        payload = body_bytes(300_000, 52)
        response, data = exchange("POST", one, "/upload", body=payload, **{"Content-Type": "application/octet-stream"})
        assert json.loads(data) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "framing": "length"}

        response, data = exchange("GET", two, "/chunked?size=300001&seed=53")
        assert (response.status, data) == (200, body_bytes(300_001, 53))

        response, data = exchange("HEAD", one, "/bulk?size=5000&seed=54")
        assert (response.status, data, response.getheader("Content-Length")) == (200, b"", "5000")

        # No body, whatever Content-Length says; the next exchange must not
        # wait for one.
        response, data = exchange("GET", one, "/status?seed=304")
        assert (response.status, data) == (304, b"")
        response, data = exchange("GET", two, "/status?seed=204")
        assert (response.status, data) == (204, b"")

        response, data = exchange("GET", two, "/headers")
        names = {name.lower(): value for name, value in json.loads(data)["headers"]}
        assert names.get("host") == f"127.0.0.1:{two.port}", names
        assert names.get("connection") == "close", names
    finally:
        conn.close()
    assert len(one.requests) == 4 and len(two.requests) == 4, (one.requests, two.requests)
    assert_clean_log(climber, since)


def test_http_proxy_pipelined_requests(climber, make_origin):
    """Three requests in one write, to two origins: answered in order."""
    one, two = make_origin(), make_origin()
    since = climber.mark()
    requests = [
        ("GET", one, f"/bulk?size={MiB}&seed=71", ""),
        ("POST", two, "/upload", "Content-Length: 5\r\n"),
        ("GET", two, "/chunked?size=70000&seed=72", "Connection: close\r\n"),
    ]
    raw = b""
    for method, origin, path, extra in requests:
        raw += f"{method} http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n{extra}\r\n".encode()
        if method == "POST":
            raw += b"hello"
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(raw)
        data = recv_to_eof(sock)
    finally:
        sock.close()
    try:
        (r1, b1), (r2, b2), (r3, b3) = parse_responses(data, ["GET", "POST", "GET"])
    except Exception as e:
        raise AssertionError(f"{e!r} parsing {len(data)} bytes: {data[:300]!r}" + climber.describe(since)) from e
    assert (r1.status, b1) == (200, body_bytes(MiB, 71))
    assert r2.status == 200 and json.loads(b2)["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert (r3.status, b3) == (200, body_bytes(70000, 72))
    assert r3.getheader("Connection") == "close"
    assert_clean_log(climber, since)


def test_http_proxy_http10_keep_alive(climber, origin):
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        for seed in (91, 92):
            sock.sendall(
                f"GET http://127.0.0.1:{origin.port}/bulk?size=1000&seed={seed} HTTP/1.0\r\n"
                f"Host: 127.0.0.1:{origin.port}\r\nConnection: keep-alive\r\n\r\n".encode()
            )
            response, body = read_response(sock)
            assert (response.status, body) == (200, body_bytes(1000, seed)), climber.describe(since)
            assert (response.getheader("Connection") or "").lower() == "keep-alive", response.getheaders()
        # Without keep-alive, HTTP/1.0 means one exchange.
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/bulk?size=10&seed=93 HTTP/1.0\r\n\r\n".encode())
        response, body = read_response(sock)
        assert (response.status, body) == (200, body_bytes(10, 93))
        assert recv_to_eof(sock) == b""
    finally:
        sock.close()
    assert [r["line"].split()[-1] for r in origin.requests] == ["HTTP/1.0"] * 3
    assert_clean_log(climber, since)


def test_http_proxy_expect_100_continue(climber, origin):
    """The client waits for 100 Continue before sending its body: climber
    must send the head on at once and pass the origin's 100 back."""
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(
            f"POST http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Content-Length: 11\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, f"closed after {interim!r}" + climber.describe(since)
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(b"hello world")
        response, body = read_response(sock, "POST")
    finally:
        sock.close()
    assert response.status == 200
    assert json.loads(body)["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert_clean_log(climber, since)


def test_http_proxy_drops_content_length_beside_chunked(climber, origin):
    """Transfer-Encoding and Content-Length together: the origin gets the
    chunked body and no Content-Length (no way to read it two ways)."""
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(
            f"POST http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".encode()
        )
        response, body = read_response(sock, "POST")
    finally:
        sock.close()
    assert response.status == 200, body
    assert json.loads(body) == {"length": 11, "sha256": hashlib.sha256(b"hello world").hexdigest(), "framing": "chunked"}
    names = [name.lower() for name, _ in origin.requests[0]["headers"]]
    assert "content-length" not in names and names.count("transfer-encoding") == 1, origin.requests[0]
    assert_clean_log(climber, since)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_http_proxy_client_half_closes_after_request(climber, origin, method):
    """Like ``printf 'GET ...' | nc``: the request, then EOF at once.  The
    response must still arrive in full, ending with a close."""
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        if method == "GET":
            path, extra = f"/bulk?size={2 * MiB}&seed=141", b""
        else:
            path, extra = "/upload", b"Content-Length: 9\r\n\r\nhalf-shut"
        sock.sendall(
            f"{method} http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n".encode()
            + (extra or b"\r\n")
        )
        sock.shutdown(socket.SHUT_WR)
        data = recv_to_eof(sock)
    finally:
        sock.close()
    try:
        [(response, body)] = parse_responses(data, [method])
    except Exception as e:
        raise AssertionError(f"{e!r} parsing {len(data)} bytes: {data[:300]!r}" + climber.describe(since)) from e
    assert response.status == 200, climber.describe(since)
    if method == "GET":
        assert body == body_bytes(2 * MiB, 141)
    else:
        assert json.loads(body)["sha256"] == hashlib.sha256(b"half-shut").hexdigest()
    assert_clean_log(climber, since)


def test_http_proxy_request_then_connect_same_connection(climber, origin, make_target):
    target = make_target(echo)
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/bulk?size=2000&seed=8 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        response, body = read_response(sock)
        assert (response.status, body) == (200, body_bytes(2000, 8)), climber.describe(since)
        sock.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, f"closed after {head!r}" + climber.describe(since)
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(b"after a plain request")
        assert recv_exactly(sock, 21) == b"after a plain request"
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    finally:
        sock.close()
    assert target.result() == b"after a plain request"
    assert_clean_log(climber, since)


# ---------------------------------------------------------------------------
# HTTP proxy: CONNECT


def test_http_proxy_connect_https(climber, e2e_setup, make_origin, tmp_path):
    origin = make_origin(server_tls_context(e2e_setup))
    since = climber.mark()
    size = 16 * MiB
    out = tmp_path / "tls.bin"
    result = curl(
        *proxy_args(climber), "--cacert", str(e2e_setup.ca),
        f"https://localhost:{origin.port}/bulk?size={size}&seed=41", "-o", str(out),
    )
    assert (result.returncode, result.status) == (0, 200), repr(result) + climber.describe(since)
    assert_body(out, size, 41, climber.describe(since))
    climber.wait_for(
        rf"http tunnel \S+: client=127\.0\.0\.1:\d+ target=localhost:{origin.port} ", 10, since=since,
        what="the CONNECT tunnel's outcome",
    )
    assert_clean_log(climber, since)


def test_http_proxy_connect_with_early_data(climber, make_target):
    """A client that sends its first bytes right behind the CONNECT head."""
    target = make_target(echo)
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(
            f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n\r\n".encode()
            + b"right behind the head"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, f"closed after {head!r}" + climber.describe(since)
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.shutdown(socket.SHUT_WR)
        received = recv_to_eof(sock)
    finally:
        sock.close()
    assert received == b"right behind the head", f"{received!r}" + climber.describe(since)
    assert target.result() == b"right behind the head"


# ---------------------------------------------------------------------------
# HTTP proxy error responses


def test_http_proxy_unreachable_target_is_502(errors_climber):
    since = errors_climber.mark()
    result = curl("-x", f"http://127.0.0.1:{errors_climber.http_port}", f"http://127.0.0.1:{closed_port()}/", max_time=20)
    assert result.status == 502, repr(result) + errors_climber.describe(since)
    assert_clean_log(errors_climber, since)


def test_http_proxy_connect_unreachable_target_is_502(errors_climber):
    since = errors_climber.mark()
    sock = socket.create_connection(("127.0.0.1", errors_climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        port = closed_port()
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answer = recv_to_eof(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 502 "), f"{answer[:200]!r}" + errors_climber.describe(since)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET http://127.0.0.1:1/ HTTP/1.1 extra\r\n\r\n", 400),
        (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
        (b"GET /origin-form HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET http://127.0.0.1:1/ HTTP/2.0\r\n\r\n", 505),
        (b"GET https://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 501),
        (b"GET http://127.0.0.1:1/ HTTP/1.1\r\n" + b"X-Big: " + b"x" * 70000 + b"\r\n\r\n", 431),
    ],
    ids=["one-word", "extra-field", "binary", "origin-form", "bad-header", "http2", "https-scheme", "huge-head"],
)
def test_http_proxy_bad_request(climber, request_bytes, status):
    """Requests climber refuses itself, each with its status and no tunnel."""
    since = climber.mark()
    sock = socket.create_connection(("127.0.0.1", climber.http_port), timeout=SOCKET_TIMEOUT)
    try:
        try:
            sock.sendall(request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole head was sent; the answer is still there
        answer = recv_to_eof(sock)
    finally:
        sock.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), f"{answer[:200]!r}" + climber.describe(since)
    assert "tunnel" not in climber.log(since), climber.describe(since)
    assert_clean_log(climber, since)


# ---------------------------------------------------------------------------
# Local proxy authentication


LOCAL_USER = "local-user"


LOCAL_PASSWORD = "Local-pw-5e81b2f4"


def test_local_proxy_auth(server, make_climber, make_origin, e2e_setup, tmp_path):
    origin = make_origin()
    auth = {"username": LOCAL_USER, "password": LOCAL_PASSWORD}
    client = make_climber([server], name="auth", socks5=auth, http=auth)
    url = f"http://127.0.0.1:{origin.port}/bulk?size=100000&seed=81"
    socks = f"127.0.0.1:{client.socks5_port}"
    proxy = f"http://127.0.0.1:{client.http_port}"
    out = tmp_path / "body.bin"

    result = curl("--socks5-hostname", f"{LOCAL_USER}:{LOCAL_PASSWORD}@{socks}", url, "-o", str(out))
    assert (result.returncode, result.status) == (0, 200), repr(result) + client.describe()
    assert_body(out, 100000, 81)
    out.unlink()
    result = curl("-x", proxy, "-U", f"{LOCAL_USER}:{LOCAL_PASSWORD}", url, "-o", str(out))
    assert (result.returncode, result.status) == (0, 200), repr(result) + client.describe()
    assert_body(out, 100000, 81)
    # CONNECT carries the credentials too.
    tls_origin = make_origin(server_tls_context(e2e_setup))
    tls_url = f"https://localhost:{tls_origin.port}/bulk?size=1000&seed=82"
    result = curl("-x", proxy, "-U", f"{LOCAL_USER}:{LOCAL_PASSWORD}", "--cacert", str(e2e_setup.ca), tls_url)
    assert (result.returncode, result.status, result.output) == (0, 200, body_bytes(1000, 82)), repr(result) + client.describe()
    result = curl("-x", proxy, "--cacert", str(e2e_setup.ca), tls_url)
    assert result.returncode != 0 and "407" in result.stderr, repr(result)
    assert len(tls_origin.requests) == 1
    assert len(origin.requests) == 2
    # The local credentials are the proxy's business, not the origin's.
    for name, _ in origin.requests[1]["headers"]:
        assert name.lower() != "proxy-authorization"

    for credentials in ([], ["-U", f"{LOCAL_USER}:wrong-password"]):
        result = curl("-x", proxy, *credentials, url)
        assert result.status == 407, f"{credentials}: {result!r}" + client.describe()
        assert re.search(rb"(?i)proxy-authenticate", curl("-x", proxy, "-i", *credentials, url).output)
    for prefix in ("", f"{LOCAL_USER}:wrong-password@"):
        result = curl("--socks5-hostname", f"{prefix}{socks}", url)
        assert result.returncode != 0 and result.status in (None, 0), f"{prefix!r}: {result!r}" + client.describe()
    assert len(origin.requests) == 2, "a refused client reached the origin"
    log = client.log()
    for password in (LOCAL_PASSWORD, e2e_setup.alice.password):
        assert password not in log, "a password appears in climber's log" + client.describe()
    assert_clean_log(client)


# ---------------------------------------------------------------------------
# climber waits for the server's 01 00 before sending data


def test_waits_for_server_reply_before_data(strict_server, make_climber, e2e_setup):
    assert wire.REPLY_SUCCESS == b"\x01\x00"
    target_port = closed_port()  # the fake server never connects anywhere
    client = make_climber(
        [strict_server.port], name="strict", socks5=True, http=False,
        forward=[{"listen": "127.0.0.1:0", "target": f"127.0.0.1:{target_port}"}],
    )
    payloads = {}

    # Through the port forward: data the moment the connection is accepted.
    sock = socket.create_connection(("127.0.0.1", client.forward_ports[0]), timeout=SOCKET_TIMEOUT)
    try:
        payloads["forward"] = b"early bird via the forward"
        sock.sendall(payloads["forward"])
        got = recv_exactly(sock, len(payloads["forward"]))
        sock.shutdown(socket.SHUT_WR)
        rest = recv_to_eof(sock)
    finally:
        sock.close()
    assert (got, rest) == (payloads["forward"], b""), client.describe()
    verdict = strict_server.result()
    assert verdict["verdict"] == "ok", f"{verdict}" + client.describe()
    assert verdict["echoed"] == payloads["forward"]
    assert (verdict["alpn"], verdict["version"]) == ("mtop", "TLSv1.3"), verdict
    request = verdict["request"]
    assert (request.username, request.password, request.host, request.port) == (
        e2e_setup.alice.name, e2e_setup.alice.password, "127.0.0.1", target_port,
    )

    # Through SOCKS5 with "optimistic data": greeting, request and payload
    # in one write, before any reply.
    sock = socket.create_connection(("127.0.0.1", client.socks5_port), timeout=SOCKET_TIMEOUT)
    try:
        payloads["socks5"] = b"optimistic data via SOCKS5"
        sock.sendall(
            b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target_port.to_bytes(2, "big")
            + payloads["socks5"]
        )
        assert recv_exactly(sock, 2) == b"\x05\x00"
        reply = recv_exactly(sock, 10)
        assert reply[:2] == b"\x05\x00", f"reply {reply.hex()}" + client.describe()
        got = recv_exactly(sock, len(payloads["socks5"]))
    finally:
        sock.close()
    assert got == payloads["socks5"]
    verdict = strict_server.result()
    assert verdict["verdict"] == "ok", f"{verdict}" + client.describe()

    # Megabytes at once through the forward: held back, then all echoed.
    size = 4 * MiB
    sock = socket.create_connection(("127.0.0.1", client.forward_ports[0]), timeout=SOCKET_TIMEOUT)
    echoed = hashlib.sha256()
    counted = [0]

    def read() -> None:
        try:
            while chunk := sock.recv(MiB):
                echoed.update(chunk)
                counted[0] += len(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for chunk in body_chunks(size, 143):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reader.join(SOCKET_TIMEOUT)
    finally:
        sock.close()
    verdict = strict_server.result()
    assert verdict["verdict"] == "ok", f"{ {k: v for k, v in verdict.items() if k != 'early'} }" + client.describe()
    assert (counted[0], echoed.hexdigest()) == (size, body_digest(size, 143)), client.describe()
    assert_clean_log(client)


# ---------------------------------------------------------------------------
# Servers: failover, refusals, round robin, error mapping


def test_failover_skips_dead_server(server, make_climber, origin, tmp_path):
    dead = closed_port()
    client = make_climber([dead, server], name="failover", strategy="failover", http=False)
    out = tmp_path / "body.bin"
    result = curl("--socks5-hostname", f"127.0.0.1:{client.socks5_port}", f"http://localhost:{origin.port}/bulk?size={MiB}&seed=61", "-o", str(out))
    assert (result.returncode, result.status) == (0, 200), repr(result) + client.describe()
    assert_body(out, MiB, 61, client.describe())
    client.wait_for(rf"server 127\.0\.0\.1:{dead} is down", 10, what="the dead server marked down")
    client.wait_for(rf"socks5 tunnel \S+: .* via=127\.0\.0\.1:{server.port} ", 10, what="the tunnel via the live server")
    assert_clean_log(client)


def test_failover_past_every_kind_of_bad_server(server, e2e_setup, make_climber, make_target, origin, tmp_path):
    """In failover order: nothing listening, a listener that hangs up at
    once, one that never answers (``socks5.timeout`` 1 s), and the real
    server under a name its certificate does not have.  Each is marked down
    and the tunnel goes through the last, good one."""
    closer = make_target(lambda sock: None)
    silent = make_target(recv_to_eof)  # reads the ClientHello, answers nothing
    dead = closed_port()
    wrong_name = {
        "host": f"127.0.0.1:{server.port}", "type": "tls", "username": e2e_setup.alice.name,
        "password": e2e_setup.alice.password, "ca": str(e2e_setup.ca), "proto": "mtop", "sni": "wrong.example",
    }
    client = make_climber(
        [dead, closer.port, silent.port, wrong_name, server], name="failover-all",
        strategy="failover", socks5={"timeout": 1}, http=False,
    )
    out = tmp_path / "body.bin"
    result = curl("--socks5-hostname", f"127.0.0.1:{client.socks5_port}", f"http://localhost:{origin.port}/bulk?size={MiB}&seed=62", "-o", str(out))
    assert (result.returncode, result.status) == (0, 200), repr(result) + client.describe()
    assert_body(out, MiB, 62, client.describe())
    for port, what in ((dead, "nothing listening"), (closer.port, "hangs up")):
        client.wait_for(rf"server 127\.0\.0\.1:{port} is down", 10, what=f"the server with {what} marked down")
    client.wait_for(rf"server 127\.0\.0\.1:{silent.port} is down \(no answer within 1s\)", 10, what="the silent server timed out")
    line = client.wait_for(rf"server 127\.0\.0\.1:{server.port} is down \((.*)\)", 10, what="the wrong name refused")
    assert re.search(r"(?i)certificate|verif|hostname|name", line.group(1)), line.group(0)
    assert_clean_log(client)


def test_server_refuses_login(errors_server, make_climber, e2e_setup, origin):
    """A wrong password in climber.yaml, with a server that says so
    (01 02): SOCKS5 answers 0x02 (not allowed), the HTTP proxy 502; neither
    password shows in climber's log."""
    wrong = "Wrong-climber-pw-7d3e"
    entry = {
        "host": f"127.0.0.1:{errors_server.port}", "type": "tls", "username": e2e_setup.alice.name,
        "password": wrong, "ca": str(e2e_setup.ca), "proto": "mtop",
    }
    client = make_climber([entry], name="wrong-password")
    sock, reply = socks5_request(client.socks5_port, "127.0.0.1", origin.port)
    sock.close()
    assert reply[:2] == b"\x05\x02", f"reply {reply.hex()}, expected 05 02" + client.describe()
    result = curl("-x", f"http://127.0.0.1:{client.http_port}", f"http://127.0.0.1:{origin.port}/bulk?size=10", max_time=20)
    assert result.status == 502, repr(result) + client.describe()
    assert origin.requests == []
    log = client.log()
    assert wrong not in log and e2e_setup.alice.password not in log, client.describe()
    assert_clean_log(client)


def test_no_usable_server_error_mapping(make_climber, make_target):
    """One server that, by turns, never answers (``timeout`` 0.5 s: SOCKS5
    0x06, HTTP 504) and hangs up during the TLS handshake (unreachable:
    SOCKS5 0x03, HTTP 502)."""
    mode = {"silent": True}

    def handler(sock: socket.socket) -> None:
        if mode["silent"]:
            recv_to_eof(sock)

    bad = make_target(handler)
    client = make_climber([bad.port], name="no-server", socks5={"timeout": "500ms"}, http={"timeout": "500ms"})
    target = f"127.0.0.1:{closed_port()}"
    for silent, socks_reply, http_status in ((True, 0x06, 504), (False, 0x03, 502)):
        mode["silent"] = silent
        since = client.mark()
        sock, reply = socks5_request(client.socks5_port, "127.0.0.1", int(target.split(":")[1]))
        sock.close()
        assert reply[:2] == bytes([5, socks_reply]), f"silent={silent}: reply {reply.hex()}" + client.describe(since)
        result = curl("-x", f"http://127.0.0.1:{client.http_port}", f"http://{target}/", max_time=20)
        assert result.status == http_status, f"silent={silent}: {result!r}" + client.describe(since)
    assert_clean_log(client)


def test_round_robin_share_links_pipelining(server, errors_server, e2e_setup, make_climber, origin, tmp_path):
    """Two servers, one given as an ``mtop://`` link, both with
    ``pipelining: true`` (data goes with the auth message, which our server
    accepts); round_robin spreads tunnels over both, and bodies stay intact
    in both directions."""
    alice = e2e_setup.alice
    link = make_url(ServerLink(alice.name, alice.password, "127.0.0.1", errors_server.port))
    entries = [
        {"url": link, "ca": str(e2e_setup.ca), "pipelining": True},
        {
            # By name: resolved, and the certificate checked for "localhost".
            "host": f"localhost:{server.port}", "type": "tls", "username": alice.name, "password": alice.password,
            "ca": str(e2e_setup.ca), "proto": "mtop", "pipelining": True,
        },
    ]
    client = make_climber(entries, name="round-robin", strategy="round_robin")
    size = 4 * MiB
    for i in range(4):
        out = tmp_path / f"{i}.bin"
        if i % 2:
            result = curl(*proxy_args(client), f"http://127.0.0.1:{origin.port}/chunked?size={size}&seed={130 + i}", "-o", str(out))
        else:
            result = curl("--socks5-hostname", f"127.0.0.1:{client.socks5_port}", f"http://localhost:{origin.port}/bulk?size={size}&seed={130 + i}", "-o", str(out))
        assert (result.returncode, result.status) == (0, 200), f"{i}: {result!r}" + client.describe()
        assert_body(out, size, 130 + i, client.describe())
    payload = tmp_path / "up.bin"
    write_body_file(payload, size, 139)
    result = curl(*proxy_args(client), "--data-binary", f"@{payload}", f"http://127.0.0.1:{origin.port}/upload")
    assert (result.returncode, result.status) == (0, 200), repr(result) + client.describe()
    assert json.loads(result.output)["sha256"] == body_digest(size, 139)
    for name in (f"localhost:{server.port}", f"127.0.0.1:{errors_server.port}"):
        client.wait_for(rf"tunnel done: .* via={re.escape(name)} ", 10, what=f"a tunnel via {name}")
    log = client.log()
    assert alice.password not in log and link not in log, client.describe()
    assert_clean_log(client)


# ---------------------------------------------------------------------------
# Concurrency and bounded memory


def test_concurrent_transfers(climber, e2e_setup, make_origin, tmp_path):
    """Six 16 MiB downloads at once, over SOCKS5, plain HTTP and CONNECT."""
    plain, secure = make_origin(), make_origin(server_tls_context(e2e_setup))
    size = 16 * MiB
    since = climber.mark()
    jobs = []
    for i in range(2):
        url = f"http://localhost:{plain.port}/bulk?size={size}&seed={100 + i}"
        jobs.append((100 + i, ["--socks5-hostname", f"127.0.0.1:{climber.socks5_port}", url]))
        url = f"http://127.0.0.1:{plain.port}/chunked?size={size}&seed={110 + i}"
        jobs.append((110 + i, [*proxy_args(climber), url]))
        url = f"https://localhost:{secure.port}/bulk?size={size}&seed={120 + i}"
        jobs.append((120 + i, [*proxy_args(climber), "--cacert", str(e2e_setup.ca), url]))
    results: dict[int, CurlResult] = {}

    def run(seed: int, args: list[str]) -> None:
        results[seed] = curl(*args, "-o", str(tmp_path / f"{seed}.bin"))

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CURL_MAX_TIME + 40)
    for seed, _ in jobs:
        result = results.get(seed)
        assert result is not None and (result.returncode, result.status) == (0, 200), f"{seed}: {result!r}" + climber.describe(since)
        assert_body(tmp_path / f"{seed}.bin", size, seed, climber.describe(since))
    assert_clean_log(climber, since)


def test_many_short_tunnels_at_once(climber, make_target):
    """Forty SOCKS5 tunnels opened at the same moment (new TLS connections
    and session resumption racing each other), each echoing its own bytes."""
    target = make_target(echo)
    since = climber.mark()
    count = 40
    outcomes: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
            try:
                assert reply[:2] == b"\x05\x00", reply.hex()
                payload = body_bytes(10_000 + i, 200 + i)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                outcomes[i] = recv_to_eof(sock) == payload
            finally:
                sock.close()
        except BaseException as e:
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOCKET_TIMEOUT * 2)
    failed = {i: v for i, v in outcomes.items() if v is not True}
    assert len(outcomes) == count and not failed, f"{count - len(outcomes)} unfinished, failed: {failed}" + climber.describe(since)
    assert_clean_log(climber, since)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


#: What climber may grow by while 64 MiB wait for a reader.
MEMORY_SLACK_KIB = 16 * 1024


#: How long the slow peer does not read.
SLOW_PEER_SECONDS = 1.0


def peak_rss_kib(pid: int, seconds: float) -> int:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.05)
    return peak


def sender_of(size: int, seed: int = 5):
    """Target: send ``size`` bytes of ``seed`` as fast as it can, then close."""

    def handler(sock: socket.socket):
        for chunk in body_chunks(size, seed):
            sock.sendall(chunk)
        return size

    return handler


def slow_reader_growth(climber, server, target_port: int, size: int, seed: int = 5) -> tuple[int, int]:
    """A SOCKS5 client of ``climber`` with a small receive buffer opens a
    tunnel to ``target_port`` (a `sender_of` ``size``, ``seed``) and reads
    nothing for about two seconds, then all of it (checked); returns how
    much the RSS of ``server`` and of ``climber`` grew meanwhile, KiB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    with sock:
        sock.connect(("127.0.0.1", climber.socks5_port))
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        server_before, climber_before = rss_kib(server.proc.pid), rss_kib(climber.proc.pid)
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target_port.to_bytes(2, "big"))
        assert recv_exactly(sock, 10)[:2] == b"\x05\x00"
        climber_peak = peak_rss_kib(climber.proc.pid, 1.0)
        server_peak = peak_rss_kib(server.proc.pid, 1.0)
        digest = hashlib.sha256()
        count = 0
        while chunk := sock.recv(1 << 18):
            digest.update(chunk)
            count += len(chunk)
    assert (count, digest.hexdigest()) == (size, body_digest(size, seed))
    growth = server_peak - server_before, climber_peak - climber_before
    print(f"RSS growth while not reading: server {growth[0] >> 10} MiB, climber {growth[1] >> 10} MiB")
    return growth


@pytest.fixture(scope="module")
def memory_climber(server, make_module_climber):
    """A climber of its own, so its memory is not what other tests left."""
    return make_module_climber([server], name="memory")


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest.mark.parametrize("front", ["socks5", "http"])
def test_slow_peer_bounded_memory(memory_climber, origin, front, direction):
    """64 MiB towards a peer that does not read for a while (the client for
    a download, the origin for an upload): climber must stop reading the
    sender (flow control) rather than buffer the lot."""
    client = memory_climber
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.settimeout(SOCKET_TIMEOUT)
    if direction == "download":
        path, method = f"/bulk?size={BULK_SIZE}&seed=7", "GET"
        extra = ""
    else:
        path, method = f"/upload?delay={SLOW_PEER_SECONDS}", "POST"
        extra = f"Content-Length: {BULK_SIZE}\r\n"
    sender = None
    sent: dict = {}
    try:
        if front == "socks5":
            sock.connect(("127.0.0.1", client.socks5_port))
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + origin.port.to_bytes(2, "big"))
            assert recv_exactly(sock, 10)[:2] == b"\x05\x00"
            target = path
        else:
            sock.connect(("127.0.0.1", client.http_port))
            target = f"http://127.0.0.1:{origin.port}{path}"
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n{extra}Connection: close\r\n\r\n"
        before = rss_kib(client.proc.pid)
        sock.sendall(head.encode())
        if direction == "upload":
            def send_body() -> None:
                try:
                    for chunk in body_chunks(BULK_SIZE, 8):
                        sock.sendall(chunk)
                    sent["done"] = True
                except BaseException as e:
                    sent["error"] = e

            sender = threading.Thread(target=send_body, daemon=True)
            sender.start()
        # Loopback moves 64 MiB through climber in well under this.
        peak = peak_rss_kib(client.proc.pid, SLOW_PEER_SECONDS * 0.8)
        if sender is not None:
            sender.join(SOCKET_TIMEOUT + 5)
            assert sent.get("done"), f"upload: {sent}" + client.describe()
        response, body = read_response(sock, method)
    finally:
        sock.close()
    if direction == "download":
        assert len(body) == BULK_SIZE and hashlib.sha256(body).hexdigest() == body_digest(BULK_SIZE, 7)
    else:
        assert json.loads(body)["sha256"] == body_digest(BULK_SIZE, 8), body
    grown = peak - before
    print(f"{front} {direction}: climber RSS {before >> 10} MiB before, peak {peak >> 10} MiB")
    assert grown < MEMORY_SLACK_KIB, (
        f"climber grew by {grown >> 10} MiB while the {'client' if direction == 'download' else 'origin'} "
        f"did not read ({front} {direction})" + client.describe()
    )


# ---------------------------------------------------------------------------
# climber's own deadlines, shutdown and configuration errors


def test_handshake_and_idle_timeouts(server, make_climber, make_target):
    """With handshake_timeout 1 and idle_timeout 1: a silent SOCKS5 client,
    a half-sent HTTP head and a silent tunnel are all closed in about a
    second."""
    target = make_target(echo)
    client = make_climber([server], name="timeouts", handshake_timeout=1, idle_timeout=1)
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", client.socks5_port), timeout=SOCKET_TIMEOUT)
    partial = socket.create_connection(("127.0.0.1", client.http_port), timeout=SOCKET_TIMEOUT)
    partial.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")
    tunnel, reply = socks5_request(client.socks5_port, "127.0.0.1", target.port)
    try:
        assert reply[:2] == b"\x05\x00", reply.hex() + client.describe()
        tunnel.sendall(b"ping")
        assert recv_exactly(tunnel, 4) == b"ping"
        for name, sock in (("silent SOCKS5 client", silent), ("half-sent HTTP head", partial), ("idle tunnel", tunnel)):
            try:
                rest = recv_to_eof(sock)
            except ConnectionResetError:
                rest = b""
            except socket.timeout:
                pytest.fail(f"{name}: still open after {time.monotonic() - started:.1f}s" + client.describe())
            assert rest == b"", f"{name}: got {rest!r}"
            elapsed = time.monotonic() - started
            assert elapsed < 5, f"{name}: closed only after {elapsed:.1f}s" + client.describe()
    finally:
        for sock in (silent, partial, tunnel):
            sock.close()
    line = client.wait_for(rf"socks5 tunnel (\S+): .* target=127\.0\.0\.1:{target.port} ", 10)
    assert line.group(1) == "idle-timeout", line.group(0)
    assert_clean_log(client)


def test_sigterm_closes_open_connections(server, make_climber, make_target):
    target = make_target(echo)
    client = make_climber([server], name="sigterm")
    tunnel, reply = socks5_request(client.socks5_port, "127.0.0.1", target.port)
    waiting = socket.create_connection(("127.0.0.1", client.http_port), timeout=SOCKET_TIMEOUT)
    try:
        assert reply[:2] == b"\x05\x00"
        tunnel.sendall(b"ping")
        assert recv_exactly(tunnel, 4) == b"ping"
        waiting.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")  # half a head
        client.proc.send_signal(signal.SIGTERM)
        try:
            rc = client.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("climber still running 10s after SIGTERM" + client.describe())
        for sock in (tunnel, waiting):
            try:
                assert recv_to_eof(sock) == b""
            except ConnectionResetError:
                pass
    finally:
        tunnel.close()
        waiting.close()
    # twistd re-raises the signal that stopped it, so the status is -SIGTERM.
    assert rc in (0, -signal.SIGTERM), client.describe()
    client.stop()
    assert "Server Shut Down" in client.log(), client.describe()
    assert_clean_log(client)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"socks5": {"listen": "127.0.0.1:0"}, "servers": []}, r"servers"),
        ({"socks5": {"listen": "127.0.0.1:0"}, "strategy": "fastest-ever", "servers": "SERVER"}, r"strategy"),
        (
            {"socks5": {"listen": "127.0.0.1:0"}, "servers": [{"host": "127.0.0.1:1", "username": "a", "password": "b", "ca": "/nonexistent/ca.pem"}]},
            r"/nonexistent/ca\.pem",
        ),
    ],
    ids=["no-servers", "bad-strategy", "missing-ca"],
)
def test_bad_config_is_refused(e2e_setup, run_twistd, tmp_path, config, expected):
    if config.get("servers") == "SERVER":
        config["servers"] = [{"host": "127.0.0.1:1", "username": "a", "password": "b", "ca": str(e2e_setup.ca)}]
    path = tmp_path / "climber.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_twistd("climber", path, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    # twistd prints its usage text, then the error as the last line.
    last = output.strip().splitlines()[-1]
    assert re.search(expected, last) and str(path) in last, output
    assert "listening on" not in output, output
