"""Fixtures for the end-to-end tests: certificates, a SQLite user database,
and real ``twistd mtop`` server processes on 127.0.0.1.

Each server runs as a subprocess; its stdout and stderr are read by a
background thread so the log is always available, both to wait for lines and
to attach to failing tests.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: ``python -m twisted`` is the ``twist`` runner, which has no ``--nodaemon``
#: or ``--pidfile``; twistd proper has no ``__main__``, so run it this way.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

STARTUP_TIMEOUT = 20.0
HANDSHAKE_TIMEOUT = 1.0

LISTENING = re.compile(r"MTop TLS listening on 127\.0\.0\.1:(\d+)")


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
        "  dsn: mtop.db\n"
    )
    return path


class ServerProcess:
    """One ``twistd mtop`` subprocess and its captured log."""

    def __init__(self, name: str, config: Path, cwd: Path):
        self.name = name
        self.config = config
        self.cwd = cwd
        self.port: int | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    # Lifecycle

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "mtop", "--config", str(self.config)],
            cwd=self.cwd,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{self.name}", daemon=True)
        self._reader.start()
        match = self.wait_for(LISTENING, STARTUP_TIMEOUT, what="the listening line")
        self.port = int(match.group(1))

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
        return f"\n----- mtop server {self.name!r} ({state}) log -----\n{self.log(since)}----- end of log -----"

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


_servers: list[ServerProcess] = []


def _start(name: str, config: Path, cwd: Path):
    server = ServerProcess(name, config, cwd)
    _servers.append(server)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        _servers.remove(server)


@pytest.fixture(scope="session")
def server(e2e_setup, tmp_path_factory):
    """The server with the default config (no error replies), log.level debug."""
    yield from _start("default", e2e_setup.default_config, tmp_path_factory.mktemp("cwd-default"))


@pytest.fixture(scope="session")
def errors_server(e2e_setup, tmp_path_factory):
    """The same server with ``reply_errors: true``."""
    yield from _start("reply_errors", e2e_setup.errors_config, tmp_path_factory.mktemp("cwd-errors"))


@pytest.fixture(autouse=True)
def _log_marks(request):
    """Remember where each running server's log stood when the test began,
    so a failure report shows only that test's part."""
    request.node._mtop_marks = {id(s): s.mark() for s in _servers}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        marks = getattr(item, "_mtop_marks", {})
        for server in list(_servers):
            report.sections.append(
                (f"mtop server {server.name!r} log during this test", server.log(marks.get(id(server), 0)))
            )


class TargetServer:
    """A plain TCP server on 127.0.0.1 (port 0) that runs ``handler(sock)``
    in a thread per connection and queues what it returns (or raises)."""

    def __init__(self, handler):
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.results: queue.Queue = queue.Queue()
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, name=f"target-{self.port}", daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            self.results.put(self.handler(conn))
        except BaseException as e:  # reported by result()
            self.results.put(e)
        finally:
            conn.close()

    def result(self, timeout: float = 30.0):
        """What the handler of the next finished connection returned."""
        try:
            value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"target on port {self.port}: no connection finished within {timeout:g}s") from None
        if isinstance(value, BaseException):
            raise AssertionError(f"target handler failed: {value!r}") from value
        return value

    def close(self) -> None:
        self._stop.set()
        self._accept_thread.join(timeout=5)
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


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
