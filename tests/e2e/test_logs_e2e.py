"""``log.format: json`` and ``log.level`` through real ``twistd mtop`` and
``twistd climber`` processes: every line is one JSON object, twistd's own
lines included, and a tunnel's line carries its fields.  Usernames and
targets with line breaks and terminal escapes cannot forge lines, in the
text log or the JSON one."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import unicodedata

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
    # climber's prewarmed connections (``prewarm``) end unused when it
    # stops: lines without a user, which this tunnel's is not.
    tunnels = [r for r in server_records if r.get("tunnel_event") and r.get("user") is not None]
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


# Logs that cannot be forged

FORGED = "FORGED-LINE-1"
#: Usernames a client may send (all unknown to the server: refused).
NASTY_USERS = [
    f"x\n{FORGED} tunnel done: user=admin",
    f"x\r{FORGED}",
    "\x1b[31mred\x1b[0m",
    "nul\x00user",
    'say "hi" target=1.2.3.4:80',
    f"ls\u2028{FORGED}",
    f"nel\x85{FORGED}",
    "\u202egnp.exe",
]
#: Targets for alice (logged in; the name is then refused by the dialer).
NASTY_TARGETS = [f"x\n{FORGED}.invalid", f"\x1b[2J{FORGED}.invalid"]
BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def raw_auth(user: bytes, host: bytes, password: bytes) -> bytes:
    """An auth message built by hand (`mtop.wire.encode_auth` refuses
    bytes that are not UTF-8)."""
    return (
        b"\x01\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
        + b"\x03" + bytes([len(host)]) + host + (80).to_bytes(2, "big")
    )


def nasty_messages(setup) -> list[bytes]:
    alice, pw = setup.alice.name.encode(), setup.alice.password.encode()
    messages = [raw_auth(user.encode(), b"example.com", b"pw") for user in NASTY_USERS]
    messages += [raw_auth(alice, host.encode(), pw) for host in NASTY_TARGETS]
    # Not UTF-8: the wire decoder refuses them (bad-request).
    messages.append(raw_auth(b"bad\xff\n" + FORGED.encode(), b"example.com", b"pw"))
    messages.append(raw_auth(b"nobody", b"h\xff\n" + FORGED.encode(), b"pw"))
    return messages


def send_auth(setup, port: int, message: bytes) -> None:
    context = ssl.create_default_context(cafile=str(setup.ca))
    context.set_alpn_protocols(["mtop"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(message)
            try:
                while tls.recv(65536):
                    pass
            except (ConnectionResetError, ssl.SSLError):
                pass


def wait_for_outcomes(process, pattern: str, count: int, since: int) -> None:
    deadline = time.monotonic() + 20
    while len(re.findall(pattern, process.log(since))) < count:
        assert time.monotonic() < deadline, f"{count} outcome lines expected" + process.describe(since)
        time.sleep(0.1)


def assert_clean(text: str, process) -> None:
    """Each line of the log: no control character but its end, no line or
    paragraph separator, no bidi control; no line starts with the forgery
    (`str.splitlines` breaks at every line break Unicode knows)."""
    for line in text.split("\n"):
        bad = [c for c in line if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") or c in BIDI]
        assert not bad, f"{bad} in {line!r}" + process.describe()
    for line in text.splitlines():
        assert not line.lstrip().startswith(FORGED), process.describe()


def test_text_log_lines_cannot_be_forged(server, e2e_setup):
    since = server.mark()
    messages = nasty_messages(e2e_setup)
    for message in messages:
        send_auth(e2e_setup, server.port, message)
    wait_for_outcomes(server, r"\] tunnel \S+: ", len(messages), since)
    text = server.log(since)
    assert_clean(text, server)
    lines = [line for line in text.splitlines() if "] tunnel " in line]
    assert len(lines) == len(messages), server.describe(since)
    assert f' user="x\\x0a{FORGED} tunnel done: user=admin" target=example.com:80 ' in text
    assert ' user="say \\"hi\\" target=1.2.3.4:80" target=example.com:80 ' in text
    assert f' user=alice target="\\x1b[2J{FORGED}.invalid:80" ' in text
    assert "tunnel bad-request: " in text and "(username is not valid UTF-8)" in text
    assert "(domain name is not valid UTF-8)" in text


def test_json_log_keeps_raw_values_on_one_line(e2e_setup, tmp_path):
    (tmp_path / "server").mkdir()
    starting = _start(ServerProcess("json-nasty", json_config(e2e_setup, "json-nasty", "debug"), tmp_path / "server"))
    server = next(starting)
    try:
        messages = nasty_messages(e2e_setup)
        for message in messages:
            send_auth(e2e_setup, server.port, message)
        wait_for_outcomes(server, r'"tunnel_event":true', len(messages), 0)
    finally:
        next(starting, None)
    assert_clean(server.log(), server)
    tunnels = [r for r in records(server) if r.get("tunnel_event")]
    assert len(tunnels) == len(messages), server.describe()
    assert sorted(r["user"] for r in tunnels if r["outcome"] == "auth-failed") == sorted(NASTY_USERS)
    assert sorted(r["target"] for r in tunnels if r["user"] == e2e_setup.alice.name) == sorted(
        f"{host}:80" for host in NASTY_TARGETS
    )
    forged = next(r for r in tunnels if r["user"] == NASTY_USERS[0])
    assert forged["message"].startswith(f'tunnel auth-failed: client={forged["client"]} user="x\\x0a{FORGED} ')
    assert [r["detail"] for r in tunnels if r["outcome"] == "bad-request"] == [
        "username is not valid UTF-8",
        "domain name is not valid UTF-8",
    ]
