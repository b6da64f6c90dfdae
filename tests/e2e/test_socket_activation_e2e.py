"""Socket activation through a real ``twistd mtop``: started as systemd
starts it for ``mtop.socket`` (the listening socket as descriptor 3,
``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``), it serves on that
socket instead of binding its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from conftest import TWISTD, run_ctl, subprocess_env, write_config
from peers import echo


def test_twistd_mtop_serves_on_the_socket_systemd_passed(e2e_setup, tmp_path, make_target):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = write_config(e2e_setup.dir / "mtop-activated.yaml", reply_errors=False, log_level="info")
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))

    def as_systemd_does() -> None:
        os.dup2(listener.fileno(), 3)

    env = subprocess_env()
    proc = subprocess.Popen(
        # LISTEN_PID must be the server's pid: the shell's, which exec keeps.
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=mtop.socket exec "$@"', "sh",
         sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "mtop", "--config", str(config)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=as_systemd_does, pass_fds=(3,),
    )
    listener.close()  # the server holds it now, as after systemd's hand-over
    try:
        target = make_target(echo)
        link = f"mtop://{e2e_setup.alice.name}:{e2e_setup.alice.password}@127.0.0.1:{port}/tls?proto=mtop"
        out = run_ctl(e2e_setup.default_config, "check", "--ca", str(e2e_setup.ca), "--target",
                      f"127.0.0.1:{target.port}", link)
        assert out.startswith("OK"), out
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=20)[0].decode()
    assert f"MTop TLS listening on 127.0.0.1:{port}" in log, log
    assert "user=alice" in log and "Address already in use" not in log, log

