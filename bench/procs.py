"""The processes a benchmark run starts, and their temporary configs.

`Workspace` is a temporary directory with certificates (``mtopctl cert
init``: ECDSA P-256, as users get them), a SQLite user database (``mtopctl
db init`` and ``user add``) and the configs.  `Process` is one subprocess
whose output goes to a log file in the workspace; `start_mtop`,
`start_climber`, `start_origin` and `start_relay` wait until it serves.
`Processes` stops everything it started, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

#: The environment variable that sets climber's ``prewarm`` for TLS runs
#: (e.g. ``BENCH_PREWARM=0`` to measure without prewarmed connections).
PREWARM_VARIABLE = "BENCH_PREWARM"

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
USER = "bench"

MTOP_TLS = re.compile(r"MTop TLS listening on 127\.0\.0\.1:(\d+)")
MTOP_QUIC = re.compile(r"MTop QUIC listening on 127\.0\.0\.1:(\d+)")
MTOP_WSS = re.compile(r"MTop WebSocket \(wss\) listening on 127\.0\.0\.1:(\d+)")
#: The path of the benchmark's wss listener.
WSS_PATH = "/bench"
CLIMBER_SOCKS5 = re.compile(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)")
CLIMBER_HTTP = re.compile(r"HTTP proxy listening on 127\.0\.0\.1:(\d+)")


def raise_nofile_limit() -> int:
    """Raise our RLIMIT_NOFILE soft limit to the hard limit (the processes
    we start inherit it): 2,000 idle tunnels are 4,000 descriptors in each
    of mtop and climber.  Returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environment.get("PYTHONPATH", "")) if p)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.pop("MTOP_CONFIG", None)
    environment.pop("CLIMBER_CONFIG", None)
    return environment


def twistd_command() -> list[str]:
    """The venv's ``twistd`` next to our interpreter, else twistd's entry
    point run by it."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def free_port_both() -> int:
    """A port number free on 127.0.0.1 for both TCP and UDP (TLS and QUIC
    listen on the same number)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


class Process:
    """One subprocess, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_path: Path, stdin: Any = subprocess.DEVNULL):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env(), stdin=stdin, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern, timeout: float = STARTUP_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before serving:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout:g}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def first_line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The first line of output (origin and relay print their ports)."""
        match = self.wait_for(re.compile(r"^(\{.*\})\s*$", re.M), timeout)
        return match.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._log.close()


