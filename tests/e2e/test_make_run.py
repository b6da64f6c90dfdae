"""``make run`` from the checkout, stopped as an operator stops it.

Each test runs the real ``make run`` (the README's demo: web page, server
and climber, supervised by ``mtop.demo``) on free ports with its state in a
temporary directory, in a session of its own, as a terminal would run it.
It fetches the demo page through the SOCKS5 and the HTTP proxy, then stops
the demo: Ctrl-C (SIGINT to the whole foreground process group), SIGTERM to
make alone, or a child that cannot start.  Within `STOP_WITHIN` seconds
make must have exited, no process of the session may be left and every
port the demo used must be free again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The environment running the tests, handed to make as its VENV.
VENV = Path(sys.prefix)

#: make run's first start writes a certificate and a user (scrypt) first.
START_WITHIN = 60.0
STOP_WITHIN = 15.0
PAGE = b"<h1>Hello through MTop</h1>"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the session's processes in /proc")


@dataclass(frozen=True)
class Ports:
    server: int
    socks5: int
    http: int
    web: int

    def make_variables(self) -> list[str]:
        return [f"DEMO_PORT={self.server}", f"DEMO_SOCKS={self.socks5}", f"DEMO_HTTP={self.http}",
                f"DEMO_WEB={self.web}"]

    def tcp(self) -> tuple[int, ...]:
        return (self.server, self.socks5, self.http, self.web)


def _bindable(port: int, kind: int) -> bool:
    """Whether a server could bind ``port`` now.  On TCP with SO_REUSEADDR,
    as servers (Twisted's, http.server's) set it: the fetches leave
    connections in TIME_WAIT, which only a listener still there may not
    ignore."""
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports() -> Ports:
    """Four ports free on 127.0.0.1 (the server's on UDP too, for QUIC)."""
    for _ in range(20):
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(4)]
        try:
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            ports = Ports(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()
        if _bindable(ports.server, socket.SOCK_DGRAM):
            return ports
    raise AssertionError("no four free ports on 127.0.0.1")


def session_processes(sid: int) -> dict[int, str]:
    """The processes of session ``sid`` (pid: command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the command, which is in parentheses and may hold
            # spaces: state, ppid, pgrp, session, ...
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found[int(entry.name)] = cmdline
    return found


class MakeRun:
    """One ``make run`` in a session of its own; the output goes to a file."""

    def __init__(self, directory: Path, ports: Ports):
        self.ports = ports
        self.state = directory / "state"
        self.output_path = directory / "make-run.log"
        make = shutil.which("make")
        assert make, "make is not installed (apt-get install make)"
        for tool in ("twistd", "mtopctl"):
            assert (VENV / "bin" / tool).exists(), f"{VENV / 'bin' / tool} is missing: run make venv"
        env = dict(os.environ)
        # The working tree's code, as in the other end-to-end tests; and no
        # make settings (a jobserver) from a make running these tests.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MTOP_CONFIG"):
            env.pop(name, None)
        self._output = self.output_path.open("wb")
        self.process = subprocess.Popen(
            # -o: the tests' environment is used as it is, never reinstalled.
            [make, "--no-print-directory", "-o", f"{VENV}/.installed", "run", f"VENV={VENV}",
             f"STATE={self.state}", *ports.make_variables()],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            # As a shell runs a foreground job: a process group (here also a
            # session) of its own, which the test signals as a terminal does.
            start_new_session=True,
        )
        self.sid = self.process.pid

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"\n----- make run output -----\n{self.output()}----- end -----"

    def wait_until_serving(self) -> dict[int, str]:
        """Wait until the page comes through the SOCKS5 proxy; returns the
        session's processes then."""
        deadline = time.monotonic() + START_WITHIN
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"make run ended ({self.process.returncode})" + self.describe()
            try:
                assert PAGE in socks5_get(self.ports.socks5, self.ports.web)
                return session_processes(self.sid)
            except (OSError, AssertionError) as e:
                last_error = e
                time.sleep(0.3)
        raise AssertionError(f"the demo page did not come through SOCKS5 within {START_WITHIN:g}s: {last_error!r}"
                             + self.describe())

    def assert_all_gone(self, started: dict[int, str]) -> None:
        """make exits within `STOP_WITHIN`, and with it every process the
        run started; every port is free."""
        try:
            self.process.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"make still running {STOP_WITHIN:g}s after the signal; session: {session_processes(self.sid)}"
                + self.describe()
            ) from None
        deadline = time.monotonic() + 2.0
        while session_processes(self.sid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_processes(self.sid) == {}, "left running after make ended" + self.describe()
        with pytest.raises(ProcessLookupError):
            os.killpg(self.sid, 0)
        for pid in started:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        busy = [port for port in self.ports.tcp() if not _bindable(port, socket.SOCK_STREAM)]
        if not _bindable(self.ports.server, socket.SOCK_DGRAM):
            busy.append(f"udp/{self.ports.server}")
        assert busy == [], f"ports still bound after make ended: {busy}" + self.describe()

    def close(self) -> None:
        """Whatever happened in the test, leave nothing running."""
        for pid in session_processes(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self._output.close()


@pytest.fixture
def make_run(tmp_path):
    runs: list[MakeRun] = []

    def start(ports: Ports | None = None) -> MakeRun:
        run = MakeRun(tmp_path, ports or free_ports())
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


# Clients, standard library only


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def socks5_get(proxy_port: int, web_port: int) -> bytes:
    """GET / from 127.0.0.1:``web_port`` through the SOCKS5 proxy (no auth,
    CONNECT to an IPv4 address); the whole response."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert _recv_exactly(sock, 2) == b"\x05\x00", "SOCKS5 method not accepted"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", web_port))
        version, reply, _, atyp = _recv_exactly(sock, 4)
        assert (version, reply) == (5, 0), f"SOCKS5 CONNECT refused: reply {reply}"
        address_size = {1: 4, 4: 16}.get(atyp) or _recv_exactly(sock, 1)[0]
        _recv_exactly(sock, address_size + 2)
        sock.sendall(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{web_port}\r\n\r\n".encode())
        return _recv_to_eof(sock)


def http_proxy_get(proxy_port: int, web_port: int) -> bytes:
    """GET http://127.0.0.1:``web_port``/ through the HTTP proxy; the whole
    response."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        url = f"http://127.0.0.1:{web_port}/"
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{web_port}\r\nConnection: close\r\n\r\n".encode())
        return _recv_to_eof(sock)


def _demo_children(processes: dict[int, str]) -> dict[str, int]:
    children = {}
    for pid, cmdline in processes.items():
        for name, mark in (("web", "-m http.server"), ("server", " mtop --config"),
                           ("climber", " climber --config"), ("supervisor", "-m mtop.demo")):
            if mark in cmdline:
                children[name] = pid
    return children


# The tests


def _fetch_both_ways(run: MakeRun) -> dict[int, str]:
    started = run.wait_until_serving()
    assert PAGE in socks5_get(run.ports.socks5, run.ports.web)
    response = http_proxy_get(run.ports.http, run.ports.web)
    assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n", 1)[0], response[:200]
    assert PAGE in response
    children = _demo_children(started)
    assert set(children) == {"web", "server", "climber", "supervisor"}, started
    return started


def test_ctrl_c_stops_everything(make_run):
    """Ctrl-C: SIGINT to the whole foreground process group, once."""
    run = make_run()
    started = _fetch_both_ways(run)

    os.killpg(run.sid, signal.SIGINT)

    run.assert_all_gone(started)
    # make dies by the SIGINT itself (status 2 if it was started with SIGINT
    # ignored: it then reports the recipe's interruption).
    assert run.process.returncode in (-signal.SIGINT, 2), run.describe()
    output = run.output()
    assert "Interrupt" in output, run.describe()
    assert "make run:" not in output, "nothing should have ended by itself or been killed" + run.describe()
    assert "Stop with Ctrl-C." in output


def test_sigterm_to_make_stops_everything(make_run):
    """SIGTERM to make's pid alone (as a service manager or ``kill`` sends
    it): make passes it on to the recipe."""
    run = make_run()
    started = _fetch_both_ways(run)

    os.kill(run.process.pid, signal.SIGTERM)

    run.assert_all_gone(started)
    assert run.process.returncode == -signal.SIGTERM, run.describe()
    assert "make run:" not in run.output(), run.describe()


def test_a_child_that_ends_stops_the_others(make_run):
    """climber cannot bind its SOCKS5 port: the demo stops as a whole, with
    one line naming climber, and make fails."""
    ports = free_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", ports.socks5))
        blocker.listen(1)
        run = make_run(ports)
        try:
            run.process.wait(timeout=START_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError("make run kept running with climber's port taken" + run.describe()) from None
    output = run.output()
    assert "make run: climber (twistd climber) ended (" in output, run.describe()
    assert "stopping the demo." in output
    assert run.process.returncode == 2, run.describe()  # make: the recipe failed
    run.assert_all_gone({})


def test_a_child_that_ignores_the_signal_is_killed(tmp_path):
    """The supervisor's bound on stopping: a child that ignores SIGTERM is
    killed once the stop timeout has passed, with a line saying so."""
    ready = tmp_path / "ready"
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[1], 'w').close(); time.sleep(120)")
    supervisor = (
        "import sys\n"
        "from mtop.demo import Child, Supervisor\n"
        f"child = Child('stubborn', [sys.executable, '-c', {stubborn!r}, {str(ready)!r}])\n"
        "status = Supervisor([child], stop_timeout=1.0).run()\n"
        "sys.exit(128 - status if status < 0 else status)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    process = subprocess.Popen([sys.executable, "-c", supervisor], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline and process.poll() is None, "the stubborn child did not start"
            time.sleep(0.05)
        started = session_processes(process.pid)
        assert len(started) == 2, started

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=STOP_WITHIN)

        assert process.returncode == 128 + signal.SIGTERM, output
        assert b"make run: stubborn did not stop; killed." in output, output
        assert session_processes(process.pid) == {}
    finally:
        for pid in session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()
