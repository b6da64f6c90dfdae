"""Passwords never reach any output: a full session at log level debug, and
the start-up warnings for secrets others can read.

The session: ``twistd mtop`` on PostgreSQL with a password in its DSN (the
local server trusts loopback, so the password is accepted and ignored),
``mtopctl`` adding the user from stdin, making its link and checking it,
climber with password-protected SOCKS5 and HTTP proxies tunnelling through
it, plus every failed login (wrong MTop password directly and through a
second climber, wrong local proxy passwords, mtopctl check with a wrong
link).  Then every byte the processes wrote (stdout, stderr, any log file)
is searched for each password, raw and in the hex and base64 forms it
travels in (the RFC 1929 and Basic ``user:password`` encodings included).
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ClimberProcess, ServerProcess, _processes, subprocess_env
from climber import socks5_codec as socks
from mtop import wire
from mtop.certs import init_certs
from peers import TargetServer

WARNING = "is readable by every user of this machine"


def _echo(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
        sock.sendall(chunk)
    return total


def _http_origin(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    return head


def leaked_forms(secret: str, user: str | None = None) -> dict[str, str]:
    """The ways ``secret`` could show up in a log: raw, percent-encoded, hex
    (lower and upper case) and base64 at each of the three alignments it can
    have inside longer data, alone and as ``user:secret``."""
    raw = secret.encode()
    forms = {"raw": secret, "hex": raw.hex(), "HEX": raw.hex().upper()}
    payloads = {"secret": raw}
    if user is not None:
        payloads["user:secret"] = f"{user}:{secret}".encode()
        forms["basic"] = base64.b64encode(payloads["user:secret"]).decode()
    for name, payload in payloads.items():
        for shift in range(3):
            encoded = base64.b64encode(bytes(shift) + payload).decode().rstrip("=")
            # The characters that depend only on the payload's bytes.
            inner = encoded[4 if shift else 0 : len(encoded) - 3]
            if len(inner) >= 8:
                forms[f"base64 {name} +{shift}"] = inner
                forms[f"urlsafe base64 {name} +{shift}"] = inner.replace("+", "-").replace("/", "_")
    return forms


class Outputs:
    """Everything the processes of the session wrote, by source."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, name: str, text: str) -> None:
        self.texts[f"{len(self.texts)}: {name}"] = text

    def check(self, secrets_by_name: dict[str, tuple[str, str | None]]) -> None:
        problems = []
        for what, (secret, user) in secrets_by_name.items():
            for form, needle in leaked_forms(secret, user).items():
                for source, text in self.texts.items():
                    if needle in text:
                        at = text.index(needle)
                        problems.append(f"{what} ({form}) in {source}: ...{text[max(0, at - 80) : at + 80]!r}...")
        assert not problems, "passwords in the output:\n" + "\n".join(problems)


def ctl(outputs: Outputs, config: Path, *args: str, stdin: str | None = None, ok: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mtop.ctl", "-c", str(config), *args],
        input=stdin, capture_output=True, text=True, cwd=config.parent, env=subprocess_env(), timeout=60,
    )
    outputs.add(f"mtopctl {args[0]} {args[1] if len(args) > 1 else ''} stderr", result.stderr)
    if args[0] != "url":  # the link, its product, is checked separately
        outputs.add(f"mtopctl {' '.join(a for a in args if not a.startswith('mtop://'))} stdout", result.stdout)
    assert (result.returncode == 0) == ok, f"mtopctl {args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _start(process):
    _processes.append(process)
    process.start()
    return process


def _stop(process, outputs: Outputs) -> None:
    process.stop()
    if process in _processes:
        _processes.remove(process)
    outputs.add(process.label, process.log())


