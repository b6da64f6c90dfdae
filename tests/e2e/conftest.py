"""Fixtures for the end-to-end tests: certificates, a SQLite user database,
real ``twistd mtop`` server processes and real ``twistd climber`` client
processes on 127.0.0.1.

Each process runs as a subprocess (`TwistdProcess`: `ServerProcess`,
`ClimberProcess`); its stdout and stderr are read by a background thread so
the log is always available, both to wait for lines and to attach to failing
tests (every running process's part of the log is attached).

Fixtures: ``e2e_setup`` (certificates, users, server configs); the servers
``server`` and ``errors_server``; the climbers ``climber`` and
``errors_climber`` (SOCKS5 and HTTP proxies through each server);
``make_climber`` / ``make_module_climber`` for climbers with other settings;
``make_target`` for plain TCP targets; ``run_twistd`` for a twistd run that is
expected to end by itself.  Every listener is on 127.0.0.1, port 0; the ports
bound are read from the processes' logs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from peers import TargetServer

ROOT = Path(__file__).resolve().parents[2]

#: ``python -m twisted`` is the ``twist`` runner, which has no ``--nodaemon``
#: or ``--pidfile``; twistd proper has no ``__main__``, so run it this way.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

STARTUP_TIMEOUT = 20.0
HANDSHAKE_TIMEOUT = 1.0

LISTENING = re.compile(r"MTop TLS listening on 127\.0\.0\.1:(\d+)")
CLIMBER_SOCKS5 = re.compile(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)")
CLIMBER_HTTP = re.compile(r"HTTP proxy listening on 127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class User:
    name: str
    password: str


# Distinctive passwords, so a search of the log cannot match by accident.
ALICE = User("alice", "Alice-pw-3f9c1e7a")
LEGACY = User("oldtimer", "Legacy-pw-82d04b5c")
LEGACY_SALT = "e2esalt123"
#: A password that is never stored; used for the bad-password attempts.
WRONG_PASSWORD = "Wrong-pw-c61a2d90"
PASSWORDS = (ALICE.password, LEGACY.password, WRONG_PASSWORD)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MTOP_CONFIG", None)
    return env


def run_ctl(config: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mtop.ctl", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 0, (
        f"mtopctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


#: What every test server's config adds: targets on loopback are allowed
#: (the default ACL refuses them), and the tests' deliberate failed logins
#: from 127.0.0.1 must not get it banned (the throttle has tests of its own).
TEST_POLICY = (
    "acl:\n"
    '  allow: ["127.0.0.0/8", "::1/128"]\n'
    "auth_throttle:\n"
    "  max_failures: 0\n"
)


def write_config(path: Path, *, reply_errors: bool, log_level: str) -> Path:
    path.write_text(
        "server:\n"
        "  type: tls\n"
        '  listen: "127.0.0.1:0"\n'
        "  crt: certs/server.crt\n"
        "  key: certs/server.key\n"
        "  proto: mtop\n"
        f"  handshake_timeout: {HANDSHAKE_TIMEOUT:g}\n"
        "  connect_timeout: 5\n"
        f"  reply_errors: {'true' if reply_errors else 'false'}\n"
        "log:\n"
        f"  level: {log_level}\n"
        "db:\n"
        "  driverName: sqlite\n"
        "  dsn: mtop.db\n" + TEST_POLICY
    )
    return path


class TwistdProcess:
    """One ``twistd --nodaemon <plugin>`` subprocess and its captured log.

    Subclasses name the plugin and say, in `_wait_ready`, which log lines
    mean the process is serving (and read the ports it bound from them)."""

    plugin = ""
    kind = "twistd"
    #: twistd options before the plugin name (``("-r", "asyncio")`` for QUIC).
    twistd_options: tuple[str, ...] = ()

    def __init__(self, name: str, config: Path, cwd: Path):
        self.name = name
        self.config = config
        self.cwd = cwd
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name!r}"

    # Lifecycle

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", *self.twistd_options, self.plugin,
             "--config", str(self.config)],
            cwd=self.cwd,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{self.plugin}-{self.name}", daemon=True)
        self._reader.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # Still draining its tunnels (server.drain_timeout): a second
                # SIGTERM closes them.
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    # The log

    def mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def log(self, since: int = 0) -> str:
        with self._cond:
            return "".join(self._lines[since:])

    def describe(self, since: int = 0) -> str:
        """The log for an assertion message."""
        state = "running" if self.proc is not None and self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"\n----- {self.label} ({state}) log -----\n{self.log(since)}----- end of log -----"

    def wait_for(self, pattern: re.Pattern | str, timeout: float, since: int = 0, what: str | None = None) -> re.Match:
        """Wait until a log line (from line ``since`` on) matches ``pattern``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._cond.wait(min(left, 0.5))
        raise AssertionError(
            f"no log line matching {regex.pattern!r} ({what or 'expected line'}) within {timeout:g}s"
            + self.describe(since)
        )


