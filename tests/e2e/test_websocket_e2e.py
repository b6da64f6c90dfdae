"""WebSocket listeners (``ws``, ``wss``): MTop v1 in binary messages after
an HTTP/1.1 upgrade, the half-close convention (an empty text message),
the fallback or a 404 for anything else, trusted proxies' client
addresses, and bad frames closed cleanly.  A blocking wsproto client
(`wsclient`) plays the client; climber's ``wss`` servers and nginx in the
middle are in test_websocket_climber_e2e.py."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import TEST_POLICY, subprocess_env
from peers import echo, reply_after_eof
from test_hardening_e2e import WebServer, start_server  # noqa: F401 (a fixture)
from test_server_e2e import auth_message
from wsclient import Rejected, WSClient

PATH = "/tunnel-7f3a"


def ws_listeners(setup, extra: str = "") -> str:
    return (
        "listeners:\n"
        '  - type: tls\n    listen: "127.0.0.1:0"\n'
        f'  - type: wss\n    listen: "127.0.0.1:0"\n    path: {PATH}\n'
        f'  - type: ws\n    listen: "127.0.0.1:0"\n    path: {PATH}\n' + extra + TEST_POLICY
    )


def ports(server) -> tuple[int, int]:
    wss = server.wait_for(rf"MTop WebSocket \(wss\) listening on 127\.0\.0\.1:(\d+) \(path {PATH}\)", 10)
    ws = server.wait_for(rf"MTop WebSocket \(ws\) listening on 127\.0\.0\.1:(\d+) \(path {PATH}\)", 10)
    return int(wss.group(1)), int(ws.group(1))


@pytest.fixture
def ws_server(start_server, e2e_setup):  # noqa: F811
    server = start_server(ws_listeners(e2e_setup))
    server.wss_port, server.ws_port = ports(server)
    return server


def client(server, setup, tls=True, **kwargs) -> WSClient:
    return WSClient(server.wss_port if tls else server.ws_port, path=PATH, ca=setup.ca, tls=tls, **kwargs)


@pytest.mark.parametrize("tls", [True, False], ids=["wss", "ws"])
def test_a_tunnel_over_websocket_relays_and_half_closes(ws_server, e2e_setup, make_target, tls):
    target = make_target(reply_after_eof)
    ws = client(ws_server, e2e_setup, tls)
    try:
        ws.send(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
        assert ws.read_exactly(2) == b"\x01\x00"
        ws.send(b"hello ")
        ws.send(b"world")
        ws.send_eof()  # the target answers only after its input ended
        assert ws.read_to_eof() == b"got:hello world"
        assert ws.close_code in (None, 1000)
    finally:
        ws.close()
    ws_server.wait_for(r"tunnel done: client=127\.0\.0\.1:\d+ user=alice .* up=11 down=15 ", 10)
    assert "Traceback" not in ws_server.log()


SIZE = 64 << 20


def digest_then_source(sock: socket.socket) -> bytes:
    """Read to EOF and answer its SHA-256, then `SIZE` bytes of a seeded
    stream and close: both directions checked, one after the other (the
    blocking test client is one thread)."""
    digest = hashlib.sha256()
    while chunk := sock.recv(1 << 18):
        digest.update(chunk)
    sock.sendall(digest.digest())
    chunk = random_chunk()
    for _ in range(SIZE // len(chunk)):
        sock.sendall(chunk)
    return b""


def random_chunk() -> bytes:
    return random.Random(7).randbytes(1 << 16)


def test_64_mib_each_way_over_wss(ws_server, e2e_setup, make_target):
    target = make_target(digest_then_source)
    ws = client(ws_server, e2e_setup)
    sent, expected = hashlib.sha256(), hashlib.sha256()
    try:
        ws.send(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
        assert ws.read_exactly(2) == b"\x01\x00"
        chunk = os.urandom(1 << 16)
        for _ in range(SIZE // len(chunk)):
            sent.update(chunk)
            ws.send(chunk)
        ws.send_eof()
        assert ws.read_exactly(32) == sent.digest()
        received, got = hashlib.sha256(), 0
        while got < SIZE:
            piece = ws.read_exactly(min(1 << 18, SIZE - got))
            received.update(piece)
            got += len(piece)
        assert ws.read_to_eof() == b""
    finally:
        ws.close()
    chunk = random_chunk()
    for _ in range(SIZE // len(chunk)):
        expected.update(chunk)
    assert received.digest() == expected.digest()
    ws_server.wait_for(rf"tunnel done: .* up={SIZE} down={SIZE + 32} ", 20)


def test_not_an_upgrade_gets_a_404_without_a_fallback(ws_server, e2e_setup):
    for tls in (True, False):
        port = ws_server.wss_port if tls else ws_server.ws_port
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            context = ssl.create_default_context(cafile=str(e2e_setup.ca))
            sock = context.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer
    # An upgrade on another path: a 404 too.
    with pytest.raises(Rejected) as rejected:
        WSClient(ws_server.wss_port, path="/other", ca=e2e_setup.ca)
    assert rejected.value.status == 404
    ws_server.wait_for(r"tunnel bad-request: .*\(WebSocket upgrade on another path\)", 10)
    assert "Traceback" not in ws_server.log()


def test_not_an_upgrade_goes_to_the_fallback(start_server, e2e_setup):  # noqa: F811
    web = WebServer()
    server = start_server(f"  fallback: 127.0.0.1:{web.port}\n" + ws_listeners(e2e_setup))
    wss_port, _ = ports(server)
    with pytest.raises(Rejected) as rejected:
        WSClient(wss_port, path="/index.html", ca=e2e_setup.ca)
    assert rejected.value.status == 404  # the web server's page
    assert web.received and web.received[0].startswith(b"GET /index.html HTTP/1.1\r\n")
    server.wait_for(r"tunnel fallback: ", 10)


def test_a_trusted_proxy_names_the_client(ws_server, e2e_setup, make_target):
    target = make_target(echo)
    # ws listeners trust loopback by default: the client is who the header says.
    ws = client(ws_server, e2e_setup, tls=False, headers=[(b"X-Forwarded-For", b"203.0.113.9, 198.51.100.7")])
    ws.send(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"x")
    assert ws.read_exactly(3) == b"\x01\x00x"
    ws.close()
    ws_server.wait_for(r"tunnel \S+: client=198\.51\.100\.7:0 user=alice ", 10)
    # wss listeners trust nobody by default: the header is ignored.
    ws = client(ws_server, e2e_setup, headers=[(b"Forwarded", b'for="[2001:db8::1]:4711"')])
    ws.send(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"y")
    assert ws.read_exactly(3) == b"\x01\x00y"
    ws.close()
    ws_server.wait_for(r"tunnel \S+: client=127\.0\.0\.1:\d+ user=alice ", 10)


def _close_code(ws: WSClient) -> int | None:
    ws.read_to_eof()
    return ws.close_code


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"\x82\x05hello", 1002),  # a client frame without a mask
        (b"\x83\x80\x00\x00\x00\x00", 1002),  # a reserved opcode
        (b"\x89\xfe\x00\x80" + b"\x00" * 4 + b"p" * 128, 1002),  # a ping longer than 125 bytes
        (b"\x81\x83\x00\x00\x00\x00abc", 1003),  # text data
    ],
    ids=["unmasked", "reserved-opcode", "long-ping", "text"],
)
def test_bad_frames_are_closed_cleanly(ws_server, e2e_setup, make_target, frame, code):
    target = make_target(echo)
    ws = client(ws_server, e2e_setup)
    try:
        ws.send(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
        assert ws.read_exactly(2) == b"\x01\x00"
        ws.send_raw(frame)
        assert _close_code(ws) == code
    finally:
        ws.close()
    ws_server.wait_for(r"tunnel \S+: client=127\.0\.0\.1:\d+ user=alice ", 10)
    assert "Traceback" not in ws_server.log()


def test_an_upgrade_without_an_auth_message_is_closed(ws_server, e2e_setup):
    ws = client(ws_server, e2e_setup)
    try:
        ws.send(b"GET / HTTP/1.1\r\n\r\n")
        assert ws.read_to_eof() == b"\x01\x01"  # reply_errors: true
    finally:
        ws.close()
    ws_server.wait_for(r"tunnel bad-request: ", 10)
    assert "Traceback" not in ws_server.log()


def ctl(*args: str, ok: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mtop.ctl", *args], capture_output=True, text=True, timeout=60, env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def test_mtopctl_url_and_check_speak_wss(ws_server, e2e_setup, make_target):
    target = make_target(echo)
    made = subprocess.run(
        [sys.executable, "-m", "mtop.ctl", "url", "-u", e2e_setup.alice.name, "--password-stdin", "-H", "127.0.0.1",
         "-P", str(ws_server.wss_port), "-t", "wss", "--path", PATH, "--sni", "localhost"],
        input=e2e_setup.alice.password + "\n", capture_output=True, text=True, timeout=60, env=subprocess_env(),
    )
    assert made.returncode == 0, made.stderr
    link = made.stdout.strip()
    assert link.startswith("mtop://alice:") and link.endswith(f"@127.0.0.1:{ws_server.wss_port}/wss?path={PATH}&sni=localhost")
    out = ctl("check", "--ca", str(e2e_setup.ca), "--target", f"127.0.0.1:{target.port}", link)
    assert re.match(rf"OK: TLSv1\.3 \+ WebSocket {PATH}, ALPN http/1\.1, handshake [\d.]+ ms; tunnel to ", out), out
    wrong = link.replace(f"path={PATH}", "path=/elsewhere")
    out = ctl("check", "--ca", str(e2e_setup.ca), "--target", f"127.0.0.1:{target.port}", wrong, ok=False)
    assert "answered with HTTP 404" in out, out
    bad_password = link.replace("alice:", "alice:x", 1)
    out = ctl("check", "--ca", str(e2e_setup.ca), "--target", f"127.0.0.1:{target.port}", bad_password, ok=False)
    assert "refused: authentication failed" in out, out


def test_a_slow_or_oversized_request_head_is_cut(ws_server):
    # Not complete within handshake_timeout (2 s here): closed.
    with socket.create_connection(("127.0.0.1", ws_server.ws_port), timeout=10) as sock:
        sock.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        try:
            assert sock.recv(4096) == b""
        except ConnectionResetError:
            pass  # cut, as a TLS handshake past its deadline is
        assert time.monotonic() - started < 5
    # Over 8 KiB without its end: a 404 at once.
    with socket.create_connection(("127.0.0.1", ws_server.ws_port), timeout=10) as sock:
        sock.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nX-Pad: " + b"a" * 9000)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 404 ")
    ws_server.wait_for(r"tunnel bad-request: .*request head over 8 KiB", 10)
    assert "Traceback" not in ws_server.log()


def test_denied_clients_are_refused_on_websocket_listeners(start_server, e2e_setup):  # noqa: F811
    server = start_server(ws_listeners(e2e_setup, 'clients:\n  deny: ["127.0.0.1"]\n'))
    wss_port, ws_port = ports(server)
    for port, tls in ((wss_port, True), (ws_port, False)):
        with pytest.raises((OSError, EOFError)):
            WSClient(port, path=PATH, ca=e2e_setup.ca, tls=tls)
    assert "Traceback" not in server.log()