def _socks5_connect(port: int, user: str, password: str, target_port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT with RFC 1929 auth; returns the socket and the reply
    code (-1: the password was refused)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(socks.encode_greeting([socks.METHOD_USERPASS]))
    assert sock.recv(2) == socks.encode_method_choice(socks.METHOD_USERPASS)
    sock.sendall(socks.encode_userpass(user, password))
    status = sock.recv(2)
    if status != socks.encode_userpass_status(True):
        return sock, -1
    sock.sendall(socks.encode_request(socks.CMD_CONNECT, "127.0.0.1", target_port))
    buf = b""
    while (parsed := socks.parse_reply(buf)) is None:
        chunk = sock.recv(512)
        if not chunk:
            return sock, -2
        buf += chunk
    return sock, parsed[0]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def _http(port: int, request: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _private(path: Path) -> Path:
    os.chmod(path, 0o600)
    return path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _server_config(path: Path, certs, dsn: str, log_format: str = "text") -> Path:
    path.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0", "crt": certs.server_crt, "key": certs.server_key, "handshake_timeout": 5},
        "log": {"level": "debug", "format": log_format},
        "db": {"driverName": "psql", "dsn": dsn, "cache_ttl": 0},
        # As every e2e server (conftest.TEST_POLICY): loopback targets are
        # allowed, and the deliberate failed logins do not ban 127.0.0.1.
        "acl": {"allow": ["127.0.0.0/8", "::1/128"]},
        "auth_throttle": {"max_failures": 0},
    }))
    return path


@pytest.fixture
def secrets_dir(tmp_path, postgres_dsn):
    certs = init_certs(str(tmp_path / "certs"), ["localhost"], ["127.0.0.1"])
    return tmp_path, certs, postgres_dsn


