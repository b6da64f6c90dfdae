"""A cluster for real: three ``twistd mtop`` on 127.0.0.11-13 sharing one
PostgreSQL database, behind the real HAProxy (``send-proxy-v2``, the
health endpoint as its check, ``option redispatch``), under a load of
checksummed tunnels from 127.0.0.2.

One server is drained (SIGTERM) under load: no tunnel fails, HAProxy takes
it out, and the database has every byte the clients moved.  It comes back
and gets traffic again.  Another is killed (``kill -9``): only the tunnels
it carried and those begun in the moment after fail.  The PROXY header
carries the client's address to every server's log.

HAProxy is Debian's ``haproxy`` (tests/services.sh installs it)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TEST_POLICY, ServerProcess, _processes, run_ctl
from mtop import wire
from peers import echo

HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
CLIENT_SOURCE = "127.0.0.2"
USERS = [(f"user{i}", f"Cluster-pw-{i}-5d1f") for i in range(1, 7)]
DRAIN_TIMEOUT = 8.0
CHUNK = 32 * 1024
CHUNKS = 8


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        pytest.fail("HAProxy is not installed: apt-get install haproxy (make test's tests/services.sh installs it)")
    return found


def port_free_on_all(hosts) -> int:
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                for host in hosts[1:]:
                    with socket.socket() as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on every host")


def cluster_configs(tmp_path: Path, setup, port: int, rest: str) -> list[Path]:
    """An mtop.yaml per host of HOSTS, listening on ``port``: the server
    section's first lines, then ``rest`` (``{host}`` in it is the host)."""
    configs = []
    for i, host in enumerate(HOSTS):
        directory = tmp_path / f"mtop{i + 1}"
        directory.mkdir()
        config = directory / "mtop.yaml"
        config.write_text(
            "server:\n"
            f'  listen: "{host}:{port}"\n'
            f"  crt: {setup.dir / 'certs' / 'server.crt'}\n"
            f"  key: {setup.dir / 'certs' / 'server.key'}\n"
            + rest.replace("{host}", host)
            + TEST_POLICY
        )
        configs.append(config)
    return configs


@pytest.fixture
def cluster_dsn():
    """A PostgreSQL database of this test's own."""
    from helpers import fresh_postgres_database

    yield from fresh_postgres_database(f"mtop_cluster_{os.getpid()}_{secrets.token_hex(3)}")