class Processes:
    """Everything a run started; `stop_all` (also on Ctrl-C, via the
    caller's ``finally``) stops them in reverse order."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def add(self, process: Process) -> Process:
        self.started.append(process)
        return process

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        while self.started:
            process = self.started.pop()
            try:
                process.stop()
            except Exception as e:  # keep stopping the others
                print(f"bench: stopping {process.name}: {e}", file=sys.stderr)


class Workspace:
    """The temporary directory of one run: certificates, user database,
    configs, logs.  Removed by `cleanup` unless ``keep``."""

    def __init__(self, keep: bool = False, quic_packet_size: int = 1350, workers: int = 1, quic_backend: str = "auto"):
        self.dir = Path(tempfile.mkdtemp(prefix="mtop-bench-"))
        self.keep = keep
        self.quic_packet_size = quic_packet_size
        self.quic_backend = quic_backend
        self.workers = workers
        self.password = secrets.token_urlsafe(16)
        self._serial = 0

    def cleanup(self) -> None:
        if self.keep:
            print(f"bench: workspace kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "mtop.ctl", *args],
            input=stdin, capture_output=True, text=True, cwd=self.dir, env=env(), timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mtopctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def prepare(self) -> None:
        """Certificates, the database and its user."""
        self.ctl("cert", "init", "--host", "localhost", "--ip", "127.0.0.1", "--dir", str(self.dir / "certs"))
        config = self.mtop_config(0)  # for mtopctl's db access only
        self.ctl("-c", str(config), "db", "init")
        self.ctl("-c", str(config), "user", "add", "-u", USER, "--password-stdin", stdin=self.password + "\n")

    def _name(self, stem: str) -> Path:
        self._serial += 1
        return self.dir / f"{stem}-{self._serial}"

    def mtop_config(self, port: int, transport: str = "tls") -> Path:
        data = {
            "server": {
                "type": transport,
                "listen": f"127.0.0.1:{port}",
                "crt": "certs/server.crt",
                "key": "certs/server.key",
                "proto": "mtop",
                "quic_packet_size": self.quic_packet_size,
                "idle_timeout": "10m",
                "workers": self.workers,
            },
            "log": {"level": "info"},
            "quic": {"backend": self.quic_backend},
            "db": {"driverName": "sqlite", "dsn": "mtop.db"},
            # The destination ACL refuses loopback targets by default; the
            # origin is on loopback.
            "acl": {"allow": ["127.0.0.0/8", "::1/128"]},
            # Limits out of the way (0: none).
            "limits": {"max_tunnels": 0, "max_per_client": 0, "max_handshakes": 0},
        }
        if transport == "wss":
            data["server"]["path"] = WSS_PATH
        path = self.dir / "mtop.yaml" if port == 0 else self._name("mtop").with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def climber_config(self, port: int, transport: str) -> Path:
        entry = {
            "host": f"127.0.0.1:{port}",
            "type": transport,
            "username": USER,
            "password": self.password,
            "ca": str(self.dir / "certs" / "ca.crt"),
            "proto": "mtop",
        }
        if transport == "quic":
            entry["quic_packet_size"] = self.quic_packet_size
        elif transport == "wss":
            entry["path"] = WSS_PATH
            del entry["proto"]
        elif PREWARM_VARIABLE in os.environ:
            # climber's prewarmed connections per TLS server (its default when unset).
            entry["prewarm"] = int(os.environ[PREWARM_VARIABLE])
        data = {
            "log": {"level": "info"},
            "quic": {"backend": self.quic_backend},
            "socks5": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
            "idle_timeout": 600,
            "servers": [entry],
        }
        path = self._name(f"climber-{transport}").with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


class Mtop:
    """A running ``twistd mtop`` serving one transport on ``port``."""

    def __init__(self, process: Process, port: int):
        self.process = process
        self.port = port


class Climber:
    """A running ``twistd climber`` with its proxy ports."""

    def __init__(self, process: Process, socks5: int, http: int):
        self.process = process
        self.socks5 = socks5
        self.http = http


def start_mtop(processes: Processes, ws: Workspace, transport: str = "tls") -> Mtop:
    """``twistd mtop`` serving ``transport``, without ``-r``: TLS runs on
    twistd's default reactor, QUIC on the asyncio one mtop installs."""
    port = free_port_both()
    config = ws.mtop_config(port, transport)
    process = processes.add(
        Process(
            f"mtop ({transport})",
            [*twistd_command(), "--nodaemon", "--pidfile=", "mtop", "--config", str(config)],
            ws.dir, config.with_suffix(".log"),
        )
    )
    process.wait_for({"tls": MTOP_TLS, "quic": MTOP_QUIC, "wss": MTOP_WSS}[transport])
    return Mtop(process, port)


def start_climber(processes: Processes, ws: Workspace, mtop: Mtop, transport: str) -> Climber:
    config = ws.climber_config(mtop.port, transport)
    process = processes.add(
        Process(
            f"climber ({transport})",
            [*twistd_command(), "--nodaemon", "--pidfile=", "climber", "--config", str(config)],
            ws.dir, config.with_suffix(".log"),
        )
    )
    socks5 = int(process.wait_for(CLIMBER_SOCKS5).group(1))
    http = int(process.wait_for(CLIMBER_HTTP).group(1))
    return Climber(process, socks5, http)


def start_origin(processes: Processes, ws: Workspace) -> tuple[Process, dict[str, int]]:
    process = processes.add(
        Process("origin", [sys.executable, "-m", "bench.origin"], ROOT, ws.dir / "origin.log", stdin=subprocess.PIPE)
    )
    return process, json.loads(process.first_line())


def start_relay(processes: Processes, ws: Workspace) -> tuple[Process, int]:
    process = processes.add(Process("relay", [sys.executable, "-m", "bench.relay"], ROOT, ws.dir / "relay.log"))
    return process, json.loads(process.first_line())["port"]
