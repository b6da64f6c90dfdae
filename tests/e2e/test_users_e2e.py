"""End to end with users in PostgreSQL and MariaDB: real ``twistd mtop``
processes, real databases (this session's throwaway ones), rows written by
plain SQL as any other program would, and a TLS client on the standard
library's ssl module.

What it shows: an operator's existing database (the original's table, a
legacy-hash row) works with no migration; rows inserted, disabled or deleted
take effect without a restart, and open tunnels of a disabled or deleted
user are closed; two servers sharing one database add their traffic up
exactly; limits (tunnels, rate, quota) hold; and through a real network
outage of the database, recently verified users keep working, traffic is
kept and written afterwards, nothing lost and nothing counted twice.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from conftest import TEST_POLICY, ServerProcess, _processes, run_ctl
from helpers import run_sql
from mtop import passwords, wire
from mtop.database import DBSettings
from peers import CuttableProxy, TargetServer

REPLY_OK = b"\x01\x00"

#: The original implementation's table, as its SQL creates it (types differ
#: from what 'mtopctl db init' writes; nothing else is there).
ORIGINAL_SQL = {
    "postgres": (
        "CREATE TABLE mtop_user (username varchar(255) NOT NULL, salt varchar(255) NOT NULL, "
        "password varchar(255) NOT NULL, created_time timestamptz DEFAULT now(), "
        "updated_time timestamptz DEFAULT now(), PRIMARY KEY (username))"
    ),
    "mysql": (
        "CREATE TABLE mtop_user (username varchar(255) NOT NULL, salt varchar(255) NOT NULL, "
        "password varchar(255) NOT NULL, created_time datetime DEFAULT CURRENT_TIMESTAMP, "
        "updated_time datetime DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (username)) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    ),
}
DRIVER_NAMES = {"postgres": "psql", "mysql": "mysql"}


sql = run_sql


def dsn_via(settings: DBSettings, port: int) -> str:
    """The same database reached through 127.0.0.1:``port``."""
    if settings.driver == "postgres":
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{port}/", settings.dsn)
    return re.sub(r"tcp\(127\.0\.0\.1:\d+\)", f"tcp(127.0.0.1:{port})", settings.dsn)


@pytest.fixture(params=["postgres", "mysql"])
def database(request) -> DBSettings:
    """This session's throwaway database with no tables in it."""
    settings = DBSettings(request.param, request.getfixturevalue(f"{request.param}_dsn"))
    for table in ("mtop_user", "mtop_usage_flush"):
        sql(settings, f"DROP TABLE IF EXISTS {table}")
    return settings


class Servers:
    """Starts ``twistd mtop`` processes on a database; all stop at the end."""

    def __init__(self, e2e_setup, directory: Path):
        self.setup = e2e_setup
        self.directory = directory
        self.started: list[ServerProcess] = []

    def config(self, settings: DBSettings, dsn: str | None = None, **db: object) -> Path:
        path = self.directory / f"mtop-{len(self.started)}-{time.monotonic_ns()}.yaml"
        certs = self.setup.dir / "certs"
        db_lines = "".join(f"  {key}: {value}\n" for key, value in db.items())
        path.write_text(
            "server:\n"
            '  listen: "127.0.0.1:0"\n'
            f"  crt: {certs / 'server.crt'}\n"
            f"  key: {certs / 'server.key'}\n"
            "  handshake_timeout: 5\n"
            "log:\n"
            "  level: debug\n"
            "db:\n"
            f"  driverName: {DRIVER_NAMES[settings.driver]}\n"
            f"  dsn: '{dsn or settings.dsn}'\n" + db_lines + TEST_POLICY
        )
        return path

    def start(self, settings: DBSettings, dsn: str | None = None, **db: object) -> ServerProcess:
        config = self.config(settings, dsn, **db)
        cwd = self.directory / f"cwd-{len(self.started)}"
        cwd.mkdir()
        process = ServerProcess(f"{settings.driver}-{len(self.started)}", config, cwd)
        self.started.append(process)
        _processes.append(process)
        process.start()
        return process

    def stop(self, process: ServerProcess) -> None:
        process.stop()
        if process in _processes:
            _processes.remove(process)

    def stop_all(self) -> None:
        for process in self.started:
            self.stop(process)


