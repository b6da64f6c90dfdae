"""Abuse resistance through real ``twistd mtop`` processes: the default
destination ACL (no acl: key), the fallback web server, a PROXY protocol
listener, and a config error."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from conftest import TWISTD, ServerProcess, _start, subprocess_env
from mtop import wire
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
    assert web.received[-1] == wire.without_password(message)  # what was sent, the password masked
    assert e2e_setup.wrong_password.encode() not in web.received[-1]
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


def served_certificate(port: int) -> bytes:
    """The DER certificate a new connection to ``port`` is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["mtop"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(path).read().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")


def test_sighup_reloads_certificate_and_acl_without_dropping_tunnels(start_server, e2e_setup, make_target, tmp_path):
    from mtop.certs import init_certs

    server = start_server('acl:\n  allow: ["127.0.0.0/8"]\n')
    target = make_target(echo)
    assert served_certificate(server.port) == der(e2e_setup.dir / "certs" / "server.crt")
    open_tunnel = connect(server, e2e_setup)
    try:
        open_tunnel.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"one")
        assert open_tunnel.read_exactly(5) == b"\x01\x00one"
        renewed = init_certs(str(tmp_path / "renewed"), ["localhost"], ["127.0.0.1"])
        text = server.config.read_text()
        text = text.replace(str(e2e_setup.dir / "certs" / "server.crt"), renewed.server_crt)
        text = text.replace(str(e2e_setup.dir / "certs" / "server.key"), renewed.server_key)
        text = text.replace('allow: ["127.0.0.0/8"]', "allow: []")  # loopback refused from now on
        server.config.write_text(text)
        since = server.mark()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"config reloaded from ", 10, since=since)
        assert served_certificate(server.port) == der(renewed.server_crt)
        # The open tunnel goes on; a new one to loopback is refused now.
        open_tunnel.send_all(b"two")
        assert open_tunnel.read_exactly(3) == b"two"
        refused = TLSClient(server.port, renewed.ca_crt)
        try:
            refused.handshake()
            refused.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port))
            assert refused.read_to_eof() == b"\x01\x03"
        finally:
            refused.close()
        # A broken config is rejected and the running one stays.
        server.config.write_text(text.replace("handshake_timeout: 2", "handshake_timeout: soon"))
        since = server.mark()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"config reload rejected, the running configuration stays: .*server.handshake_timeout", 10, since=since)
        assert served_certificate(server.port) == der(renewed.server_crt)
        open_tunnel.send_all(b"three")
        assert open_tunnel.read_exactly(5) == b"three"
        assert server.proc.poll() is None
    finally:
        open_tunnel.close()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoint_counts_tunnels_bytes_logins_and_refusals(start_server, e2e_setup, make_target):
    server = start_server(
        'acl:\n  allow: ["127.0.0.0/8"]\n  deny_ports: [9]\nmetrics:\n  listen: "127.0.0.1:0"\n  per_user: true\n'
    )
    port = int(server.wait_for(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+) \(paths? /metrics", 10).group(1))
    before = scrape(port)
    assert before['mtop_tunnels_open{state="relay"}'] == 0
    assert before["process_resident_memory_bytes"] > 0
    target = make_target(echo)
    client = connect(server, e2e_setup)
    try:
        client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"x" * 1000)
        assert client.read_exactly(1002)[2:] == b"x" * 1000
        live = scrape(port)
        assert live['mtop_tunnels_open{state="relay"}'] == 1
        assert live['mtop_traffic_bytes_total{direction="up"}'] == 1000  # open tunnels count too
        assert live['mtop_user_traffic_bytes_total{direction="down",user="alice"}'] == 1000
        assert live['mtop_auth_total{result="ok"}'] == 1
        assert live["mtop_handshake_seconds_count"] == 1 and live["mtop_connect_seconds_count"] == 1
        # Both ways until the next flush (0 if one ran in between).
        assert live["mtop_unflushed_bytes"] in (0, 2000), live["mtop_unflushed_bytes"]
    finally:
        client.close()
    for password, target_port in ((e2e_setup.wrong_password, target.port), (None, 9)):
        refused = connect(server, e2e_setup)
        try:
            refused.send_all(auth_message(e2e_setup.alice, password, "127.0.0.1", target_port))
            refused.read_to_eof()
        finally:
            refused.close()
    server.wait_for(r"tunnel acl-denied", 10)
    after = scrape(port)
    assert after['mtop_tunnels_open{state="relay"}'] == 0
    assert after['mtop_tunnels_total{outcome="auth-failed"}'] == 1
    assert after['mtop_tunnels_total{outcome="acl-denied"}'] == 1
    assert after['mtop_refused_total{reason="acl"}'] == 1
    assert after['mtop_auth_total{result="failed"}'] == 1
    assert after['mtop_traffic_bytes_total{direction="down"}'] == 1000
    assert after["mtop_db_errors_total"] == 0 and after["mtop_throttled_addresses"] == 0
    # alice's password: hashed once (scrypt), then the wrong one hashed too.
    assert after['mtop_password_checks_total{how="hashed"}'] + after['mtop_password_checks_total{how="fast"}'] == 2


def test_climber_metrics_count_tunnels_servers_and_failovers(server, make_climber, make_target):
    from peers import closed_port
    from test_climber_e2e import recv_exactly, socks5_request

    dead = closed_port()
    climber = make_climber([dead, server], strategy="failover", http=False, metrics={"listen": "127.0.0.1:0"})
    port = int(climber.wait_for(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+) \(path /metrics\)", 10).group(1))
    target = make_target(echo)
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
    try:
        assert reply[1] == 0
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        live = scrape(port)
        assert live['climber_tunnels_open{frontend="socks5"}'] == 1
        via = f"127.0.0.1:{server.port}"
        assert live[f'climber_traffic_bytes_total{{direction="up",server="{via}"}}'] == 5
    finally:
        sock.close()
    climber.wait_for(r"socks5 tunnel \S+: ", 10)
    after = scrape(port)
    assert after[f'climber_server_up{{server="127.0.0.1:{dead}"}}'] == 0
    assert after[f'climber_server_up{{server="{via}"}}'] == 1
    assert after[f'climber_server_unreachable_total{{server="127.0.0.1:{dead}"}}'] == 1
    assert after[f'climber_server_tunnels_opened_total{{server="{via}"}}'] == 1
    assert after["climber_failovers_total"] == 1
    assert sum(v for k, v in after.items() if k.startswith("climber_tunnels_total{") and f'server="{via}"' in k) == 1


def test_every_connection_open_at_shutdown_gets_one_outcome_line(start_server, e2e_setup, make_target):
    """SIGTERM with connections in every state (relaying, in the relay's
    lingering close, failing with a reply, before their auth message):
    each logs exactly one outcome, ``shutdown`` for those the stop ends."""
    import time

    from test_server_e2e import auth_message as message

    import struct

    server = start_server('acl:\n  allow: ["127.0.0.0/8"]\nauth_throttle:\n  max_failures: 100\n')
    since = server.mark()
    echo_target = make_target(echo)

    def leave_at_once(sock):
        # Resets the connection while the client still sends (as a web
        # server refusing an upload may): the relay lingers, reading the
        # client, for up to 2 s.
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return b""

    leaving_target = make_target(leave_at_once)
    clients = []
    try:
        for _ in range(10):  # relaying
            client = connect(server, e2e_setup)
            client.send_all(message(e2e_setup.alice, None, "127.0.0.1", echo_target.port) + b"x")
            assert client.read_exactly(3) == b"\x01\x00x"
            clients.append(client)
        for _ in range(10):  # the target left while the client still sends: lingering
            client = connect(server, e2e_setup)
            client.send_all(message(e2e_setup.alice, None, "127.0.0.1", leaving_target.port) + b"upload")
            assert client.read_exactly(2) == b"\x01\x00"
            clients.append(client)
        for _ in range(10):  # a wrong password, answered 01 02, then lingering
            client = connect(server, e2e_setup)
            client.send_all(message(e2e_setup.alice, e2e_setup.wrong_password, "127.0.0.1", echo_target.port))
            assert client.read_exactly(2) == b"\x01\x02"
            clients.append(client)
        for _ in range(10):  # TLS done, no auth message yet
            clients.append(connect(server, e2e_setup))
        time.sleep(0.6)  # the targets have reset: those relays linger
        server.stop()
        log = server.log(since)
        outcomes = re.findall(r"tunnel (\S+): client=127\.0\.0\.1:(\d+) ", log)
        ports = [int(port) for _, port in outcomes]
        for client in clients:
            assert ports.count(client.local_port) == 1, (client.local_port, log)
        kinds = [outcome for outcome, port in outcomes if int(port) in {c.local_port for c in clients}]
        assert kinds.count("shutdown") >= 20, kinds
        assert kinds.count("auth-failed") == 10, kinds
        assert "Traceback" not in log
    finally:
        for client in clients:
            client.close()


def test_client_block_list_file_and_sighup(start_server, e2e_setup, make_target, tmp_path):
    """A block list file: loaded at start, re-read when it changes (within
    the 5 s check), replaced by SIGHUP with another config; refusals are
    closed before TLS and counted."""
    import os
    import time

    def tunnel_works() -> bool:
        try:
            client = connect(server, e2e_setup)
        except Exception:
            return False
        try:
            client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"x")
            return client.read_exactly(3) == b"\x01\x00x"
        finally:
            client.close()

    blocklist = tmp_path / "drop.txt"
    blocklist.write_text("; a public list's comment\n192.0.2.0/24 ; SBL1\n")
    server = start_server(f'acl:\n  allow: ["127.0.0.0/8"]\nclients:\n  deny: ["{blocklist}"]\n')
    target = make_target(echo)
    server.wait_for(r"client lists loaded: 0 networks allowed, 1 denied", 10)
    assert tunnel_works()
    # The operator adds loopback to the list (atomically, as documented).
    since = server.mark()
    new = tmp_path / "drop.txt.new"
    new.write_text("192.0.2.0/24\n127.0.0.0/8  # us, for the test\n")
    os.replace(new, blocklist)
    server.wait_for(r"client lists loaded: 0 networks allowed, 2 denied", 10, since=since)
    assert not tunnel_works()
    # SIGHUP with the list gone from the config: loopback gets in again.
    since = server.mark()
    server.config.write_text(server.config.read_text().replace(f'clients:\n  deny: ["{blocklist}"]\n', ""))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(r"config reloaded from ", 10, since=since)
    deadline = time.monotonic() + 5
    while not tunnel_works() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tunnel_works()
    assert "Traceback" not in server.log()
