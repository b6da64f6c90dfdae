"""Abuse resistance through real ``twistd mtop`` processes: the default
destination ACL (no acl: key), the fallback web server, a PROXY protocol
listener, and a config error."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from conftest import TWISTD, ServerProcess, _start, subprocess_env
from peers import echo
from test_server_e2e import TLSClient, auth_message, connect, outcome_line

PAGE = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"


def config_text(setup, extra: str) -> str:
    return (
        "server:\n"
        '  listen: "127.0.0.1:0"\n'
        f"  crt: {setup.dir / 'certs' / 'server.crt'}\n"
        f"  key: {setup.dir / 'certs' / 'server.key'}\n"
        "  handshake_timeout: 2\n"
        "  reply_errors: true\n"
        "  auth_failure_delay: 0\n" + extra.replace("\nserver:\n", "\n") + "log:\n  level: info\n"
        f"db:\n  driverName: sqlite\n  dsn: {setup.dir / 'mtop.db'}\n"
    )


@pytest.fixture
def start_server(e2e_setup, tmp_path):
    def start(extra: str = "") -> ServerProcess:
        path = tmp_path / f"mtop-{len(list(tmp_path.glob('mtop-*.yaml')))}.yaml"
        path.write_text(config_text(e2e_setup, extra))
        cwd = tmp_path / f"cwd-{path.stem}"
        cwd.mkdir()
        generator = _start(ServerProcess(path.stem, path, cwd))
        process = next(generator)
        started.append(generator)
        return process

    started = []
    yield start
    for generator in started:
        next(generator, None)


class WebServer:
    """A plain HTTP server on 127.0.0.1 that records requests and answers
    every one with a 404 page."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(PAGE)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.fixture
def web():
    server = WebServer()
    yield server
    server.close()


def test_default_acl_refuses_loopback_targets_by_address_and_by_name(start_server, e2e_setup, make_target):
    server = start_server()  # no acl: key at all
    target = make_target(echo)
    for host in ("127.0.0.1", "localhost", "::ffff:127.0.0.1"):
        since = server.mark()
        client = connect(server, e2e_setup)
        try:
            client.send_all(auth_message(e2e_setup.alice, None, host, target.port))
            assert client.read_to_eof() == b"\x01\x03"
        finally:
            client.close()
        line = outcome_line(server, client, since)
        assert line.group("outcome") == "acl-denied", line.group(0)
        assert line.group("user") == "alice" and line.group("target").endswith(f":{target.port}")
    assert target.accepted == 0


def test_fallback_serves_browsers_probes_and_failed_logins(start_server, e2e_setup, make_target, web):
    server = start_server(f'  fallback: "127.0.0.1:{web.port}"\nacl:\n  allow: ["127.0.0.0/8"]\n')
    target = make_target(echo)
    browser = TLSClient(server.port, str(e2e_setup.ca), alpn=(b"h2", b"http/1.1"))
    try:
        browser.handshake()
        assert browser.alpn == b"http/1.1"
        browser.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert browser.read_to_eof() == PAGE
    finally:
        browser.close()
    assert web.received[-1] == b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    wrong = connect(server, e2e_setup)
    try:
        message = auth_message(e2e_setup.alice, e2e_setup.wrong_password, "127.0.0.1", target.port)
        wrong.send_all(message)
        assert wrong.read_to_eof() == PAGE  # not 01 02, although reply_errors is on
    finally:
        wrong.close()
    assert web.received[-1] == message
    good = connect(server, e2e_setup)
    try:
        good.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"hello")
        assert good.read_exactly(7) == b"\x01\x00hello"
    finally:
        good.close()
    server.wait_for(r"tunnel fallback: .* \(auth failed; ", 10)
    server.wait_for(r"tunnel fallback: .* \(ALPN http/1.1; ", 10)


def test_proxy_protocol_listener_logs_the_real_client(start_server, e2e_setup, make_target):
    server = start_server("  proxy_protocol: true\nacl:\n  allow: [\"127.0.0.0/8\"]\n")
    server.wait_for(r"MTop TLS listening on .*\(PROXY protocol header required\)", 5)
    target = make_target(echo)
    since = server.mark()
    client = TLSClient(server.port, str(e2e_setup.ca), prefix=b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 443\r\n")
    try:
        client.handshake()
        client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"hi")
        assert client.read_exactly(4) == b"\x01\x00hi"
    finally:
        client.close()
    server.wait_for(r"tunnel \S+: client=\[2001:db8::7\]:50123 user=alice", 10, since=since)
    # Without a header the connection is closed.
    plain = TLSClient(server.port, str(e2e_setup.ca))
    try:
        with pytest.raises(Exception):
            plain.handshake(timeout=5)
    finally:
        plain.close()


def test_bad_acl_stops_twistd_with_one_line(e2e_setup, tmp_path):
    path = tmp_path / "mtop.yaml"
    path.write_text(config_text(e2e_setup, "acl:\n  allow: [\"10.0.0.0/40\"]\n"))
    result = subprocess.run(
        [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "mtop", "--config", str(path)],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=60,
    )
    assert result.returncode != 0
    assert "acl.allow: '10.0.0.0/40' is not a network" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
