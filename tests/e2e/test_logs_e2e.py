"""``log.format: json`` and ``log.level`` through real ``twistd mtop`` and
``twistd climber`` processes: every line is one JSON object, twistd's own
lines included, and a tunnel's line carries its fields."""

from __future__ import annotations

import json
import socket
import time

from conftest import ServerProcess, _start, write_config
from peers import closed_port, echo


def json_config(setup, name: str, level: str, port: int = 0):
    path = write_config(setup.dir / f"mtop-{name}.yaml", reply_errors=False, log_level=level)
    text = path.read_text().replace("log:\n", "log:\n  format: json\n").replace("127.0.0.1:0", f"127.0.0.1:{port}")
    path.write_text(text)
    return path


def records(process) -> list[dict]:
    """The process's whole log, each line parsed (all must be JSON)."""
    lines = [line for line in process.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}" + process.describe()) from None
    assert parsed, process.describe()
    return parsed


def tunnel_through(socks5_port: int, target_port: int, payload: bytes = b"ping") -> None:
    with socket.create_connection(("127.0.0.1", socks5_port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target_port.to_bytes(2, "big"))
        reply = b""
        while len(reply) < 10:
            reply += sock.recv(10 - len(reply))
        assert reply[:2] == b"\x05\x00", reply
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := sock.recv(65536):
            echoed += chunk
        assert echoed == payload


def test_json_lines_from_server_and_climber(e2e_setup, tmp_path, make_climber, make_target):
    (tmp_path / "server").mkdir()
    starting = _start(ServerProcess("json", json_config(e2e_setup, "json", "info"), tmp_path / "server"))
    server = next(starting)
    try:
        climber = make_climber([server], http=False, log={"level": "info", "format": "json"})
        target = make_target(echo)
        tunnel_through(climber.socks5_port, target.port)
        server.wait_for(r'"outcome":', 10, what="the tunnel's JSON line")
        climber.wait_for(r'"outcome":', 10, what="the tunnel's JSON line")
    finally:
        next(starting, None)

    server_records = records(server)
    tunnels = [r for r in server_records if r.get("tunnel_event")]
    assert len(tunnels) == 1, server.describe()
    tunnel = tunnels[0]
    assert tunnel["outcome"] == "done"
    assert tunnel["user"] == e2e_setup.alice.name
    assert tunnel["target"] == f"127.0.0.1:{target.port}"
    assert (tunnel["bytes_up"], tunnel["bytes_down"]) == (4, 4)
    assert isinstance(tunnel["duration"], float) and tunnel["client"].startswith("127.0.0.1:")
    assert tunnel["level"] == "info" and tunnel["namespace"].startswith("mtop.server")
    assert tunnel["message"].startswith(f"tunnel done: client={tunnel['client']} user=alice ")
    assert not [k for r in server_records for k in r if k.startswith("log_")]
    # twistd's own lines are JSON too.
    assert any("starting up" in r["message"] and r["namespace"].startswith("twisted") for r in server_records)
    assert any(r["message"] == "Server Shut Down." for r in server_records)
    assert e2e_setup.alice.password not in server.log()

    client_tunnels = [r for r in records(climber) if r.get("tunnel_event")]
    assert [(r["kind"], r["outcome"], r["server"], r["bytes_up"]) for r in client_tunnels] == [
        ("socks5", "done", f"127.0.0.1:{server.port}", 4)
    ], climber.describe()


def test_json_lines_obey_log_level(e2e_setup, tmp_path, make_climber, make_target):
    """At ``warn`` the server's info events (listening, tunnels) are left
    out; what is written is still JSON."""
    port = closed_port()
    (tmp_path / "server").mkdir()
    process = ServerProcess("json-warn", json_config(e2e_setup, "json-warn", "warn", port), tmp_path / "server")
    # Its "listening" line is info: wait for twistd's own line instead.
    process._wait_ready = lambda: process.wait_for(r"reactor class", 20, what="twistd's start")
    starting = _start(process)
    next(starting)
    try:
        climber = make_climber([port], http=False)
        target = make_target(echo)
        for attempt in range(50):  # the port is bound just after twistd's line
            try:
                tunnel_through(climber.socks5_port, target.port)
                break
            except AssertionError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        climber.wait_for(r"socks5 tunnel done", 10, what="the tunnel's line")
    finally:
        next(starting, None)
    server_records = records(process)
    assert not [r for r in server_records if r.get("tunnel_event") or "listening" in r["message"]], process.describe()
    assert not [r for r in server_records if r["namespace"].startswith("mtop") and r["level"] in ("debug", "info")]
    assert any(r["message"] == "Server Shut Down." for r in server_records)
