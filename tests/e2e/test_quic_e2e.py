"""End to end over QUIC: ``twistd -r asyncio mtop`` serving TLS and QUIC on
the same port number, ``twistd -r asyncio climber`` with a ``type: quic``
server, driven through climber's SOCKS5 proxy with plain sockets; the whole
module once per QUIC library (``quic.backend`` in both configs)."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    ALICE,
    STARTUP_TIMEOUT,
    ClimberProcess,
    TEST_POLICY,
    ServerProcess,
    _processes,
    subprocess_env,
)
from peers import banner_then_read, echo, recv_to_eof
from test_climber_e2e import (
    body_chunks,
    body_digest,
    recv_exactly,
    sender_of,
    slow_reader_growth,
    socks5_request,
)

MiB = 1 << 20
SIZE = 64 * MiB
SOCKET_TIMEOUT = 60.0
QUIC_LISTENING = re.compile(r"MTop QUIC listening on 127\.0\.0\.1:(\d+)")
TLS_LISTENING = re.compile(r"MTop TLS listening on 127\.0\.0\.1:(\d+)")
TUNNEL_DONE = re.compile(r"tunnel (\S+): client=127\.0\.0\.1:(\d+) user=alice target=127\.0\.0\.1:(\d+)")


class QuicServerProcess(ServerProcess):
    twistd_options = ("-r", "asyncio")
    kind = "mtop server (QUIC)"

    def _wait_ready(self) -> None:
        self.port = int(self.wait_for(QUIC_LISTENING, STARTUP_TIMEOUT, what="the QUIC listening line").group(1))
        self.tls_port = int(self.wait_for(TLS_LISTENING, STARTUP_TIMEOUT, what="the TLS listening line").group(1))


class QuicClimberProcess(ClimberProcess):
    twistd_options = ("-r", "asyncio")
    kind = "climber (QUIC)"


def free_port_both() -> int:
    """A port number free on 127.0.0.1 for both TCP and UDP (just released)."""
    for _ in range(20):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP")


#: The QUIC library of the module's current round (``quic_backend``).
BACKEND = ["auto"]


@pytest.fixture(scope="module", params=("qh3", "aioquic"), autouse=True)
def quic_backend(request):
    BACKEND[0] = request.param
    yield request.param
    BACKEND[0] = "auto"


def write_server_config(directory: Path, setup, port: int, **server) -> Path:
    data = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "crt": str(setup.dir / "certs" / "server.crt"),
            "key": str(setup.dir / "certs" / "server.key"),
            "proto": "mtop",
            "handshake_timeout": 2,
            "connect_timeout": 5,
            **server,
        },
        "listeners": [{"type": "tls"}, {"type": "quic"}],
        "log": {"level": "info"},
        "quic": {"backend": BACKEND[0]},
        "db": {"driverName": "sqlite", "dsn": str(setup.dir / "mtop.db")},
        **yaml.safe_load(TEST_POLICY),
    }
    path = directory / "mtop.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(process):
    _processes.append(process)
    try:
        process.start()
    except BaseException:
        stop(process)
        raise
    return process


def stop(process) -> None:
    process.stop()
    if process in _processes:
        _processes.remove(process)


def start_server(setup, directory: Path, **server) -> QuicServerProcess:
    return start(QuicServerProcess("quic", write_server_config(directory, setup, free_port_both(), **server), directory))


def start_climber(setup, directory: Path, server_port: int, top: dict | None = None, **entry) -> QuicClimberProcess:
    data = {
        "quic": {"backend": BACKEND[0]},
        **(top or {}),
        "log": {"level": "info"},
        "socks5": {"listen": "127.0.0.1:0"},
        "servers": [
            {
                "host": f"127.0.0.1:{server_port}",
                "type": "quic",
                "username": ALICE.name,
                "password": ALICE.password,
                "ca": str(setup.ca),
                **entry,
            }
        ],
    }
    directory.mkdir(exist_ok=True)
    config = directory / "climber.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return start(QuicClimberProcess("quic", config, directory))


@pytest.fixture(scope="module")
def quic_server(quic_backend, e2e_setup, tmp_path_factory):
    process = start_server(e2e_setup, tmp_path_factory.mktemp("quic-server"))
    yield process
    stop(process)


@pytest.fixture(scope="module")
def quic_climber(quic_server, e2e_setup, tmp_path_factory):
    process = start_climber(e2e_setup, tmp_path_factory.mktemp("quic-climber"), quic_server.port)
    yield process
    stop(process)


def assert_no_traceback(*processes) -> None:
    for process in processes:
        log = process.log()
        assert "Traceback" not in log and "Unhandled" not in log, process.describe()


def open_tunnel(climber, target_port: int) -> socket.socket:
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target_port)
    assert reply[:2] == b"\x05\x00", reply.hex()
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def test_same_port_serves_tls_and_quic(quic_server, e2e_setup):
    assert quic_server.port == quic_server.tls_port
    url = f"mtop://{ALICE.name}:{ALICE.password}@127.0.0.1:{quic_server.tls_port}/tls?proto=mtop"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        result = subprocess.run(
            [sys.executable, "-m", "mtop.ctl", "check", "--ca", str(e2e_setup.ca),
             "--target", f"127.0.0.1:{listener.getsockname()[1]}", url],
            capture_output=True, text=True, timeout=60, env=subprocess_env(),
        )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def digest_upload_then_send(size: int, seed: int):
    """Target: hash everything up to EOF, then send ``size`` bytes of
    ``seed`` and close; returns (bytes read, their sha256)."""

    def handler(sock: socket.socket):
        digest = hashlib.sha256()
        count = 0
        while chunk := sock.recv(1 << 18):
            digest.update(chunk)
            count += len(chunk)
        for chunk in body_chunks(size, seed):
            sock.sendall(chunk)
        return count, digest.hexdigest()

    return handler


def test_64mib_each_way_with_half_close(quic_climber, quic_server, make_target):
    """64 MiB up, the client's FIN, then 64 MiB down, all intact."""
    target = make_target(digest_upload_then_send(SIZE, 42))
    since = quic_server.mark()
    sock = open_tunnel(quic_climber, target.port)
    started = time.monotonic()
    with sock:
        for chunk in body_chunks(SIZE, 41):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        up_done = time.monotonic()
        digest = hashlib.sha256()
        count = 0
        while chunk := sock.recv(1 << 18):
            digest.update(chunk)
            count += len(chunk)
    done = time.monotonic()
    assert target.result() == (SIZE, body_digest(SIZE, 41))
    assert (count, digest.hexdigest()) == (SIZE, body_digest(SIZE, 42))
    print(f"QUIC: up {SIZE / MiB / (up_done - started):.1f} MiB/s, down {SIZE / MiB / (done - up_done):.1f} MiB/s")
    quic_server.wait_for(r"tunnel done: .* up=67108864 ", 10, since=since, what="the tunnel's done line")
    assert_no_traceback(quic_server, quic_climber)


