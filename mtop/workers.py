"""Several server processes on the same ports (``server.workers: N``).

With ``workers`` above 1, ``twistd mtop`` becomes a supervisor: it starts N
worker processes (the same ``twistd mtop`` command line, with
``MTOP_WORKER`` set), replaces any that dies, passes SIGHUP on to them and
stops them when it stops (by closing their stdin: a worker also stops when
the supervisor is gone).  It opens no database and serves nothing itself.

Each worker binds every listener itself with ``SO_REUSEPORT``, so the
kernel spreads new TCP connections and QUIC flows over the workers: with
``server.worker_affinity: address`` (the default), all of one client
address's go to the same worker (`steer_by_address`), so a returning
client resumes its TLS session (each worker's ticket keys are its own: by
address pair, half the tunnels of a client of 2 workers did full
handshakes) and per-client limits hold; with ``connection``, or on a
listener behind a proxy (``proxy_protocol``, ``ws``), by address pair.
For listeners on port 0 the supervisor picks the port first (and holds a
TCP port bound, not listening, so nothing else takes it).  The supervisor
also keeps the table where the workers share their verified logins
(`mtop.loginshare`), so each user's password is checked with scrypt once
per machine.  Each worker is otherwise a whole server on its own: its
caches, limits, throttle and metrics are its own (so limits are per
process), while per-user traffic and quotas add up through the database
as for separate servers.  With ``metrics.listen`` on port P, worker i
(from 1) serves its metrics on port P + i - 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol

from mtop.config import Config, ListenAddress
from mtop.loginshare import SHARE_FD_ENV
from mtop.logs import logger

#: The environment variables a worker gets.
WORKER_ENV = "MTOP_WORKER"
PORTS_ENV = "MTOP_WORKER_PORTS"
#: The descriptor a worker finds the shared verified logins on.
SHARE_FD = 3

#: A worker that dies is started again after this long (doubling while
#: they keep dying within a minute, up to `RESTART_MAX`).
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: How long workers get to stop, beyond ``server.drain_timeout``, before
#: they are killed (their last traffic flush is in it).
STOP_GRACE = 15.0

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def worker_number() -> int | None:
    """This process's worker number (1..N), or ``None`` outside workers."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def worker_ports() -> dict[int, int]:
    """Listener index -> port, as the supervisor resolved them."""
    ports = {}
    for item in os.environ.get(PORTS_ENV, "").split(","):
        index, sep, port = item.partition("=")
        if sep and index.isdigit() and port.isdigit():
            ports[int(index)] = int(port)
    return ports


def effective_workers(value: int) -> int:
    """``workers`` with 0 meaning one per CPU."""
    return value if value > 0 else max(1, os.cpu_count() or 1)


def worker_argv(argv: list[str]) -> list[str]:
    """The command line of a worker: the supervisor's own twistd arguments,
    in the foreground and without a pid file."""
    args: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--pidfile":
            skip = True
            continue
        if arg.startswith("--pidfile="):
            continue
        args.append(arg)
    if "--nodaemon" not in args and "-n" not in args:
        args.insert(0, "--nodaemon")
    return [sys.executable, "-c", TWISTD, "--pidfile=", *args]


#: Linux's ``SO_ATTACH_REUSEPORT_CBPF`` (4.5 and later), which Python's
#: socket module does not name.
SO_ATTACH_REUSEPORT_CBPF = 51
#: Classic BPF: loads relative to the network header start here.
_SKF_NET_OFF = 0xFFF00000