class ServerProcess(TwistdProcess):
    """One ``twistd mtop`` server; ``port`` is its TLS port once started."""

    plugin = "mtop"
    kind = "mtop server"

    def __init__(self, name: str, config: Path, cwd: Path):
        super().__init__(name, config, cwd)
        self.port: int | None = None

    def _wait_ready(self) -> None:
        match = self.wait_for(LISTENING, STARTUP_TIMEOUT, what="the listening line")
        self.port = int(match.group(1))


class ClimberProcess(TwistdProcess):
    """One ``twistd climber`` client.  Once started, ``socks5_port``,
    ``http_port`` and ``forward_ports`` (in the config's order) are the
    ports it bound, read from its log (configs listen on port 0)."""

    plugin = "climber"
    kind = "climber"

    def __init__(self, name: str, config: Path, cwd: Path):
        super().__init__(name, config, cwd)
        self.data = yaml.safe_load(config.read_text())
        self.socks5_port: int | None = None
        self.http_port: int | None = None
        self.forward_ports: list[int] = []

    def _wait_ready(self) -> None:
        if "socks5" in self.data:
            self.socks5_port = int(self.wait_for(CLIMBER_SOCKS5, STARTUP_TIMEOUT, what="the SOCKS5 line").group(1))
        if "http" in self.data:
            self.http_port = int(self.wait_for(CLIMBER_HTTP, STARTUP_TIMEOUT, what="the HTTP proxy line").group(1))
        # Listeners start in the config's order, so the lines come in it too.
        pattern = re.compile(r"forward to (\S+) listening on 127\.0\.0\.1:(\d+)")
        since = 0
        for item in self.data.get("forward") or []:
            match = self.wait_for(pattern, STARTUP_TIMEOUT, since=since, what=f"the line of forward {item}")
            assert match.group(1) == item["target"], f"forward lines out of order: {match.group(0)}" + self.describe()
            self.forward_ports.append(int(match.group(2)))
            since = self._line_index(match) + 1

    def _line_index(self, match: re.Match) -> int:
        with self._cond:
            for i, line in enumerate(self._lines):
                if match.string is line:
                    return i
        raise AssertionError("matched line not in the log")


@dataclass(frozen=True)
class Setup:
    dir: Path
    ca: Path
    default_config: Path
    errors_config: Path
    alice: User = ALICE
    legacy: User = LEGACY
    wrong_password: str = WRONG_PASSWORD
    passwords: tuple[str, ...] = PASSWORDS
    handshake_timeout: float = HANDSHAKE_TIMEOUT


@pytest.fixture(scope="session")
def e2e_setup(tmp_path_factory) -> Setup:
    from mtop.certs import init_certs

    base = tmp_path_factory.mktemp("mtop-e2e")
    paths = init_certs(str(base / "certs"), ["localhost"], ["127.0.0.1"])
    default_config = write_config(base / "mtop.yaml", reply_errors=False, log_level="debug")
    errors_config = write_config(base / "mtop-errors.yaml", reply_errors=True, log_level="info")
    run_ctl(default_config, "db", "init")
    run_ctl(default_config, "user", "add", "-u", ALICE.name, "--password-stdin", stdin=ALICE.password + "\n")
    run_ctl(
        default_config,
        "user", "add", "-u", LEGACY.name, "--password-stdin", "--legacy", "-s", LEGACY_SALT,
        stdin=LEGACY.password + "\n",
    )
    listing = run_ctl(default_config, "user", "list")
    assert re.search(rf"^{LEGACY.name}\s+legacy\b", listing, re.M), listing
    assert re.search(rf"^{ALICE.name}\s+scrypt\b", listing, re.M), listing
    return Setup(base, Path(paths.ca_crt), default_config, errors_config)


_processes: list[TwistdProcess] = []


def _start(process: TwistdProcess):
    _processes.append(process)
    try:
        process.start()
        yield process
    finally:
        process.stop()
        _processes.remove(process)


@pytest.fixture(scope="session")
def server(e2e_setup, tmp_path_factory):
    """The server with the default config (no error replies), log.level debug."""
    yield from _start(ServerProcess("default", e2e_setup.default_config, tmp_path_factory.mktemp("cwd-default")))


@pytest.fixture(scope="session")
def errors_server(e2e_setup, tmp_path_factory):
    """The same server with ``reply_errors: true``."""
    yield from _start(ServerProcess("reply_errors", e2e_setup.errors_config, tmp_path_factory.mktemp("cwd-errors")))


# ---------------------------------------------------------------------------
# climber


