"""``server.workers``: several processes on one port, each serving tunnels,
a dead worker replaced, workers gone with their supervisor."""

from __future__ import annotations

import os
import re
import signal
import time

from conftest import TEST_POLICY, ServerProcess, _processes
from peers import echo
from test_hardening_e2e import scrape
from test_server_e2e import auth_message, connect

from mtop.tlstransport import session_reused


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def two_workers_config(e2e_setup, path, more: str = ""):
    """``path``, written with a server of 2 workers on a free port and
    ``more`` (YAML lines) after its ``server:`` block."""
    path.write_text(
        "server:\n"
        '  listen: "127.0.0.1:0"\n'
        f"  crt: {e2e_setup.dir / 'certs' / 'server.crt'}\n"
        f"  key: {e2e_setup.dir / 'certs' / 'server.key'}\n"
        "  workers: 2\n" + more + f"db:\n  dsn: {e2e_setup.dir / 'mtop.db'}\n" + TEST_POLICY
    )
    return path


def test_two_workers_share_the_port_and_a_dead_one_is_replaced(e2e_setup, tmp_path, make_target):
    config = two_workers_config(e2e_setup, tmp_path / "mtop.yaml", 'metrics:\n  listen: "127.0.0.1:0"\n')
    server = ServerProcess("workers", config, tmp_path)
    _processes.append(server)
    try:
        server.start()
        pids = {int(n): int(p) for n, p in re.findall(r"worker (\d) started \(pid (\d+)\)", server.log())}
        assert set(pids) == {1, 2}
        metrics = [int(p) for p in wait_for_all(server, r"Prometheus metrics listening on 127\.0\.0\.1:(\d+) \(paths? /metrics", 2)]
        target = make_target(echo)
        clients = []
        try:
            for i in range(24):
                # From 4 addresses: each address's tunnels go to one worker
                # (server.worker_affinity: address), the addresses to both.
                client = connect(server, e2e_setup, source=f"127.0.0.{1 + i % 4}")
                clients.append(client)
                client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"%02d" % i)
                assert client.read_exactly(4) == b"\x01\x00" + b"%02d" % i
            scraped = [scrape(port) for port in metrics]
            per_worker = [values['mtop_tunnels_open{state="relay"}'] for values in scraped]
            assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker  # the kernel spread them
            assert sorted(per_worker) == [12, 12], per_worker  # two addresses each
            # alice's password was checked with scrypt once on the machine:
            # the other worker took the first one's verification.
            checks = {how: sum(v[f'mtop_password_checks_total{{how="{how}"}}'] for v in scraped) for how in ("hashed", "shared")}
            assert checks == {"hashed": 1, "shared": 1}, checks
        finally:
            for client in clients:
                client.close()

        since = server.mark()
        os.kill(pids[1], signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {pids[1]}\) ended .*; starting a new one", 10, since=since)
        replaced = int(server.wait_for(r"worker 1 started \(pid (\d+)\)", 10, since=since).group(1))
        assert replaced != pids[1]
        server.wait_for(r"MTop TLS listening on 127\.0\.0\.1:", 20, since=since)
        port1 = int(server.wait_for(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+)", 20, since=since).group(1))
        for i in range(6):  # served all along, by whichever worker
            client = connect(server, e2e_setup)
            try:
                client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"ok")
                assert client.read_exactly(4) == b"\x01\x00ok"
            finally:
                client.close()
        # The new worker did not start cold: what it served, it took from
        # the verification the first worker made before it died.
        for _ in range(40):
            if scrape(port1)['mtop_auth_total{result="ok"}'] > 0:
                break
            client = connect(server, e2e_setup)
            try:
                client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"ok")
                assert client.read_exactly(4) == b"\x01\x00ok"
            finally:
                client.close()
        again = scrape(port1)
        assert again['mtop_auth_total{result="ok"}'] > 0, again
        assert again['mtop_password_checks_total{how="hashed"}'] == 0, again
        assert again['mtop_password_checks_total{how="shared"}'] == 1, again

        # Killed without a chance to stop them, the supervisor leaves no worker behind.
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        assert wait_until(lambda: not alive(replaced) and not alive(pids[2]), 10)
    finally:
        server.stop()
        _processes.remove(server)
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_client_address_keeps_to_one_worker_so_its_sessions_resume(e2e_setup, tmp_path, make_target):
    """Each worker's TLS ticket keys are its own: spread by address pair,
    about half of a returning client's tunnels reached the other worker
    and did a full handshake.  With ``worker_affinity: address`` (the
    default) all of them resume; with ``connection``, some do not."""
    target = make_target(echo)
    resumed = {}
    for affinity in ("address", "connection"):
        config = two_workers_config(e2e_setup, tmp_path / f"mtop-{affinity}.yaml", f"  worker_affinity: {affinity}\n")
        server = ServerProcess(f"workers-{affinity}", config, tmp_path)
        _processes.append(server)
        try:
            server.start()
            wait_for_all(server, r"MTop TLS listening on 127\.0\.0\.1:", 2)
            session = None
            count = 0
            for i in range(17):
                client = connect(server, e2e_setup, source="127.0.0.5", session=session)
                try:
                    client.send_all(auth_message(e2e_setup.alice, None, "127.0.0.1", target.port) + b"%02d" % i)
                    assert client.read_exactly(4) == b"\x01\x00" + b"%02d" % i
                    if i:
                        count += session_reused(client.conn)
                    session = client.conn.get_session()  # the tickets are in by the reply
                finally:
                    client.close()
            resumed[affinity] = count
        finally:
            server.stop()
            _processes.remove(server)
    assert resumed["address"] == 16, resumed
    # By address pair, each of the 16 reached the ticket's worker with
    # probability 1/2: all 16 only once in 65,536 runs.
    assert resumed["connection"] < 16, resumed


def wait_for_all(server, pattern: str, count: int, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, server.log())
        if len(found) >= count:
            return found[:count]
        time.sleep(0.1)
    raise AssertionError(f"{count} lines matching {pattern!r} expected" + server.describe())