class HAProxy:
    """``haproxy -db`` (foreground) on a config of its own, with a stats
    socket to ask which servers it takes as up."""

    def __init__(self, directory: Path, port: int, backend_port: int, health_port: int):
        self.port = port
        self.socket_path = directory / "haproxy.sock"
        servers = "\n".join(f"    server mtop{i + 1} {host}:{backend_port}" for i, host in enumerate(HOSTS))
        self.config = directory / "haproxy.cfg"
        self.config.write_text(
            "global\n"
            f"    stats socket {self.socket_path} mode 600 level admin\n"
            "    maxconn 2000\n"
            "defaults\n"
            "    mode tcp\n"
            "    option redispatch\n"
            "    retries 3\n"
            "    timeout connect 1s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout tunnel 60s\n"
            "frontend mtop\n"
            f"    bind 127.0.0.1:{port}\n"
            "    default_backend mtop_servers\n"
            "backend mtop_servers\n"
            "    balance roundrobin\n"
            "    option httpchk GET /health\n"
            "    http-check expect status 200\n"
            f"    default-server send-proxy-v2 check-send-proxy check port {health_port} inter 200ms fall 2 rise 2\n"
            f"{servers}\n"
        )
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def states(self) -> dict[str, str]:
        """Server name -> UP / DOWN / MAINT ... as HAProxy sees them."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        states = {}
        for line in data.decode().splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "mtop_servers" and fields[1].startswith("mtop"):
                states[fields[1]] = fields[17]
        return states

    def wait_states(self, wanted: dict[str, str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            try:
                states = self.states()
            except OSError:
                states = {}
            if all(states.get(name, "").startswith(state) for name, state in wanted.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"HAProxy's servers: {states}, wanted {wanted}")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")


@dataclass
class Result:
    user: str
    started: float
    ended: float
    ok: bool
    moved: int
    error: str = ""


class Load:
    """Worker threads opening tunnels through HAProxy one after another:
    each moves ``CHUNKS`` random chunks to the echo target and checks the
    echo's digest (about 1 s a tunnel)."""

    def __init__(self, port: int, ca: Path, target_port: int, workers: int = 6):
        self.port = port
        self.target_port = target_port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.set_alpn_protocols(["mtop"])
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(USERS[i % len(USERS)],), daemon=True) for i in range(workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, user) -> None:
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            result = self.tunnel(user)
            with self._lock:
                self.results.append(result)
            if not result.ok:
                time.sleep(0.05)

    def tunnel(self, user) -> Result:
        name, password = user
        started = time.monotonic()
        moved = 0
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(CLIENT_SOURCE, 0))
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                auth = wire.encode_auth(wire.AuthRequest(name, password, "127.0.0.1", self.target_port))
                tls.sendall(auth)
                reply = _read_exactly(tls, 2)
                if reply != wire.REPLY_SUCCESS:
                    return Result(name, started, time.monotonic(), False, 0, f"reply {reply!r}")
                sent, echoed = hashlib.sha256(), hashlib.sha256()
                for _ in range(CHUNKS):
                    chunk = os.urandom(CHUNK)
                    sent.update(chunk)
                    tls.sendall(chunk)
                    echoed.update(_read_exactly(tls, CHUNK))
                    moved += CHUNK
                    time.sleep(0.1)
                ok = sent.digest() == echoed.digest()
                return Result(name, started, time.monotonic(), ok, moved, "" if ok else "digest differs")
        except (OSError, ssl.SSLError, EOFError) as e:
            return Result(name, started, time.monotonic(), False, moved, f"{type(e).__name__}: {e}")

    def since(self, moment: float) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.started >= moment]


def _read_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def totals(dsn: str) -> dict[str, tuple[int, int]]:
    import psycopg2

    with psycopg2.connect(dsn.replace("postgres://", "postgresql://")) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT username, bytes_up, bytes_down FROM mtop_user")
        return {name: (up, down) for name, up, down in cursor.fetchall()}


