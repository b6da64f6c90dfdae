"""climber's ``type: wss`` servers: straight to a ``wss`` listener, and
through a real nginx (Debian's, started here from a config of its own on
a loopback port) terminating TLS in front of a ``ws`` listener, as a CDN
or a web server on the same host would: 64 MiB each way checksummed,
half-close both ways, a slow reader, a request that is not a WebSocket
upgrade reaching the fallback web server."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ALICE
from peers import banner_then_read, echo, recv_to_eof, reply_after_eof
from test_climber_e2e import body_chunks, body_digest, sender_of, slow_reader_growth, socks5_request
from test_hardening_e2e import WebServer, start_server  # noqa: F401 (a fixture)
from test_websocket_e2e import PATH, ports, ws_listeners

MiB = 1 << 20
SIZE = 64 * MiB
SOCKET_TIMEOUT = 60.0
#: What a process may grow by while 64 MiB wait for a slow reader.
MEMORY_SLACK_KIB = 24 * 1024

NGINX_CONF = """
daemon off;
master_process off;
user root root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """nginx on 127.0.0.1 terminating TLS (the test certificate) and
    proxying everything, WebSocket upgrades included, to ``upstream``."""

    def __init__(self, directory: Path, setup, upstream: int):
        program = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if program is None:
            pytest.fail("nginx is not installed: run 'bash tests/services.sh' (apt-get install nginx-light)")
        directory.mkdir()
        self.port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            dir=directory, port=self.port, upstream=upstream,
            crt=setup.dir / "certs" / "server.crt", key=setup.dir / "certs" / "server.key",
        ))
        self.directory = directory
        self.proc = subprocess.Popen(
            [program, "-p", str(directory), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"nginx did not start: {self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def wss_setup(start_server, e2e_setup, make_climber, tmp_path, request):  # noqa: F811
    """(server, climber, nginx or None): climber's one server is the wss
    listener itself ("direct") or nginx in front of the ws listener."""
    web = WebServer()
    server = start_server(f"  fallback: 127.0.0.1:{web.port}\n" + ws_listeners(e2e_setup))
    server.web = web
    wss_port, ws_port = ports(server)
    nginx = None
    if request.param == "nginx":
        nginx = Nginx(tmp_path / "nginx", e2e_setup, ws_port)
        port = nginx.port
    else:
        port = wss_port
    entry = {
        "host": f"127.0.0.1:{port}", "type": "wss", "path": PATH, "sni": "localhost",
        "username": ALICE.name, "password": ALICE.password, "ca": str(e2e_setup.ca),
    }
    climber = make_climber([entry], name=f"climber-{request.param}", http=False)
    try:
        yield server, climber, nginx
    finally:
        if nginx is not None:
            nginx.stop()


BOTH = pytest.mark.parametrize("wss_setup", ["direct", "nginx"], indirect=True)


def open_tunnel(climber, port: int) -> socket.socket:
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", port)
    assert reply[:2] == b"\x05\x00", reply.hex() + climber.describe()
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


@BOTH
def test_64_mib_each_way(wss_setup, make_target):
    server, climber, nginx = wss_setup
    target = make_target(echo)
    sock = open_tunnel(climber, target.port)
    sent = hashlib.sha256()

    def write():
        for chunk in body_chunks(SIZE, 3):
            sent.update(chunk)
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    started = time.monotonic()
    writer = threading.Thread(target=write)
    writer.start()
    received, count = hashlib.sha256(), 0
    with sock:
        while chunk := sock.recv(1 << 18):
            received.update(chunk)
            count += len(chunk)
    writer.join(SOCKET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert count == SIZE and received.hexdigest() == sent.hexdigest() == body_digest(SIZE, 3)
    print(f"wss ({'nginx' if nginx else 'direct'}): 64 MiB each way at once in {elapsed:.2f} s")
    server.wait_for(rf"tunnel done: .* target=127\.0\.0\.1:{target.port} up={SIZE} down={SIZE} ", 20)
    assert "Traceback" not in server.log() + climber.log()


@BOTH
def test_half_close_both_ways(wss_setup, make_target):
    server, climber, _ = wss_setup
    # The client ends its side first; the target answers after that.
    target = make_target(reply_after_eof)
    with open_tunnel(climber, target.port) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b"got:hello"
    assert target.result() == b"hello"
    # The target ends first; the client still sends after that.
    target = make_target(banner_then_read)
    with open_tunnel(climber, target.port) as sock:
        assert recv_to_eof(sock) == b"banner"
        sock.sendall(b"late")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    assert target.result() == b"late"
    server.wait_for(rf"tunnel done: .* target=127\.0\.0\.1:{target.port} up=4 down=6 ", 10)


@BOTH
def test_a_slow_reader_keeps_memory_bounded(wss_setup, make_target):
    """The client does not read for a second while the target sends 64
    MiB: neither mtop nor climber may buffer it."""
    server, climber, _ = wss_setup
    target = make_target(sender_of(SIZE))
    server_growth, climber_growth = slow_reader_growth(climber, server, target.port, SIZE)
    assert server_growth < MEMORY_SLACK_KIB, server.describe()
    assert climber_growth < MEMORY_SLACK_KIB, climber.describe()


@pytest.mark.parametrize("wss_setup", ["nginx"], indirect=True)
def test_a_web_request_through_nginx_reaches_the_fallback(wss_setup, e2e_setup):
    server, _, nginx = wss_setup
    sock = socket.create_connection(("127.0.0.1", nginx.port), 10)
    context = ssl.create_default_context(cafile=str(e2e_setup.ca))
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(b"GET /index.html HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = recv_to_eof(tls)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert any(r.startswith(b"GET /index.html HTTP/1.1\r\n") for r in server.web.received), server.web.received
    # The fallback saw nginx's request, with the client nginx names.
    assert any(b"X-Forwarded-For: 127.0.0.1" in r for r in server.web.received)
    server.wait_for(r"tunnel fallback: ", 10)


@pytest.mark.parametrize("wss_setup", ["direct"], indirect=True)
def test_a_wrong_path_is_reported_by_climber(wss_setup, e2e_setup, make_climber, make_target):
    server, _, _ = wss_setup
    wss_port, _ = ports(server)
    entry = {
        "host": f"127.0.0.1:{wss_port}", "type": "wss", "path": "/wrong", "sni": "localhost",
        "username": ALICE.name, "password": ALICE.password, "ca": str(e2e_setup.ca),
    }
    climber = make_climber([entry], name="climber-wrong-path", http=False)
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", make_target(echo).port)
    sock.close()
    assert reply[1] != 0, reply.hex()
    climber.wait_for(r"answered the WebSocket upgrade with HTTP 404 \(wrong path or Host\?\)", 10)
