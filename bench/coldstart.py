"""Logins when the server has not seen the users yet: ``python -m
bench.coldstart [--workers 2] [--users 20]``.

One ``twistd mtop`` (with ``--workers``) on SQLite, ``--users`` users with
scrypt hashes; each phase logs every user in once, all at the same time
(one TLS connection each, to an echo target), and prints the p50 and max
time from connecting to the server's ``01 00``:

* cold: a new server;
* again: the same once more (the login caches; with workers, a user may
  land on a worker that has not seen it);
* reload: after SIGHUP (``systemctl reload``);
* worker restarted: after one worker is killed and started again (with
  ``--workers`` above 1);
* cold again: the server restarted.

The figures are wall-clock, on whatever else the
machine does: compare phases of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import statistics
import threading
import time

from bench.procs import Process, Processes, Workspace, free_port_both, twistd_command
from mtop import wire


def _echo_server() -> int:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=lambda c=conn: c.sendall(c.recv(64)) or c.close(), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def _login(port: int, ca: str, user: str, password: str, target: int, times: list[float]) -> None:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["mtop"])
    started = time.perf_counter()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost") as tls:
        tls.sendall(wire.encode_auth(wire.AuthRequest(user, password, "127.0.0.1", target)))
        reply = tls.recv(2)
        if reply != wire.REPLY_SUCCESS:
            raise RuntimeError(f"login of {user} answered {reply!r}")
        times.append(time.perf_counter() - started)


def _phase(port: int, ca: str, users: list[tuple[str, str]], target: int) -> list[float]:
    times: list[float] = []
    threads = [threading.Thread(target=_login, args=(port, ca, u, p, target, times)) for u, p in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if len(times) != len(users):
        raise RuntimeError(f"{len(users) - len(times)} logins failed")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args()
    ws = Workspace(workers=args.workers)
    processes = Processes()
    try:
        ws.prepare()
        config = ws.mtop_config(free_port_both())
        port = int(re.search(r"127\.0\.0\.1:(\d+)", config.read_text()).group(1))
        users = [(f"cold{i}", f"Cold-pw-{i}-{ws.password}") for i in range(args.users)]
        for name, password in users:
            ws.ctl("-c", str(config), "user", "add", "-u", name, "--password-stdin", stdin=password + "\n")
        ca = str(ws.dir / "certs" / "ca.crt")
        target = _echo_server()

        starts = [0]

        def start() -> Process:
            starts[0] += 1
            process = processes.add(
                Process("mtop", [*twistd_command(), "--nodaemon", "--pidfile=", "mtop", "--config", str(config)],
                        ws.dir, config.with_suffix(f".{starts[0]}.log"))
            )
            process.wait_for(re.compile(r"MTop TLS listening on"))
            time.sleep(1.5)  # every worker
            return process

        def report(name: str) -> None:
            times = _phase(port, ca, users, target)
            print(f"{name:18} p50 {statistics.median(times) * 1000:7.1f} ms   max {max(times) * 1000:7.1f} ms", flush=True)

        process = start()
        report("cold")
        report("again")
        process.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        report("reload")
        if args.workers > 1:
            pid = int(re.search(r"worker 1 started \(pid (\d+)\)", process.log()).group(1))
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while len(re.findall(r"worker 1 started", process.log())) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2)
            report("worker restarted")
        processes.stop(process)
        start()
        report("cold again")
    finally:
        processes.stop_all()
        ws.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