def test_haproxy_cluster_drain_restart_and_kill_under_load(e2e_setup, tmp_path, cluster_dsn, make_target):
    backend_port, health_port = port_free_on_all(HOSTS), port_free_on_all(HOSTS)
    configs = cluster_configs(
        tmp_path, e2e_setup, backend_port,
        f"  proxy_protocol: true\n  drain_timeout: {DRAIN_TIMEOUT:g}\n"
        'health:\n  listen: "{host}:%d"\n' % health_port
        + f"db:\n  driverName: psql\n  dsn: '{cluster_dsn}'\n  flush_interval: 1\n  recheck_interval: 1\n",
    )
    run_ctl(configs[0], "db", "init")
    for name, password in USERS:
        run_ctl(configs[0], "user", "add", "-u", name, "--password-stdin", stdin=password + "\n")

    servers: list[ServerProcess] = []

    def start(i: int) -> ServerProcess:
        server = ServerProcess(f"mtop{i + 1}", configs[i], configs[i].parent)
        server._wait_ready = lambda: server.wait_for(rf"MTop TLS listening on {re.escape(HOSTS[i])}:", 20)
        _processes.append(server)
        servers.append(server)
        server.start()
        server.wait_for(r"Health check listening", 20)
        return server

    target = make_target(echo)
    haproxy = None
    load = None
    try:
        live = [start(i) for i in range(3)]
        haproxy = HAProxy(tmp_path, port_free_on_all(("127.0.0.1",)), backend_port, health_port)
        haproxy.wait_states({"mtop1": "UP", "mtop2": "UP", "mtop3": "UP"})
        load = Load(haproxy.port, e2e_setup.ca, target.port)
        load.start()
        time.sleep(3)
        warm = load.since(0)
        assert warm and all(r.ok for r in warm), [r.error for r in warm if not r.ok]

        # 1. A rolling restart of mtop2 under load: nothing fails.
        drained = live[1]
        mark = drained.mark()
        drain_started = time.monotonic()
        drained.proc.send_signal(signal.SIGTERM)
        draining = drained.wait_for(r"draining: accepting no new tunnels; (\d+) open", 10, since=mark)
        assert int(draining.group(1)) >= 1, drained.describe(mark)  # it had tunnels to let finish
        haproxy.wait_states({"mtop2": "DOWN"}, timeout=5)
        drained.wait_for(r"drained: every tunnel ended within", DRAIN_TIMEOUT + 5, since=mark)
        assert drained.proc.wait(15) in (0, -signal.SIGTERM), drained.describe(mark)
        time.sleep(1)
        during = [r for r in load.since(0) if r.ended >= drain_started]
        assert during and all(r.ok for r in during), [r.error for r in during if not r.ok]
        assert "tunnel shutdown" not in drained.log(mark), drained.describe(mark)

        # No accounting lost: stop the load, let the others flush, compare.
        load.stop()
        time.sleep(2.5)
        moved: dict[str, int] = {}
        for r in load.results:
            moved[r.user] = moved.get(r.user, 0) + r.moved
        counted = totals(cluster_dsn)
        assert {name: counted[name] for name in moved} == {name: (n, n) for name, n in moved.items()}

        # 2. mtop2 back: HAProxy gives it traffic again.
        restarted = start(1)
        mark = restarted.mark()
        haproxy.wait_states({"mtop2": "UP"})
        load = Load(haproxy.port, e2e_setup.ca, target.port)
        load.start()
        restarted.wait_for(r"tunnel \S+: client=127\.0\.0\.2:\d+ user=user\d", 15, since=mark)

        # 3. kill -9 of mtop3 under load: after a moment, every new tunnel works.
        time.sleep(1)
        killed_at = time.monotonic()
        live[2].proc.send_signal(signal.SIGKILL)
        live[2].proc.wait(10)
        time.sleep(4)
        load.stop()
        later = [r for r in load.results if r.started >= killed_at + 1.0]
        assert later and all(r.ok for r in later), [r.error for r in later if not r.ok]
        failed = [r for r in load.results if not r.ok]
        assert all(r.started < killed_at + 1.0 for r in failed)
        print(f"cluster: {len(load.results)} tunnels in the kill phase, {len(failed)} failed (begun before the kill + 1 s)")

        # The client's own address reached every server through the PROXY header.
        for server in (live[0], drained, restarted):
            assert re.search(r"tunnel \S+: client=127\.0\.0\.2:\d+ user=user\d", server.log()), server.describe()
        for server in servers:
            assert "Traceback" not in server.log(), server.describe()
    finally:
        if load is not None:
            load.stop()
        if haproxy is not None:
            haproxy.stop()
        for server in servers:
            server.stop()
            if server in _processes:
                _processes.remove(server)


def test_the_shipped_haproxy_config_is_valid():
    """etc/haproxy/mtop.cfg, as shipped, passes HAProxy's own check."""
    shipped = Path(__file__).resolve().parents[2] / "etc" / "haproxy" / "mtop.cfg"
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(shipped)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = shipped.read_text()
    for needed in ("send-proxy-v2", "check-send-proxy", "option redispatch", "option httpchk GET /health", "timeout client 330s"):
        assert needed in text


def start_cluster(configs, name: str, workers: int) -> list[ServerProcess]:
    servers = []
    for i, config in enumerate(configs):
        server = ServerProcess(f"{name}{i + 1}", config, config.parent)
        server._wait_ready = lambda server=server, i=i: server.wait_for(rf"MTop TLS listening on {re.escape(HOSTS[i])}:", 20)
        _processes.append(server)
        servers.append(server)
        server.start()
    if workers > 1:
        for server in servers:
            server.wait_for(r"worker 2 started", 20)
    return servers