# JSON logs carry every field of every event, not only the message.
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_password_reaches_any_output_at_debug_level(secrets_dir, log_format):
    base, certs, plain_dsn = secrets_dir
    user = "sec" + secrets.token_hex(4)
    user_pw = "Upw-" + secrets.token_hex(10)
    wrong_pw = "Wpw-" + secrets.token_hex(10)
    local_user, local_pw = "local", "Lpw-" + secrets.token_hex(10)
    wrong_local_pw = "Xpw-" + secrets.token_hex(10)
    db_pw = "Dpw-" + secrets.token_hex(10)
    dsn = plain_dsn.replace("postgres://postgres@", f"postgres://postgres:{db_pw}@")
    assert db_pw in dsn
    outputs = Outputs()
    config = _private(_server_config(base / "mtop.yaml", certs, dsn, log_format))

    ctl(outputs, config, "db", "init")
    ctl(outputs, config, "user", "del", "-u", user, ok=False)  # no such user yet: an error, still no password
    ctl(outputs, config, "user", "add", "-u", user, "--password-stdin", stdin=user_pw + "\n")
    ctl(outputs, config, "user", "show", "-u", user)
    ctl(outputs, config, "user", "list")

    server = _start(ServerProcess("secrets", config, base))
    try:
        link = ctl(outputs, config, "url", "-u", user, "-H", "127.0.0.1", "-P", str(server.port), "--password-stdin",
                   stdin=user_pw + "\n").strip()
        assert link.startswith("mtop://") and user_pw in link  # the link is the product: it holds the password
        wrong_link = ctl(outputs, config, "url", "-u", user, "-H", "127.0.0.1", "-P", str(server.port), "-p", wrong_pw).strip()

        echo = TargetServer(_echo)
        origin = TargetServer(_http_origin)
        try:
            target = f"127.0.0.1:{echo.port}"
            ctl(outputs, config, "check", "--ca", certs.ca_crt, "--target", target, link)
            ctl(outputs, config, "check", "--ca", certs.ca_crt, "--target", target, wrong_link, ok=False)

            # A wrong MTop password sent directly.
            ctx = ssl.create_default_context(cafile=certs.ca_crt)
            ctx.set_alpn_protocols(["mtop"])
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(wire.encode_auth(wire.AuthRequest(user, wrong_pw, "127.0.0.1", echo.port, wire.ATYP_IPV4)))
                    assert tls.recv(2) == b""
            server.wait_for(r"auth-failed", 20, what="the failed login")

            climber_dir = base / "climber"
            climber_dir.mkdir()
            proxy_auth = {"listen": "127.0.0.1:0", "username": local_user, "password": local_pw}
            climber_config = climber_dir / "climber.yaml"
            _write_private(climber_config, yaml.safe_dump({
                "log": {"level": "debug", "format": log_format},
                "socks5": proxy_auth,
                "http": proxy_auth,
                "servers": [{"url": link, "ca": certs.ca_crt}],
            }))
            climber = _start(ClimberProcess("secrets", climber_config, climber_dir))
            try:
                # SOCKS5 with the right local password: a tunnel, echoed.
                sock, rep = _socks5_connect(climber.socks5_port, local_user, local_pw, echo.port)
                assert rep == socks.REP_SUCCEEDED
                sock.sendall(b"through socks5 " + user_pw.encode())
                assert _recv_exactly(sock, 15 + len(user_pw)) == b"through socks5 " + user_pw.encode()
                sock.close()
                # ... and with a wrong one: refused.
                sock, rep = _socks5_connect(climber.socks5_port, local_user, wrong_local_pw, echo.port)
                assert rep == -1
                sock.close()
                # HTTP CONNECT and a plain request with Proxy-Authorization.
                sock, head = _http(climber.http_port, (
                    f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                    f"Proxy-Authorization: {_basic(local_user, local_pw)}\r\n\r\n").encode())
                assert head.startswith(b"HTTP/1.1 200"), head
                sock.sendall(b"ping")
                assert _recv_exactly(sock, 4) == b"ping"
                sock.close()
                sock, head = _http(climber.http_port, (
                    f"GET http://127.0.0.1:{origin.port}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Proxy-Authorization: {_basic(local_user, local_pw)}\r\n\r\n").encode())
                assert head.startswith(b"HTTP/1.1 200"), head
                sock.close()
                assert b"Proxy-Authorization" not in origin.result()
                sock, head = _http(climber.http_port, (
                    f"GET http://127.0.0.1:{origin.port}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Proxy-Authorization: {_basic(local_user, wrong_local_pw)}\r\n\r\n").encode())
                assert head.startswith(b"HTTP/1.1 407"), head
                sock.close()
            finally:
                _stop(climber, outputs)

            # A climber whose MTop password is wrong: its tunnels are refused.
            wrong_dir = base / "climber-wrong"
            wrong_dir.mkdir()
            wrong_config = wrong_dir / "climber.yaml"
            _write_private(wrong_config, yaml.safe_dump({
                "log": {"level": "debug", "format": log_format},
                "socks5": {"listen": "127.0.0.1:0"},
                "servers": [
                    {"host": f"127.0.0.1:{server.port}", "username": user, "password": wrong_pw, "ca": certs.ca_crt},
                    {"url": wrong_link, "ca": certs.ca_crt},
                ],
            }))
            wrong_climber = _start(ClimberProcess("wrong-password", wrong_config, wrong_dir))
            try:
                sock = socket.create_connection(("127.0.0.1", wrong_climber.socks5_port), timeout=20)
                sock.sendall(socks.encode_greeting([socks.METHOD_NO_AUTH]))
                assert sock.recv(2) == socks.encode_method_choice(socks.METHOD_NO_AUTH)
                sock.sendall(socks.encode_request(socks.CMD_CONNECT, "127.0.0.1", echo.port))
                reply = sock.recv(64)
                assert reply[:2] != b"\x05\x00", reply
                sock.close()
                wrong_climber.wait_for(r"tunnel done|failed", 20, what="the failed tunnel")
            finally:
                _stop(wrong_climber, outputs)
        finally:
            echo.close()
            origin.close()
    finally:
        _stop(server, outputs)

    for log_file in base.rglob("*.log"):
        outputs.add(str(log_file), log_file.read_text(errors="replace"))
    log = "\n".join(outputs.texts.values())
    assert "auth-failed" in log and "tunnel done" in log and "407" not in user_pw  # the session did happen
    assert WARNING not in log  # every secret file is 0600 here
    if log_format == "json":
        assert log.count('{"time":') > 20  # the processes did log JSON lines
    outputs.check({
        "the user's password": (user_pw, user),
        "the wrong password": (wrong_pw, user),
        "the local proxy password": (local_pw, local_user),
        "the wrong local proxy password": (wrong_local_pw, local_user),
        "the DSN password": (db_pw, "postgres"),
    })