def test_target_half_close(quic_climber, make_target):
    """The target speaks first and shuts its side: the client sees EOF, and
    can still send."""
    target = make_target(banner_then_read)
    with open_tunnel(quic_climber, target.port) as sock:
        assert recv_to_eof(sock) == b"banner"
        sock.sendall(b"after the banner")
        sock.shutdown(socket.SHUT_WR)
    assert target.result() == b"after the banner"


def concurrent_tunnels(climber, server, make_target, count: int, hold: float = 0.0) -> None:
    """``count`` tunnels through ``climber`` open at the same time, each
    echoing a payload, then (after ``hold`` seconds, all still open) a
    second one; all must come back whole, over one QUIC connection."""
    target = make_target(echo)
    target.listener.listen(count + 16)
    since = server.mark()
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(count, timeout=SOCKET_TIMEOUT)

    def one(i: int) -> None:
        try:
            with open_tunnel(climber, target.port) as sock:
                barrier.wait()  # all tunnels open at the same time
                first = bytes([i % 256]) * (1000 + i)
                sock.sendall(first)
                outcomes[i] = recv_exactly(sock, len(first)) == first
                if hold:
                    barrier.wait()  # every first echo is back: all are open now
                    time.sleep(hold)
                second = bytes([(i + 1) % 256]) * (500 + i)
                sock.sendall(second)
                sock.shutdown(socket.SHUT_WR)
                outcomes[i] = outcomes[i] and recv_to_eof(sock) == second
        except BaseException as e:
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOCKET_TIMEOUT * 2 + hold)
    failed = {i: v for i, v in outcomes.items() if v is not True}
    alive = count - len(failed) - (count - len(outcomes))
    print(f"{alive} of {count} tunnels alive after {hold:.0f} s")
    assert len(outcomes) == count and not failed, f"failed: {failed}" + climber.describe()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = [m for m in TUNNEL_DONE.finditer(server.log(since)) if int(m.group(3)) == target.port]
        if len(done) >= count:
            break
        time.sleep(0.2)
    assert len(done) == count, server.describe(since)
    assert {m.group(1) for m in done} == {"done"}
    # One QUIC connection (one client UDP port) carried them all.
    assert len({m.group(2) for m in done}) == 1, server.describe(since)


def test_100_concurrent_tunnels_on_one_connection(quic_climber, quic_server, make_target):
    concurrent_tunnels(quic_climber, quic_server, make_target, 100)


