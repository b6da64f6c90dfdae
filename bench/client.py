"""Blocking-socket clients for the benchmarks: open a connection to the
origin directly, through a SOCKS5 proxy or through an HTTP CONNECT proxy,
then download, upload, echo.  1 MiB buffers (``recv_into`` a preallocated
buffer, ``sendall`` of a memoryview), so the client is not the bottleneck.

Every load loop is bounded by a byte count *and* a deadline.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

BUFFER = 1 << 20
SIZE = struct.Struct("!Q")
BLOCK = os.urandom(BUFFER)


class BenchError(Exception):
    """A connection through a path failed (the message says where)."""


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


@dataclass(frozen=True)
class MtopLogin:
    """What a client speaking MTop itself needs: the CA that signed the
    server's certificate, and a user."""

    ca: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Path:
    """How to reach the origin: ``kind`` is ``direct``, ``socks5``,
    ``http`` (CONNECT) or ``mtop`` (MTop v1 over TLS straight to the server,
    no climber: the server's own cost); ``proxy`` is the proxy's or
    server's (host, port)."""

    kind: str
    proxy: tuple[str, int] | None = None
    login: MtopLogin | None = None

    def open(self, target: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        """A connected socket to ``target`` through this path (the proxy's
        handshake done)."""
        address = target if self.kind == "direct" else self.proxy
        sock = socket.create_connection(address, timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.kind == "socks5":
                _socks5_connect(sock, target)
            elif self.kind == "http":
                _http_connect(sock, target)
            elif self.kind == "mtop":
                sock = _mtop_connect(sock, self.login, target)
        except BaseException:
            sock.close()
            raise
        return sock


def _socks5_connect(sock: socket.socket, target: tuple[str, int]) -> None:
    sock.sendall(b"\x05\x01\x00")
    if recv_exact(sock, 2) != b"\x05\x00":
        raise BenchError("SOCKS5 proxy refused the greeting")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1]))
    reply = recv_exact(sock, 4)
    if reply[1] != 0:
        raise BenchError(f"SOCKS5 proxy replied {reply[1]:#04x}")
    atyp = reply[3]
    rest = {1: 6, 4: 18}.get(atyp)
    if rest is None:
        rest = recv_exact(sock, 1)[0] + 2
    recv_exact(sock, rest)


_mtop_tls: dict[str, tuple[ssl.SSLContext, list]] = {}
_mtop_lock = threading.Lock()


