"""MTop as a shadowsocks plugin (SIP003), with Debian's shadowsocks-libev:
ss-local -> climber-ss-plugin -> MTop tunnel (TLS or QUIC) ->
mtop-ss-plugin -> ss-server -> the target; a SOCKS5 fetch through
ss-local, checksummed both ways.  tests/services.sh installs
shadowsocks-libev."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peers import echo
from test_climber_e2e import socks5_request

METHOD = "chacha20-ietf-poly1305"


def ss_program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install shadowsocks-libev (make test's tests/services.sh installs it)")
    return found


def free_port() -> int:
    from bench.procs import free_port_both

    return free_port_both()


def plugin_environment() -> dict[str, str]:
    env = dict(os.environ)
    # ss-server and ss-local run the plugin with sh -c "exec PLUGIN": ours
    # are next to this interpreter.
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.pop("MTOP_CONFIG", None)
    return env


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=plugin_environment(), start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)


def fetch(proxy: int, port: int, payload: bytes) -> bytes | None:
    """``payload`` through the SOCKS5 proxy to the echo target and as many
    bytes back; ``None`` if the chain failed.  (Shadowsocks carries no
    half-close: a client's end of sending closes the connection.)"""
    try:
        sock, reply = socks5_request(proxy, "127.0.0.1", port)
    except (OSError, AssertionError):
        return None
    with sock:
        try:
            if reply[1] != 0:
                return None
            sock.settimeout(30)
            received = bytearray()
            sending = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sending.start()
            while len(received) < len(payload) and (chunk := sock.recv(1 << 16)):
                received += chunk
            sending.join(30)
            return bytes(received)
        except OSError:
            return None


@pytest.mark.parametrize("transport", ["tls", "quic", "wss"])
def test_a_socks5_fetch_through_shadowsocks_with_our_plugins(e2e_setup, tmp_path, make_target, transport):
    target = make_target(echo)
    extra = ";path=/ss-ws" if transport == "wss" else ""
    public, local = free_port(), free_port()
    key = os.urandom(12).hex()
    server = start(
        [
            ss_program("ss-server"), "-v", "-s", "127.0.0.1", "-p", str(public), "-k", key, "-m", METHOD,
            "--plugin", "mtop-ss-plugin", "--plugin-opts", f"config={e2e_setup.default_config};type={transport}{extra}",
        ],
        tmp_path / "ss-server.log",
    )
    client = start(
        [
            ss_program("ss-local"), "-v", "-s", "127.0.0.1", "-p", str(public), "-l", str(local), "-k", key, "-m", METHOD,
            "--plugin", "climber-ss-plugin",
            "--plugin-opts", f"user={e2e_setup.alice.name};password={e2e_setup.alice.password};ca={e2e_setup.ca};type={transport}{extra}",
        ],
        tmp_path / "ss-local.log",
    )
    try:
        # The plugins start after ss-server and ss-local: until they listen,
        # ss-local resets what it accepts.
        deadline = time.monotonic() + 30
        while fetch(local, target.port, b"ping") != b"ping":
            assert time.monotonic() < deadline, "the chain never answered"
            time.sleep(0.3)
        payload = os.urandom(4 << 20)
        received = fetch(local, target.port, payload)
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest(), len(received)
    finally:
        stop(client)
        stop(server)
    logs = (tmp_path / "ss-server.log").read_text(errors="replace") + (tmp_path / "ss-local.log").read_text(errors="replace")
    assert "Traceback" not in logs, logs[-3000:]
    assert f"(every tunnel to 127.0.0.1:" in logs, logs[-3000:]
    if transport == "wss":
        assert "MTop WebSocket (wss) listening on 127.0.0.1:" in logs and "(path /ss-ws)" in logs, logs[-3000:]