def test_start_warns_of_keys_and_password_configs_others_can_read(secrets_dir, run_twistd):
    base, certs, plain_dsn = secrets_dir
    db_pw = "Dpw-" + secrets.token_hex(8)
    config = _server_config(base / "mtop.yaml", certs, plain_dsn.replace("postgres://postgres@", f"postgres://postgres:{db_pw}@"))
    os.chmod(config, 0o644)
    os.chmod(certs.server_key, 0o644)
    server = _start(ServerProcess("warnings", config, base))
    outputs = Outputs()
    try:
        key_line = server.wait_for(rf"{certs.server_key} holds the TLS private key \(server.key\).*{WARNING} \(mode 0644\); "
                                   rf"run: chmod o-rwx {certs.server_key}", 5, what="the key warning")
        config_line = server.wait_for(rf"{config} holds passwords \(db.dsn\).*{WARNING} \(mode 0644\)", 5,
                                      what="the config warning")
        assert key_line and config_line
        climber_dir = base / "climber"
        climber_dir.mkdir()
        climber_config = climber_dir / "climber.yaml"
        climber_config.write_text(yaml.safe_dump({
            "socks5": {"listen": "127.0.0.1:0"},
            "servers": [{"host": f"127.0.0.1:{server.port}", "username": "u", "password": "Cpw-" + secrets.token_hex(6),
                         "ca": certs.ca_crt}],
        }))
        os.chmod(climber_config, 0o604)
        climber = _start(ClimberProcess("warnings", climber_config, climber_dir))
        try:
            climber.wait_for(rf"{climber_config} holds passwords \(servers\[0\].password\).*{WARNING} \(mode 0604\)", 5,
                             what="climber's config warning")
        finally:
            _stop(climber, outputs)
    finally:
        _stop(server, outputs)
    assert db_pw not in "".join(outputs.texts.values())

    # Made private, the same files give no warning.
    os.chmod(config, 0o600)
    os.chmod(certs.server_key, 0o600)
    os.chmod(climber_config, 0o600)
    server = _start(ServerProcess("no-warnings", config, base))
    try:
        climber = _start(ClimberProcess("no-warnings", climber_config, climber_dir))
        _stop(climber, outputs)
    finally:
        _stop(server, outputs)
    assert WARNING not in server.log() and WARNING not in climber.log()


def test_the_leak_search_finds_each_form():
    """The search above would see a password in any of the forms."""
    secret, user = "Upw-0123456789abcdef", "alice"
    auth = wire.encode_auth(wire.AuthRequest(user, secret, "example.com", 443))
    userpass = socks.encode_userpass(user, secret)
    for leak in (
        f"login {secret}",
        f"auth {auth.hex()}",
        f"auth {auth!r}",
        f"AUTH {userpass.hex().upper()}",
        f"Proxy-Authorization: {_basic(user, secret)}",
        *(f"data {base64.b64encode(bytes(k) + auth).decode()}" for k in range(3)),
        *(f"data {base64.urlsafe_b64encode(bytes(k) + userpass).decode()}" for k in range(3)),
    ):
        outputs = Outputs()
        outputs.add("planted", leak)
        with pytest.raises(AssertionError, match="passwords in the output"):
            outputs.check({"it": (secret, user)})