def stop_cluster(servers) -> None:
    for server in servers:
        server.stop()
        if server in _processes:
            _processes.remove(server)


# A quota across servers


QUOTA = 48 << 20
PUSH_RATE = 4 << 20  # bytes per second, through each server


@pytest.fixture(params=["postgres", "mariadb"])
def shared_database(request):
    """(driverName, DSN) of a database of this test's own."""
    from helpers import fresh_mysql_database, fresh_postgres_database

    name = f"mtop_quota_{os.getpid()}_{secrets.token_hex(3)}"
    if request.param == "postgres":
        for dsn in fresh_postgres_database(name):
            yield "psql", dsn
    else:
        for dsn in fresh_mysql_database(name):
            yield "mysql", dsn


class Sink:
    """A target that counts what reaches it (what a user moved), and never
    answers."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn):
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(1 << 16):
                    with self._lock:
                        self.received += len(data)
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self.listener.close()


def push_until_refused(host: str, port: int, ca: Path, user, target_port: int, deadline: float) -> str:
    """Push at PUSH_RATE through the server at ``host``, tunnel after
    tunnel, until a login is refused (the quota is used up) or the
    deadline; how it ended."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["mtop"])
    chunk = os.urandom(64 << 10)
    while time.monotonic() < deadline:
        try:
            raw = socket.create_connection((host, port), timeout=10)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(wire.encode_auth(wire.AuthRequest(user[0], user[1], "127.0.0.1", target_port)))
                tls.settimeout(10)
                try:
                    reply = _read_exactly(tls, 2)
                except EOFError:
                    return "refused"  # closed without a reply: the login is refused
                assert reply == wire.REPLY_SUCCESS, reply
                started = time.monotonic()
                sent = 0
                while time.monotonic() < deadline:
                    tls.sendall(chunk)
                    sent += len(chunk)
                    ahead = sent / PUSH_RATE - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except (OSError, ssl.SSLError, EOFError):
            continue  # the tunnel was closed (over quota): log in again
    return "deadline"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_quota_holds_across_servers(e2e_setup, tmp_path, shared_database, workers):
    """One user with a 48 MiB quota pushes 4 MiB/s through each of three
    servers sharing one database (each with ``workers``): what reaches the
    target stays within the quota plus 5 % (the issue's bound; leases allow
    no overshoot beyond what is in flight), and the counters say so."""
    driver, dsn = shared_database
    port = port_free_on_all(HOSTS)
    configs = cluster_configs(
        tmp_path, e2e_setup, port,
        # By connection: tunnels of one client address spread over the
        # workers, which is what these limits must hold across.
        f"  workers: {workers}\n  worker_affinity: connection\n  auth_failure_delay: 0\n"
        f"db:\n  driverName: {driver}\n  dsn: '{dsn}'\n  flush_interval: 5\n  recheck_interval: 5\n  cache_ttl: 0\n",
    )
    run_ctl(configs[0], "db", "init")
    user = USERS[0]
    run_ctl(configs[0], "user", "add", "-u", user[0], "--password-stdin", stdin=user[1] + "\n")
    run_ctl(configs[0], "user", "set", "-u", user[0], "--quota", str(QUOTA))
    sink = Sink()
    servers = start_cluster(configs, "quota", workers)
    try:
        if workers > 1:
            time.sleep(0.5)
        deadline = time.monotonic() + 40
        ends: list[str] = []
        threads = [
            threading.Thread(
                target=lambda host=host: ends.append(push_until_refused(host, port, e2e_setup.ca, user, sink.port, deadline)),
                daemon=True,
            )
            for host in HOSTS
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert ends == ["refused"] * 3, ends
        time.sleep(1)
        moved = sink.received
        print(f"quota {QUOTA >> 20} MiB, {driver}, {len(HOSTS)} servers x {workers} workers: moved {moved / (1 << 20):.2f} MiB "
              f"({100 * (moved - QUOTA) / QUOTA:+.2f} %)")
        assert QUOTA * 0.95 <= moved <= QUOTA * 1.05, moved
        for server in servers:
            server.stop()
        for server in servers:
            assert "Traceback" not in server.log(), server.describe()
        counted = totals_of(driver, dsn)[user[0]]
        if counted[0] < moved:
            for server in servers:
                print(server.describe())
        # The counters hold what the relays moved (up; nothing came down).
        assert counted[0] >= moved and counted[0] <= QUOTA * 1.05, (counted, moved)
    finally:
        sink.close()
        stop_cluster(servers)


def totals_of(driver: str, dsn: str) -> dict[str, tuple[int, int]]:
    if driver == "psql":
        return totals(dsn)
    import pymysql

    from mtop.dsn import parse_mysql_dsn

    with pymysql.connect(**parse_mysql_dsn(dsn)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT username, bytes_up, bytes_down FROM mtop_user")
        return {name: (up, down) for name, up, down in cursor.fetchall()}


# max_connections and rate_limit across servers (mtop_presence)


def login(host: str, port: int, ca: Path, user, target_port: int):
    """A TLS socket whose tunnel is open, or ``None`` if the login was
    refused (closed without a reply)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["mtop"])
    tls = context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname="localhost")
    tls.settimeout(10)
    tls.sendall(wire.encode_auth(wire.AuthRequest(user[0], user[1], "127.0.0.1", target_port)))
    try:
        reply = _read_exactly(tls, 2)
    except (EOFError, OSError):
        tls.close()
        return None
    assert reply == wire.REPLY_SUCCESS, reply
    return tls


def alive(tls) -> bool:
    """Whether the tunnel still echoes."""
    try:
        tls.settimeout(5)
        tls.sendall(b"ping")
        return _read_exactly(tls, 4) == b"ping"
    except (EOFError, OSError):
        return False


def published_tunnels(dsn: str, username: str) -> int:
    """The tunnels ``mtop_presence`` holds for ``username`` (live rows)."""
    import psycopg2

    with psycopg2.connect(dsn.replace("postgres://", "postgresql://")) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT COALESCE(SUM(tunnels), 0) FROM mtop_presence WHERE username = %s"
            " AND expires_at > EXTRACT(EPOCH FROM now())",
            (username,),
        )
        return int(cursor.fetchone()[0])


def wait_published(dsn: str, username: str, tunnels: int, timeout: float = 15.0) -> None:
    """Wait until ``tunnels`` are published, then one interval more and
    some, so that every process has read them at its next publication
    (a process's view is up to two intervals old; a loaded machine makes
    an interval late, so the first one is observed, not assumed)."""
    deadline = time.monotonic() + timeout
    while published_tunnels(dsn, username) != tunnels:
        assert time.monotonic() < deadline, f"{tunnels} tunnels of {username} not published in {timeout:g} s"
        time.sleep(0.1)
    time.sleep(1.5)


def presence_configs(tmp_path, setup, driver: str, dsn: str, workers: int) -> list[Path]:
    return cluster_configs(
        tmp_path, setup, port_free_on_all(HOSTS),
        # By connection: tunnels of one client address spread over the
        # workers, which is what these limits must hold across.
        f"  workers: {workers}\n  worker_affinity: connection\n  auth_failure_delay: 0\n"
        f"db:\n  driverName: {driver}\n  dsn: '{dsn}'\n  presence_interval: 1\n  cache_ttl: 0\n",
    )


def test_max_connections_holds_across_servers(e2e_setup, tmp_path, cluster_dsn, make_target):
    """``max_connections: 2`` across three servers of two workers each (6
    processes): one at a time, the third login is refused wherever it
    lands; six at once, all may pass the race, and within two presence
    intervals only two are left."""
    configs = presence_configs(tmp_path, e2e_setup, "psql", cluster_dsn, 2)
    port = int(re.search(r":(\d+)\"", configs[0].read_text()).group(1))
    run_ctl(configs[0], "db", "init")
    user = USERS[0]
    run_ctl(configs[0], "user", "add", "-u", user[0], "--password-stdin", stdin=user[1] + "\n")
    run_ctl(configs[0], "user", "set", "-u", user[0], "--max-conns", "2")
    target = make_target(echo)
    servers = start_cluster(configs, "conns", 2)
    try:
        held = []
        for host in HOSTS[:2]:
            tls = login(host, port, e2e_setup.ca, user, target.port)
            assert tls is not None and alive(tls)
            held.append(tls)
            wait_published(cluster_dsn, user[0], len(held))
        for host in HOSTS:
            assert login(host, port, e2e_setup.ca, user, target.port) is None, f"a third tunnel through {host}"
        for tls in held:
            tls.close()
        wait_published(cluster_dsn, user[0], 0)
        burst = [login(host, port, e2e_setup.ca, user, target.port) for host in HOSTS for _ in range(2)]
        opened = [tls for tls in burst if tls is not None]
        began, left = time.monotonic(), opened
        while len(left) > 2 and time.monotonic() < began + 15:
            time.sleep(0.5)
            left = [tls for tls in left if alive(tls)]
        took = time.monotonic() - began
        time.sleep(2.5)  # and none more is cut once the excess is gone
        left = [tls for tls in left if alive(tls)]
        print(f"max_connections 2 across {len(HOSTS)} servers x 2 workers: {len(opened)} of 6 opened at once, "
              f"{len(left)} alive {took:.1f} s later and still 2.5 s after")
        assert len(opened) >= 2 and len(left) == 2, (len(opened), len(left))
        for tls in opened:
            tls.close()
        logs = "".join(server.log() for server in servers)
        assert "Traceback" not in logs
        if len(opened) > 2:
            assert "too many tunnels across servers (max_connections 2)" in logs
    finally:
        stop_cluster(servers)


RATE = 1 << 20


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rate_limit_holds_across_servers(e2e_setup, tmp_path, shared_database, workers):
    """``rate_limit: 1 MiB/s`` with the user pushing as fast as it can
    through each of three servers: over 10 s what reaches the target stays
    within 1.2 MiB/s (the issue's bound), and the user is not starved
    either (at least 0.7 MiB/s)."""
    driver, dsn = shared_database
    configs = presence_configs(tmp_path, e2e_setup, driver, dsn, workers)
    port = int(re.search(r":(\d+)\"", configs[0].read_text()).group(1))
    run_ctl(configs[0], "db", "init")
    user = USERS[0]
    run_ctl(configs[0], "user", "add", "-u", user[0], "--password-stdin", stdin=user[1] + "\n")
    run_ctl(configs[0], "user", "set", "-u", user[0], "--rate", str(RATE))
    sink = Sink()
    servers = start_cluster(configs, "rate", workers)
    stop = threading.Event()

    def push(host):
        chunk = os.urandom(64 << 10)
        while not stop.is_set():
            tls = login(host, port, e2e_setup.ca, user, sink.port)
            if tls is None:
                time.sleep(0.2)
                continue
            with tls:
                try:
                    while not stop.is_set():
                        tls.sendall(chunk)
                except OSError:
                    pass

    threads = [threading.Thread(target=push, args=(host,), daemon=True) for host in HOSTS for _ in range(workers)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)  # the burst of the first second, and every server has published
        start, received = time.monotonic(), sink.received
        time.sleep(10)
        rate = (sink.received - received) / (time.monotonic() - start)
        print(f"rate_limit 1 MiB/s, {driver}, {len(HOSTS)} servers x {workers} workers, pushing through all: "
              f"{rate / (1 << 20):.3f} MiB/s over 10 s")
        assert 0.7 * RATE <= rate <= 1.2 * RATE, rate / RATE
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        sink.close()
        stop_cluster(servers)
    for server in servers:
        assert "Traceback" not in server.log(), server.describe()