def climber_server_entry(server: "ServerProcess | int", setup: Setup, user: User = ALICE) -> dict[str, Any]:
    """A ``servers:`` item for ``server`` (or a bare port on 127.0.0.1)."""
    port = server if isinstance(server, int) else server.port
    return {
        "host": f"127.0.0.1:{port}",
        "type": "tls",
        "username": user.name,
        "password": user.password,
        "ca": str(setup.ca),
        "proto": "mtop",
    }


def write_climber_config(
    path: Path,
    setup: Setup,
    servers: list,
    *,
    socks5: bool | dict = True,
    http: bool | dict = True,
    forward: list[dict] | tuple = (),
    strategy: str | None = None,
    **extra: Any,
) -> Path:
    """A climber.yaml listening on port 0 with log level debug.  ``servers``
    holds `ServerProcess` objects, ports (a dead server, say) or ready
    ``servers:`` items; ``socks5``/``http`` are True, False or extra keys of
    that listener (``username``, ``password``, ...)."""
    data: dict[str, Any] = {"log": {"level": "debug"}}
    for key, value in (("socks5", socks5), ("http", http)):
        if value:
            data[key] = {"listen": "127.0.0.1:0", **(value if isinstance(value, dict) else {})}
    if forward:
        data["forward"] = list(forward)
    if strategy is not None:
        data["strategy"] = strategy
    data["servers"] = [item if isinstance(item, dict) else climber_server_entry(item, setup) for item in servers]
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class ClimberStarter:
    """``make_climber(servers, ...)`` (arguments as for
    `write_climber_config`) writes a config into the test's tmp dir and
    starts a `ClimberProcess`; all are stopped at the end of the test."""

    def __init__(self, setup: Setup, directory: Path):
        self.setup = setup
        self.directory = directory
        self.started: list[ClimberProcess] = []

    def __call__(self, servers: list, name: str = "climber", **kwargs: Any) -> ClimberProcess:
        cwd = self.directory / f"{name}-{len(self.started)}"
        cwd.mkdir()
        config = write_climber_config(cwd / "climber.yaml", self.setup, servers, **kwargs)
        process = ClimberProcess(name, config, cwd)
        self.started.append(process)
        _processes.append(process)
        process.start()
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()
            if process in _processes:
                _processes.remove(process)


@pytest.fixture
def make_climber(e2e_setup, tmp_path):
    """A `ClimberStarter` whose climbers live for one test."""
    starter = ClimberStarter(e2e_setup, tmp_path)
    try:
        yield starter
    finally:
        starter.stop_all()


@pytest.fixture(scope="module")
def make_module_climber(e2e_setup, tmp_path_factory):
    """A `ClimberStarter` whose climbers live until the module's tests end
    (for a module-scoped fixture shared by several tests)."""
    starter = ClimberStarter(e2e_setup, tmp_path_factory.mktemp("climbers"))
    try:
        yield starter
    finally:
        starter.stop_all()


def _session_climber(name: str, server: ServerProcess, setup: Setup, tmp_path_factory):
    cwd = tmp_path_factory.mktemp(f"climber-{name}")
    config = write_climber_config(cwd / "climber.yaml", setup, [server])
    yield from _start(ClimberProcess(name, config, cwd))


@pytest.fixture(scope="session")
def climber(server, e2e_setup, tmp_path_factory):
    """climber with SOCKS5 and HTTP proxies on port 0, through `server`."""
    yield from _session_climber("default", server, e2e_setup, tmp_path_factory)


@pytest.fixture(scope="session")
def errors_climber(errors_server, e2e_setup, tmp_path_factory):
    """climber with SOCKS5 and HTTP proxies through `errors_server` (whose
    refusals are explicit replies)."""
    yield from _session_climber("errors", errors_server, e2e_setup, tmp_path_factory)


@pytest.fixture
def run_twistd():
    """``run_twistd(plugin, config, cwd)`` runs ``twistd <plugin> --config``
    to its end (for configs that must be refused) and returns the
    `subprocess.CompletedProcess`, output as text."""

    def run(plugin: str, config: Path, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", plugin, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture(autouse=True)
def _log_marks(request):
    """Remember where each running process's log stood when the test began,
    so a failure report shows only that test's part."""
    request.node._mtop_marks = {id(p): p.mark() for p in _processes}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        marks = getattr(item, "_mtop_marks", {})
        for process in list(_processes):
            report.sections.append((f"{process.label} log during this test", process.log(marks.get(id(process), 0))))


@pytest.fixture
def make_target():
    """``make_target(handler)`` starts a `TargetServer`; all are closed at
    the end of the test."""
    targets: list[TargetServer] = []

    def make(handler) -> TargetServer:
        target = TargetServer(handler)
        targets.append(target)
        return target

    yield make
    for target in targets:
        target.close()
