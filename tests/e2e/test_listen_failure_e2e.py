"""A listener that cannot listen, through real ``twistd`` processes: the
process ends with a non-zero exit status and one line naming the address
and the cause (no traceback, no advice about the database), for the
server's TLS and QUIC listeners, its metrics listener and climber's SOCKS5
proxy."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TWISTD, climber_server_entry, subprocess_env


def occupied(kind: int) -> tuple[socket.socket, int]:
    """A socket holding a port on 127.0.0.1 (TCP listening, or UDP bound)."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    return sock, sock.getsockname()[1]


def run(plugin: str, config: Path, *twistd_options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TWISTD, *twistd_options, "--nodaemon", "--pidfile=", plugin, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )


def server_config(setup, **server: object) -> dict:
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "crt": str(setup.dir / "certs" / "server.crt"),
            "key": str(setup.dir / "certs" / "server.key"),
            **server,
        },
        "log": {"level": "info"},
        "db": {"driverName": "sqlite", "dsn": str(setup.dir / "mtop.db")},
    }


def assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    said = [text for text in output.splitlines() if "cannot listen" in text]
    assert len(said) == 1 and said[0].endswith(line), output
    for unwanted in ("Traceback", "ReactorNotRunning", "mtopctl", "Unhandled"):
        assert unwanted not in output, output


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("kind,twistd_options,label", [
    ("tls", (), "MTop TLS"),
    ("quic", ("-r", "asyncio"), "MTop QUIC"),
])
def test_a_busy_server_port_stops_twistd_with_one_line(e2e_setup, tmp_path, kind, twistd_options, label):
    sock, port = occupied(socket.SOCK_DGRAM if kind == "quic" else socket.SOCK_STREAM)
    try:
        config = write(tmp_path, "mtop.yaml", server_config(e2e_setup, type=kind, listen=f"127.0.0.1:{port}"))
        result = run("mtop", config, *twistd_options)
    finally:
        sock.close()
    assert_one_line(result, f"{label} cannot listen on 127.0.0.1:{port}: address already in use")


def test_a_busy_metrics_port_stops_twistd_with_one_line(e2e_setup, tmp_path):
    sock, port = occupied(socket.SOCK_STREAM)
    try:
        data = server_config(e2e_setup)
        data["metrics"] = {"listen": f"127.0.0.1:{port}"}
        result = run("mtop", write(tmp_path, "mtop.yaml", data))
    finally:
        sock.close()
    assert_one_line(result, f"Prometheus metrics cannot listen on 127.0.0.1:{port}: address already in use")


def test_a_busy_socks5_port_stops_climber_with_one_line(e2e_setup, tmp_path):
    sock, port = occupied(socket.SOCK_STREAM)
    try:
        data = {
            "log": {"level": "info"},
            "socks5": {"listen": f"127.0.0.1:{port}"},
            # A server that is never reached: climber fails before it dials.
            "servers": [climber_server_entry(9, e2e_setup)],
        }
        result = run("climber", write(tmp_path, "climber.yaml", data))
    finally:
        sock.close()
    assert_one_line(result, f"SOCKS5 proxy cannot listen on 127.0.0.1:{port}: address already in use")