def _mtop_connect(sock: socket.socket, login: MtopLogin, target: tuple[str, int]) -> socket.socket:
    """TLS 1.3 with ALPN ``mtop`` (resuming the last session, as climber
    does), the auth message, the two-byte reply: the TLS socket."""
    from mtop import wire

    with _mtop_lock:
        if login.ca not in _mtop_tls:
            context = ssl.create_default_context(cafile=login.ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.set_alpn_protocols(["mtop"])
            _mtop_tls[login.ca] = (context, [None])
        context, last = _mtop_tls[login.ca]
    tls = context.wrap_socket(sock, server_hostname=sock.getpeername()[0], session=last[0])
    tls.sendall(wire.encode_auth(wire.AuthRequest(login.username, login.password, target[0], target[1], wire.ATYP_IPV4)))
    reply = recv_exact(tls, wire.REPLY_LENGTH)
    if reply != wire.REPLY_SUCCESS:
        raise BenchError(f"MTop server replied {reply.hex()}")
    last[0] = tls.session  # the tickets have arrived before the reply
    return tls


def _http_connect(sock: socket.socket, target: tuple[str, int]) -> None:
    authority = f"{target[0]}:{target[1]}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise BenchError("HTTP proxy closed before its answer")
        head += chunk
        if len(head) > 65536:
            raise BenchError("HTTP proxy's answer is too long")
    status = head.split(b"\r\n", 1)[0]
    if status.split()[1:2] != [b"200"] or not head.endswith(b"\r\n\r\n"):
        # (the origin speaks only when asked, so nothing may follow the head)
        raise BenchError(f"HTTP proxy answered {status!r}")


def download(sock: socket.socket, size: int, deadline: float) -> tuple[int, float]:
    """Ask the source for ``size`` bytes and read them, stopping at
    ``deadline`` (monotonic); returns (bytes, seconds)."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    started = time.monotonic()
    sock.sendall(SIZE.pack(size))
    got = 0
    recv_into = sock.recv_into
    sock.settimeout(max(deadline - started, 0.1) + 5)
    while got < size:
        n = recv_into(view)
        if not n:
            break
        got += n
        if time.monotonic() >= deadline:
            break
    return got, time.monotonic() - started


def upload(sock: socket.socket, size: int, deadline: float) -> tuple[int, float]:
    """Send up to ``size`` bytes to the sink, stopping at ``deadline``;
    the time runs until the sink says how many it received (returned)."""
    block = memoryview(BLOCK)
    started = time.monotonic()
    sock.settimeout(max(deadline - started, 0.1) + 30)
    sock.sendall(SIZE.pack(size))
    sent = 0
    while sent < size:
        n = min(BUFFER, size - sent)
        sock.sendall(block[:n])
        sent += n
        if time.monotonic() >= deadline:
            break
    if sent < size:
        sock.shutdown(socket.SHUT_WR)
    (got,) = SIZE.unpack(recv_exact(sock, SIZE.size))
    return got, time.monotonic() - started


def echo_once(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    if recv_exact(sock, len(payload)) != payload:
        raise BenchError("echo came back different")


def transfer(path: Path, target: tuple[str, int], direction: str, size: int, seconds: float) -> tuple[int, float]:
    """One transfer through ``path``; (bytes, seconds)."""
    with path.open(target) as sock:
        run = download if direction == "download" else upload
        got, elapsed = run(sock, size, time.monotonic() + seconds)
    if got == 0:
        raise BenchError(f"{direction} through {path.kind} moved nothing")
    return got, elapsed


def parallel_download(path: Path, target: tuple[str, int], streams: int, size: int, seconds: float) -> tuple[int, float]:
    """``streams`` downloads at once (each up to ``size`` bytes, all
    bounded by one deadline); (bytes, seconds) in all."""
    socks = [path.open(target) for _ in range(streams)]
    results: list[tuple[int, float] | BaseException] = [None] * streams  # type: ignore[list-item]
    barrier = threading.Barrier(streams + 1)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = download(socks[i], size, deadline)
        except BaseException as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    started = time.monotonic()
    deadline = started + seconds
    barrier.wait()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    for s in socks:
        s.close()
    errors = [r for r in results if isinstance(r, BaseException) or r is None]
    if errors:
        raise BenchError(f"parallel download through {path.kind}: {errors[0]!r}")
    return sum(r[0] for r in results), elapsed


@dataclass
class SetupResult:
    rate: float  # tunnels per second
    p50_ms: float
    p99_ms: float
    done: int
    failed: int


def setup_rate(path: Path, echo: tuple[str, int], total: int, concurrency: int, seconds: float) -> SetupResult:
    """Open ``total`` connections through ``path`` (``concurrency`` at a
    time, stopping at the deadline), each with one 32-byte echo round trip
    before it closes; rate and latency (connect to echo answered)."""
    payload = os.urandom(32)
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(range(total))
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    return
            started = time.monotonic()
            try:
                with path.open(echo) as sock:
                    echo_once(sock, payload)
            except (OSError, BenchError) as e:
                with lock:
                    failures.append(e)
                continue
            with lock:
                latencies.append(time.monotonic() - started)

    started = time.monotonic()
    run_workers(worker, concurrency, seconds + 30)
    elapsed = time.monotonic() - started
    if not latencies:
        raise BenchError(f"no connection through {path.kind} worked: {failures[:1]!r}")
    latencies.sort()
    return SetupResult(
        rate=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        done=len(latencies),
        failed=len(failures),
    )


def run_workers(worker: Callable[[], None], count: int, seconds: float) -> None:
    """Run ``worker`` in ``count`` daemon threads at once and wait for them,
    at most ``seconds`` for each (the workers bound their own loops)."""
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def open_idle(path: Path, echo: tuple[str, int], count: int, concurrency: int, seconds: float) -> list[socket.socket]:
    """``count`` open tunnels to the echo (each checked with one round
    trip), opened ``concurrency`` at a time within ``seconds``."""
    opened: list[socket.socket] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(range(count))
    deadline = time.monotonic() + seconds
    payload = b"x" * 32

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                sock = path.open(echo)
                echo_once(sock, payload)
            except (OSError, BenchError) as e:
                with lock:
                    failures.append(e)
                continue
            with lock:
                opened.append(sock)

    run_workers(worker, concurrency, seconds + 30)
    if failures and not opened:
        raise BenchError(f"no idle tunnel through {path.kind} opened: {failures[0]!r}")
    return opened


def echo_each(socks: list[socket.socket], size: int, parallel: int, seconds: float) -> int:
    """Send ``size`` bytes through each of ``socks`` (connected to the
    echo) and read them back, ``parallel`` sockets at a time, within
    ``seconds``; returns how many sockets completed.  The sockets stay
    open."""
    payload = memoryview(BLOCK * (size // BUFFER + 1))[:size]
    deadline = time.monotonic() + seconds
    done = []
    lock = threading.Lock()
    queue = iter(socks)

    def worker() -> None:
        buffer = bytearray(BUFFER)
        while time.monotonic() < deadline:
            with lock:
                sock = next(queue, None)
            if sock is None:
                return
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            got = 0
            try:
                while got < size:
                    n = sock.recv_into(buffer, min(BUFFER, size - got))
                    if not n:
                        break
                    got += n
            except OSError:
                pass
            sender.join(max(deadline - time.monotonic(), 0.1))
            if got == size:
                with lock:
                    done.append(sock)

    run_workers(worker, parallel, seconds + 30)
    return len(done)


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (mtop's workers, with
    ``server.workers`` above 1)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(child) for child in f.read().split())
    except OSError:
        pass
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS of process ``pid`` and its children in KiB."""
    total, found = 0, False
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        found = True
        except OSError:
            continue
    if not found:
        raise BenchError(f"no VmRSS for process {pid}")
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` and its children so
    far."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
