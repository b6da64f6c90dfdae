"""The benchmark harness's pieces (not the benchmarks: `make bench` runs
those): the origin's services and the clients agree on what was moved."""

import os
import socket
import time

import pytest
import pytest_twisted

from bench import client
from bench.origin import Origin


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


def target(origin, service):
    return ("127.0.0.1", origin.ports[service])


def test_download_and_upload_count_every_byte(origin):
    direct = client.Path("direct")
    size = 3 * (1 << 20) + 7
    assert client.transfer(direct, target(origin, "source"), "download", size, 30)[0] == size
    assert client.transfer(direct, target(origin, "sink"), "upload", size, 30)[0] == size


def test_time_bound_stops_a_transfer_early_and_counts_what_arrived(origin):
    direct = client.Path("direct")
    moved, elapsed = client.transfer(direct, target(origin, "sink"), "upload", 1 << 40, 0.2)
    assert 0 < moved < 1 << 40 and elapsed < 10


def test_echo_round_trips_and_setup_rate(origin):
    direct = client.Path("direct")
    with direct.open(target(origin, "echo")) as sock:
        payload = os.urandom(32)
        client.echo_once(sock, payload)
    result = client.setup_rate(direct, target(origin, "echo"), 50, 4, 30)
    assert result.done == 50 and result.failed == 0 and result.p50_ms <= result.p99_ms


def test_socks5_client_speaks_to_a_minimal_server(origin):
    """The SOCKS5 client's handshake, against a one-shot server that checks
    it byte for byte and then splices to the echo."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    import threading

    def serve():
        conn, _ = listener.accept()
        with conn:
            assert client.recv_exact(conn, 3) == b"\x05\x01\x00"
            conn.sendall(b"\x05\x00")
            request = client.recv_exact(conn, 10)
            assert request[:4] == b"\x05\x01\x00\x01"
            conn.sendall(b"\x05\x00\x00\x01" + bytes(6))
            data = client.recv_exact(conn, 32)
            conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    path = client.Path("socks5", listener.getsockname())
    with path.open(target(origin, "echo")) as sock:
        client.echo_once(sock, b"y" * 32)
    thread.join(5)
    listener.close()


def test_percentile_is_nearest_rank():
    values = sorted(float(i) for i in range(1, 101))
    assert client.percentile(values, 50) == 50.0
    assert client.percentile(values, 99) == 99.0
    assert client.percentile([3.0], 99) == 3.0


def test_cpu_seconds_of_this_process_grows():
    before = client.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert client.cpu_seconds(os.getpid()) >= before


def test_echo_each_moves_every_byte_and_keeps_the_sockets_open(origin):
    direct = client.Path("direct")
    socks = [direct.open(target(origin, "echo")) for _ in range(3)]
    try:
        assert client.echo_each(socks, 2 * (1 << 20) + 5, 2, 30) == 3
        for sock in socks:
            client.echo_once(sock, b"still open")
    finally:
        for sock in socks:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_mtop_path_speaks_mtop_to_the_server_and_resumes(server, origin):
    """The harness's MTop client (TLS, auth message, reply) against the
    real server in this process; its second tunnel resumes the session."""
    from twisted.internet.threads import deferToThread

    factory, port, paths = server
    path = client.Path("mtop", ("127.0.0.1", port), client.MtopLogin(paths.ca_crt, "alice", "pw"))

    def two_tunnels():
        reused = []
        for _ in range(2):
            with path.open(target(origin, "echo")) as sock:
                client.echo_once(sock, os.urandom(32))
                reused.append(sock.session_reused)
        moved = client.transfer(path, target(origin, "source"), "download", (1 << 20) + 3, 30)[0]
        return reused, moved

    reused, moved = await deferToThread(two_tunnels)
    assert reused == [False, True] and moved == (1 << 20) + 3


@pytest_twisted.ensureDeferred
async def test_mtop_path_reports_a_refused_login(server, origin):
    from twisted.internet.threads import deferToThread

    factory, port, paths = server
    path = client.Path("mtop", ("127.0.0.1", port), client.MtopLogin(paths.ca_crt, "alice", "wrong"))
    # (the server closes a failed login without a reply, as the Go server does)
    with pytest.raises(client.BenchError):
        await deferToThread(path.open, target(origin, "echo"))
