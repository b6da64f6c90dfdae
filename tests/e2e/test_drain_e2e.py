"""A graceful stop of a real ``twistd mtop``: on SIGTERM it reports not
ready, refuses new connections, lets the open tunnel finish and flushes
its traffic last; a second SIGTERM cuts at once.  With workers, the
supervisor drains them all."""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request

import pytest
from OpenSSL import SSL

from conftest import ALICE, TEST_POLICY, ServerProcess, _processes, run_ctl
from peers import echo
from test_server_e2e import auth_message, connect, outcome_line
from test_workers_e2e import wait_for_all

HEALTH = re.compile(r"Health check listening on 127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def counters(db) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT bytes_up, bytes_down FROM mtop_user WHERE username = ?", (ALICE.name,)).fetchone()


def echo_tunnel(server, setup, target_port: int, first: bytes):
    """A tunnel to the echo target that has carried ``first`` both ways."""
    client = connect(server, setup)
    client.send_all(auth_message(setup.alice, None, "127.0.0.1", target_port) + first)
    assert client.read_exactly(2 + len(first)) == b"\x01\x00" + first
    return client


@pytest.fixture
def drain_server(e2e_setup, tmp_path):
    """A server of its own (its own database, so the counters are this
    test's) with a health listener, ``drain_timeout: 20`` and a flush
    interval longer than the test: what reaches the table is the last
    flush's."""
    started = []

    def start(workers: int = 1) -> tuple[ServerProcess, int, object]:
        config = tmp_path / "mtop.yaml"
        health_port = free_port() if workers > 1 else 0
        config.write_text(
            "server:\n"
            '  listen: "127.0.0.1:0"\n'
            f"  crt: {e2e_setup.dir / 'certs' / 'server.crt'}\n"
            f"  key: {e2e_setup.dir / 'certs' / 'server.key'}\n"
            "  drain_timeout: 20\n"
            f"  workers: {workers}\n"
            f'health:\n  listen: "127.0.0.1:{health_port}"\n'
            "db:\n  dsn: mtop.db\n  flush_interval: 600\n" + TEST_POLICY
        )
        run_ctl(config, "db", "init")
        run_ctl(config, "user", "add", "-u", ALICE.name, "--password-stdin", stdin=ALICE.password + "\n")
        server = ServerProcess(f"drain{workers}", config, tmp_path)
        _processes.append(server)
        started.append(server)
        server.start()
        ports = wait_for_all(server, HEALTH.pattern, workers)  # every worker listens
        return server, int(ports[0]), tmp_path / "mtop.db"

    yield start
    for server in started:
        server.stop()
        _processes.remove(server)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_the_open_tunnel_and_flushes_its_traffic(drain_server, e2e_setup, make_target, workers):
    server, health_port, db = drain_server(workers)
    target = make_target(echo)
    # Ready once the database has answered its first probe (not at once
    # on a loaded machine).
    deadline = time.monotonic() + 10
    while True:
        status, body = health(health_port)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200 and body.startswith("ready\n"), body
    client = echo_tunnel(server, e2e_setup, target.port, b"before")
    try:
        since = server.mark()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"draining: accepting no new tunnels; 1 open get up to 20s", 10, since=since)
        drains = wait_for_all(server, r"draining: accepting no new tunnels; (\d) open", workers)
        assert sorted(drains) == ["0"] * (workers - 1) + ["1"]
        if workers == 1:
            status, body = health(health_port)
            assert status == 503 and body.startswith("not ready: draining"), body
        with pytest.raises((OSError, SSL.Error)):  # the listener is closed: a balancer goes elsewhere at once
            connect(server, e2e_setup)
        # The open tunnel goes on.
        client.send_all(b"during the drain")
        assert client.read_exactly(16) == b"during the drain"
    finally:
        client.close()
    match = outcome_line(server, client, since)
    assert match["outcome"] in ("done", "client-closed", "target-closed")
    server.wait_for(r"drained: every tunnel ended within", 10, since=since)
    assert server.proc.wait(15) in (0, -signal.SIGTERM), server.describe()  # twistd ends by the signal it got
    assert "Traceback" not in server.log(), server.describe()
    # The table has the tunnel's bytes (the auth message is not counted).
    assert counters(db) == (6 + 16, 6 + 16)


def test_a_second_sigterm_cuts_the_drain(drain_server, e2e_setup, make_target):
    server, health_port, db = drain_server()
    target = make_target(echo)
    client = echo_tunnel(server, e2e_setup, target.port, b"hello")
    try:
        since = server.mark()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"draining: ", 10, since=since)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"drain cut short: stop signal repeated after [\d.]+s; closing the 1 tunnels still open", 10, since=since)
        match = outcome_line(server, client, since)
        assert match["outcome"] == "shutdown"
        assert server.proc.wait(10) in (0, -signal.SIGTERM), server.describe()
    finally:
        client.close()
    assert counters(db) == (5, 5)
    assert "Traceback" not in server.log(), server.describe()