def test_300_tunnels_on_one_connection_stay_alive_for_30_seconds(quic_server, e2e_setup, tmp_path, make_target):
    """The original's client opens every tunnel as a stream of one
    connection, with no deadline: past the server's stream limit it stalls
    until its idle timeout kills them all.  A client doing the same (climber
    with ``max_streams: 300``) holds 300 tunnels open for 30 s."""
    climber = start_climber(e2e_setup, tmp_path / "climber", quic_server.port, max_streams=300)
    try:
        concurrent_tunnels(climber, quic_server, make_target, 300, hold=30.0)
        assert_no_traceback(climber, quic_server)
    finally:
        stop(climber)


#: What a process may grow by while 64 MiB wait for a slow reader.
MEMORY_SLACK_KIB = 24 * 1024


def test_slow_reader_keeps_memory_bounded(quic_climber, quic_server, make_target):
    """The client does not read for two seconds while the target sends
    64 MiB: neither process may buffer it."""
    target = make_target(sender_of(SIZE))
    server_growth, climber_growth = slow_reader_growth(quic_climber, quic_server, target.port, SIZE)
    assert server_growth < MEMORY_SLACK_KIB, quic_server.describe()
    assert climber_growth < MEMORY_SLACK_KIB, quic_climber.describe()


def test_wrong_alpn_is_refused(quic_server, e2e_setup, tmp_path):
    since = quic_server.mark()
    climber = start_climber(e2e_setup, tmp_path / "climber", quic_server.port, proto="not-mtop")
    try:
        sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", 9)
        sock.close()
        assert reply[1] == 0x03, reply.hex()  # network unreachable: no server reachable
        climber.wait_for(r"ALPN", 10, what="the handshake failure")
        quic_server.wait_for(r"quic connection quic-handshake-failed: .*ALPN", 10, since=since, what="the refusal")
        assert_no_traceback(climber)
    finally:
        stop(climber)


def test_a_drain_lets_an_open_quic_tunnel_finish(e2e_setup, tmp_path, make_target):
    """SIGTERM with a drain: the QUIC listener takes no new tunnel but keeps
    its port for the download under way, which arrives whole; then the
    server exits by itself."""
    import signal

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = start_server(e2e_setup, server_dir, drain_timeout=30)
    climber = start_climber(e2e_setup, tmp_path / "climber", server.port)
    try:
        target = make_target(sender_of(SIZE))
        sock = open_tunnel(climber, target.port)
        with sock:
            digest = hashlib.sha256()
            first = recv_exactly(sock, MiB)
            digest.update(first)
            count = len(first)
            since = server.mark()
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(r"draining: accepting no new tunnels; 1 open", 10, since=since, what="the drain")
            refused, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
            refused.close()
            assert reply[1] != 0x00, reply.hex()  # no new stream on a draining server
            while chunk := sock.recv(1 << 18):
                digest.update(chunk)
                count += len(chunk)
        assert (count, digest.hexdigest()) == (SIZE, body_digest(SIZE, 5))
        server.wait_for(r"drained: every tunnel ended within", 30, since=since, what="the end of the drain")
        assert server.proc.wait(15) in (0, -signal.SIGTERM), server.describe(since)
        assert_no_traceback(server)
    finally:
        stop(climber)
        stop(server)


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_connection_loss_mid_transfer_closes_tunnels(e2e_setup, tmp_path, make_target, how):
    """The server goes away mid-download: the client's connection ends
    (quickly when the server says so; after the idle timeout when it just
    vanishes), climber logs no traceback and opens a new connection for the
    next tunnel once a server is back."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    # Stopped without a drain: its tunnels are closed at once.
    server = start_server(e2e_setup, server_dir, drain_timeout=0)
    # A vanished server is noticed by the idle timeout (QUIC has no FIN).
    idle = 4
    climber = start_climber(e2e_setup, tmp_path / "climber", server.port, top={"idle_timeout": idle})
    try:
        target = make_target(sender_of(SIZE))
        sock = open_tunnel(climber, target.port)
        with sock:
            assert len(recv_exactly(sock, MiB)) == MiB
            started = time.monotonic()
            if how == "stopped":
                server.stop()
            else:
                server.proc.kill()
                server.proc.wait(10)
            sock.settimeout(idle + 30)
            try:
                while sock.recv(1 << 18):
                    pass
            except ConnectionResetError:
                pass
            elapsed = time.monotonic() - started
        assert elapsed < (5 if how == "stopped" else idle + 10), elapsed
        climber.wait_for(r"socks5 tunnel (target-closed|idle-timeout)", 10, what="the tunnel's end")
        assert_no_traceback(climber)
    finally:
        stop(climber)
        stop(server)