@pytest.fixture
def servers(e2e_setup, tmp_path):
    started = Servers(e2e_setup, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def echo_target():
    target = TargetServer(_echo)
    yield target
    target.close()


def _echo(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
        sock.sendall(chunk)
    return total


class Tunnel:
    """A blocking MTop client on the standard library's ssl module."""

    def __init__(self, server: ServerProcess, ca: Path, user: str, password: str, target_port: int):
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["mtop"])
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        request = wire.AuthRequest(user, password, "127.0.0.1", target_port, wire.address_type_for("127.0.0.1"))
        self.sock.sendall(wire.encode_auth(request))
        reply = b""
        while len(reply) < 2:
            chunk = self.sock.recv(2 - len(reply))
            if not chunk:
                break
            reply += chunk
        self.reply = reply

    @property
    def ok(self) -> bool:
        return self.reply == REPLY_OK

    def echo(self, size: int, chunk: int = 65536) -> int:
        """Send ``size`` bytes to the echo target and read them back."""
        payload = b"m" * chunk
        got = 0
        sent = 0
        while sent < size:
            piece = payload[: min(chunk, size - sent)]
            self.sock.sendall(piece)
            sent += len(piece)
            while got < sent:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError(f"tunnel closed after {got} of {size} bytes echoed")
                got += len(data)
        return got

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the tunnel within ``seconds``."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except (socket.timeout, TimeoutError):
                continue
            except (ssl.SSLError, OSError):
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tunnel_until(predicate_ok: bool, make, seconds: float) -> tuple[Tunnel, float]:
    """Open tunnels with ``make()`` until one's success is
    ``predicate_ok``; returns it and how long that took."""
    started = time.monotonic()
    while True:
        tunnel = make()
        if tunnel.ok == predicate_ok:
            return tunnel, time.monotonic() - started
        tunnel.close()
        if time.monotonic() - started > seconds:
            raise AssertionError(f"no tunnel {'opened' if predicate_ok else 'refused'} within {seconds:g}s")
        time.sleep(0.1)


def counters(settings: DBSettings, user: str) -> tuple[int, int]:
    row = sql(settings, "SELECT bytes_up, bytes_down FROM mtop_user WHERE username = ?", (user,))[0]
    return int(row[0]), int(row[1])


def add_user(settings: DBSettings, name: str, password: str, **policy: object) -> None:
    """Insert a row by plain SQL, the original's way (legacy hash)."""
    columns = ["username", "salt", "password", *policy]
    values = [name, "salt42", passwords.legacy_hash("salt42", password), *policy.values()]
    sql(settings, f"INSERT INTO mtop_user ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", tuple(values))


# ---------------------------------------------------------------------------


def test_original_database_works_unchanged_and_new_rows_are_seen(database, servers, e2e_setup, echo_target):
    sql(database, ORIGINAL_SQL[database.driver])
    add_user(database, "test111", "123456")
    server = servers.start(database)
    server.wait_for(r"policy columns: none", 10)
    tunnel = Tunnel(server, e2e_setup.ca, "test111", "123456", echo_target.port)
    assert tunnel.ok and tunnel.echo(100_000) == 100_000
    tunnel.close()
    assert not Tunnel(server, e2e_setup.ca, "test111", "wrong-Pw-9", echo_target.port).ok
    # A row inserted by another program while the server runs.
    add_user(database, "newbie", "Newbie-pw-1")
    tunnel, took = tunnel_until(True, lambda: Tunnel(server, e2e_setup.ca, "newbie", "Newbie-pw-1", echo_target.port), 5)
    assert tunnel.echo(1000) == 1000
    tunnel.close()


def test_disabling_and_deleting_cut_open_tunnels(database, servers, e2e_setup, echo_target):
    config = servers.config(database)
    run_ctl(config, "db", "init")
    add_user(database, "dora", "Dora-pw-2")
    add_user(database, "emil", "Emil-pw-3")
    server = servers.start(database)  # default bounds: 5 s
    dora = Tunnel(server, e2e_setup.ca, "dora", "Dora-pw-2", echo_target.port)
    emil = Tunnel(server, e2e_setup.ca, "emil", "Emil-pw-3", echo_target.port)
    assert dora.ok and emil.ok and dora.echo(1000) and emil.echo(1000)
    started = time.monotonic()
    sql(database, "UPDATE mtop_user SET enabled = ? WHERE username = ?", (False, "dora"))
    assert dora.closed_within(6.0), server.describe()
    assert emil.echo(1000) == 1000  # others are untouched
    run_ctl(config, "user", "del", "-u", "emil")
    assert emil.closed_within(6.0), server.describe()
    took = time.monotonic() - started
    server.wait_for(r"tunnel user-disabled: .* user=dora", 5)
    server.wait_for(r"tunnel user-deleted: .* user=emil", 5)
    assert not Tunnel(server, e2e_setup.ca, "dora", "Dora-pw-2", echo_target.port).ok
    if database.driver == "postgres":
        # NOTIFY makes it immediate rather than within the 5 s bound.
        assert took < 3.0, took


def test_two_servers_sharing_a_database_add_traffic_up(database, servers, e2e_setup, echo_target):
    config = servers.config(database)
    run_ctl(config, "db", "init")
    add_user(database, "fay", "Fay-pw-4")
    a = servers.start(database, flush_interval=1)
    b = servers.start(database, flush_interval=1)
    sizes = {a: [300_000, 70_001], b: [123_457, 2]}
    for server, amounts in sizes.items():
        for size in amounts:
            tunnel = Tunnel(server, e2e_setup.ca, "fay", "Fay-pw-4", echo_target.port)
            assert tunnel.ok and tunnel.echo(size) == size
            tunnel.close()
    # One tunnel still open when its server stops: the last flush counts it.
    last = Tunnel(server, e2e_setup.ca, "fay", "Fay-pw-4", echo_target.port)
    assert last.echo(5000) == 5000
    time.sleep(0.3)
    servers.stop(a)
    servers.stop(b)
    last.close()
    total = sum(sum(v) for v in sizes.values()) + 5000
    assert counters(database, "fay") == (total, total)
    seen = sql(database, "SELECT last_seen FROM mtop_user WHERE username = ?", ("fay",))[0][0]
    assert seen is not None


def test_limits_tunnels_rate_and_quota(database, servers, e2e_setup, echo_target):
    config = servers.config(database)
    run_ctl(config, "db", "init")
    add_user(database, "gus", "Gus-pw-5", max_connections=2, rate_limit=400_000)
    add_user(database, "hal", "Hal-pw-6", quota_bytes=2_000_000)
    server = servers.start(database, flush_interval=1, recheck_interval=1)
    first = Tunnel(server, e2e_setup.ca, "gus", "Gus-pw-5", echo_target.port)
    second = Tunnel(server, e2e_setup.ca, "gus", "Gus-pw-5", echo_target.port)
    third = Tunnel(server, e2e_setup.ca, "gus", "Gus-pw-5", echo_target.port)
    assert first.ok and second.ok and not third.ok
    server.wait_for(r"tunnel user-limit: .* user=gus .*max_connections 2", 5)
    # 400 kB/s each way for the user, shared by both tunnels: 1.6 MB echoed
    # in two tunnels at once needs about 4 s (the first burst is free).
    results = []
    started = time.monotonic()
    threads = [threading.Thread(target=lambda t=t: results.append(t.echo(800_000))) for t in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - started
    assert results == [800_000, 800_000]
    assert took >= 3.5, f"1.6 MB at 400 kB/s took only {took:.2f}s"
    first.close()
    second.close()
    # The quota: 2 MB up plus down; the tunnel is cut as soon as it is used
    # up, and new ones are refused.
    hal = Tunnel(server, e2e_setup.ca, "hal", "Hal-pw-6", echo_target.port)
    assert hal.ok
    with pytest.raises((ConnectionError, OSError, ssl.SSLError)):
        for _ in range(100):
            hal.echo(100_000)
            time.sleep(0.05)
    server.wait_for(r"tunnel over-quota: .* user=hal", 5)
    assert not Tunnel(server, e2e_setup.ca, "hal", "Hal-pw-6", echo_target.port).ok
    # Written by the next flush (every 1 s; later on a loaded machine).
    deadline = time.monotonic() + 15
    while sum(counters(database, "hal")) < 2_000_000 and time.monotonic() < deadline:
        time.sleep(0.2)
    up, down = counters(database, "hal")
    # Cut within a chunk or two (each way) of the quota.
    assert 2_000_000 <= up + down < 2_000_000 + 300_000


def test_database_outage_keeps_known_users_and_all_traffic(database, servers, e2e_setup, echo_target):
    config = servers.config(database)
    run_ctl(config, "db", "init")
    add_user(database, "ida", "Ida-pw-7")
    add_user(database, "jon", "Jon-pw-8")
    upstream = 5432 if database.driver == "postgres" else 3306
    proxy = CuttableProxy(upstream)
    try:
        server = servers.start(
            database, dsn_via(database, proxy.port), cache_ttl=1, flush_interval=1, outage_grace=60, query_timeout=2
        )
        if database.driver == "postgres":
            # Once it LISTENs, the server drops every cached login (changes
            # may have been missed before): the login kept for the outage
            # must come after that.
            server.wait_for(r"tells this server of row changes \(LISTEN mtop_user\)", 10)
        tunnel = Tunnel(server, e2e_setup.ca, "ida", "Ida-pw-7", echo_target.port)
        assert tunnel.ok and tunnel.echo(10_000) == 10_000
        time.sleep(1.5)
        assert counters(database, "ida") == (10_000, 10_000)

        proxy.cut()  # the database's network goes away
        assert tunnel.echo(20_000) == 20_000  # open tunnels go on
        time.sleep(1.5)  # past cache_ttl: logins need the database now
        again = Tunnel(server, e2e_setup.ca, "ida", "Ida-pw-7", echo_target.port)
        assert again.ok, "a user verified a moment ago must get in during the outage" + server.describe()
        assert again.echo(30_000) == 30_000
        again.close()
        assert not Tunnel(server, e2e_setup.ca, "jon", "Jon-pw-8", echo_target.port).ok
        assert not Tunnel(server, e2e_setup.ca, "ida", "wrong-Pw-0", echo_target.port).ok
        server.wait_for(r"cannot write traffic", 10)
        time.sleep(1.5)
        assert counters(database, "ida") == (10_000, 10_000)  # nothing written meanwhile

        proxy.restore()
        server.wait_for(r"traffic written again", 30)
        tunnel_jon, _ = tunnel_until(True, lambda: Tunnel(server, e2e_setup.ca, "jon", "Jon-pw-8", echo_target.port), 30)
        tunnel_jon.close()
        tunnel.close()
        time.sleep(2.5)
        assert counters(database, "ida") == (60_000, 60_000)
        assert "Traceback" not in server.log(), server.describe()
    finally:
        proxy.close()