def _address_steering_program(count: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program picking socket ``source address mod count`` of
    a ``SO_REUSEPORT`` group: the IPv4 source address, or the last 32 bits
    of the IPv6 one (``(code, jt, jf, k)`` instructions)."""
    return [
        (0x30, 0, 0, _SKF_NET_OFF),  # ldb [net + 0]: version and IHL
        (0x74, 0, 0, 4),  # rsh #4: the IP version
        (0x15, 0, 2, 6),  # jeq #6 ? next : +2
        (0x20, 0, 0, _SKF_NET_OFF + 20),  # ld [net + 20]: IPv6 source, last word
        (0x05, 0, 0, 1),  # ja +1
        (0x20, 0, 0, _SKF_NET_OFF + 12),  # ld [net + 12]: IPv4 source
        (0x94, 0, 0, count),  # mod #count
        (0x16, 0, 0, 0),  # ret a
    ]


def steer_by_address(sock: socket.socket, count: int) -> bool:
    """Have the kernel give each new connection (TCP) or flow (UDP) on
    ``sock``'s port to the socket of its ``SO_REUSEPORT`` group numbered
    by the client's address modulo ``count`` (the workers), so one client
    address always reaches the same worker; while a group has fewer
    sockets (a worker starting again), the kernel's own hash picks.  The
    program belongs to the group: each worker attaches the same one.
    False (and nothing changed) where the kernel refuses it."""
    program = _address_steering_program(count)
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        return False
    return True


_steering_warned = False


def _steering_refused() -> None:
    global _steering_warned
    if not _steering_warned:
        _steering_warned = True
        logger(__name__).warn(
            "server.worker_affinity: the kernel refused the program that keeps a client address on one worker "
            "(SO_ATTACH_REUSEPORT_CBPF, Linux 4.5 or later); connections are spread by address pair"
        )


def reuseport_socket(
    address: ListenAddress, kind: int, port: int | None = None, listen: bool = True, steer: int = 0
) -> socket.socket:
    """A socket bound to ``address`` (``port`` instead of its port) with
    ``SO_REUSEPORT``: TCP ones also listen, unless ``listen`` is false.  No
    host: every interface, dual-stack where IPv6 exists.  ``steer``: the
    number of workers to spread clients over by address
    (`steer_by_address`; 0: by address pair, the kernel's default)."""
    from mtop.listening import ipv6_available

    host = address.host
    if host is None:
        host = "::" if ipv6_available() else "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, address.port if port is None else port))
        if kind == socket.SOCK_STREAM and listen:
            sock.listen(1024)
        if steer > 1 and not steer_by_address(sock, steer):  # once in its group (bound, listening)
            _steering_refused()
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ReusePortEndpoint:
    """A TCP server endpoint (`IStreamServerEndpoint`) binding its socket
    with ``SO_REUSEPORT`` when it starts listening, so each worker has its
    own accept queue; ``steer``: see `reuseport_socket`."""

    def __init__(self, reactor: Any, address: ListenAddress, port: int, steer: int = 0):
        self.reactor = reactor
        self.address = address
        self.port = port
        self.steer = steer

    def listen(self, factory: Any) -> Deferred:
        from twisted.internet.defer import fail, succeed

        try:
            sock = reuseport_socket(self.address, socket.SOCK_STREAM, self.port, steer=self.steer)
        except OSError as e:
            return fail(e)
        try:
            return succeed(self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        finally:
            sock.close()  # the reactor has its own copy


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", number: int):
        self.supervisor = supervisor
        self.number = number
        self.ended: Deferred = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class WorkerSupervisor(Service):
    """Starts and keeps ``count`` worker processes."""

    _log = logger()
    stopping = False

    def __init__(self, reactor: Any, config: Config, count: int, argv: list[str] | None = None):
        self.reactor = reactor
        self.config = config
        self.count = count
        self.argv = worker_argv(argv if argv is not None else sys.argv)
        self.workers: dict[int, _Worker] = {}
        self.ports: dict[int, int] = {}
        self._holders: list[socket.socket] = []
        self._restart_delay: dict[int, float] = {}
        self._last_start: dict[int, float] = {}
        self._previous_hup: Any = None
        #: The workers' shared verified logins (`mtop.loginshare`): kept
        #: here, so a worker started again finds what the others verified.
        self.login_share: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._resolve_ports()

    def _resolve_ports(self) -> None:
        if self.ports:
            return
        for index, listener in enumerate(self.config.listeners):
            port = listener.listen.port
            if port == 0:
                kind = socket.SOCK_DGRAM if listener.type == "quic" else socket.SOCK_STREAM
                holder = reuseport_socket(listener.listen, kind, listen=False)
                port = holder.getsockname()[1]
                if kind == socket.SOCK_STREAM:
                    self._holders.append(holder)  # bound, not listening: takes no connections
                else:
                    holder.close()  # a bound UDP socket would take datagrams
            self.ports[index] = port

    def startService(self) -> None:
        self._resolve_ports()
        self._share_logins()
        super().startService()
        self._log.info("starting {count} workers", count=self.count)
        for number in range(1, self.count + 1):
            self._start(number)
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, lambda *a: self.reactor.callFromThread(self.signal_all, signal.SIGHUP))
        except ValueError:
            self._previous_hup = None

    def _share_logins(self) -> None:
        if self.login_share is not None:
            return
        from mtop.loginshare import LoginShare

        try:
            self.login_share = LoginShare.create()
        except (OSError, AttributeError, ValueError) as e:  # no memfd_create here
            self._log.warn("verified logins not shared between workers: {error}", error=e)

    def _start(self, number: int) -> None:
        if self.stopping:
            return
        env = dict(os.environ)
        env[WORKER_ENV] = str(number)
        env[PORTS_ENV] = ",".join(f"{index}={port}" for index, port in self.ports.items())
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        env.pop(SHARE_FD_ENV, None)
        if self.login_share is not None:
            fds[SHARE_FD] = self.login_share.fd
            env[SHARE_FD_ENV] = str(SHARE_FD)
        worker = _Worker(self, number)
        self._last_start[number] = self.reactor.seconds()
        self.reactor.spawnProcess(worker, self.argv[0], self.argv, env=env, childFDs=fds)
        self.workers[number] = worker
        self._log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)

    def worker_ended(self, worker: _Worker, reason: Any) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self.stopping:
            return
        number = worker.number
        lived = self.reactor.seconds() - self._last_start.get(number, 0.0)
        delay = self._restart_delay.get(number, RESTART_FIRST)
        delay = RESTART_FIRST if lived > 60 else min(delay * 2, RESTART_MAX)
        self._restart_delay[number] = delay
        self._log.warn(
            "worker {number} (pid {pid}) ended ({reason}); starting a new one in {delay:g}s",
            number=number,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._start, number)

    def signal_all(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)
            except Exception:  # already gone
                pass

    def stopService(self) -> Deferred:
        super().stopService()
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for holder in self._holders:
            holder.close()
        self._holders = []
        workers = list(self.workers.values())
        for worker in workers:
            worker.transport.closeStdin()  # a worker stops (drains) at the end of its stdin
        # Each drains for up to drain_timeout; a second SIGTERM (or SIGINT)
        # to us ends their drains at once.
        self._take_stop_signals()

        def kill() -> None:
            for worker in workers:
                if not worker.ended.called:
                    try:
                        worker.transport.signalProcess("KILL")
                    except Exception:
                        pass

        timer = self.reactor.callLater(self.config.server.drain_timeout + STOP_GRACE, kill)
        done = DeferredList([worker.ended for worker in workers])
        done.addBoth(lambda _: timer.cancel() if timer.active() else None)
        done.addBoth(self._give_back_stop_signals)
        return done

    def _take_stop_signals(self) -> None:
        self._previous_stop = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_stop[signum] = signal.signal(
                    signum, lambda *a: self.reactor.callFromThread(self.signal_all, signal.SIGTERM)
                )
            except (ValueError, OSError):  # not the main thread
                pass

    def _give_back_stop_signals(self, result: Any) -> Any:
        for signum, previous in getattr(self, "_previous_stop", {}).items():
            try:
                signal.signal(signum, previous)
            except (ValueError, OSError, TypeError):
                pass
        self._previous_stop = {}
        return result


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:  # already stopping (SIGTERM came first)
        pass


class ParentWatch(Service):
    """In a worker: stop when the supervisor closes our stdin pipe (how it
    stops us, so a service manager's SIGTERM to the whole group is not a
    second one), or is gone without a chance to (killed)."""

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self._reader: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import fdesc
        from twisted.internet.abstract import FileDescriptor

        reactor = self.reactor

        class _Stdin(FileDescriptor):
            def fileno(self) -> int:
                return 0

            def doRead(self) -> Any:
                try:
                    data = os.read(0, 4096)
                except BlockingIOError:
                    return None
                except OSError:
                    data = b""
                if not data:
                    self.connectionLost(None)
                return None

            def connectionLost(self, reason: Any) -> None:
                # Also what the reactor calls on a hang-up without data.
                self.stopReading()
                reactor.callLater(0, _stop, reactor)

        fdesc.setNonBlocking(0)
        self._reader = _Stdin(reactor)
        self._reader.startReading()

    def stopService(self) -> None:
        super().stopService()
        if self._reader is not None:
            self._reader.stopReading()
            self._reader = None
