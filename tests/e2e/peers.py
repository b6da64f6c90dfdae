"""Peers for the end-to-end tests, shared by the test modules: a threaded
TCP server and the target handlers it runs."""

from __future__ import annotations

import queue
import socket
import threading


class TargetServer:
    """A plain TCP server on 127.0.0.1 (port 0) that runs ``handler(sock)``
    in a thread per connection and queues what it returns (or raises)."""

    def __init__(self, handler):
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.results: queue.Queue = queue.Queue()
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, name=f"target-{self.port}", daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            self.results.put(self.handler(conn))
        except BaseException as e:  # reported by result()
            self.results.put(e)
        finally:
            conn.close()

    def result(self, timeout: float = 30.0):
        """What the handler of the next finished connection returned."""
        try:
            value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"target on port {self.port}: no connection finished within {timeout:g}s") from None
        if isinstance(value, BaseException):
            raise AssertionError(f"target handler failed: {value!r}") from value
        return value

    def close(self) -> None:
        self._stop.set()
        self._accept_thread.join(timeout=5)
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


def recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def reply_after_eof(sock: socket.socket) -> bytes:
    """Read to EOF, then answer ``got:`` + what was read (needs half-close)."""
    data = recv_to_eof(sock)
    sock.sendall(b"got:" + data)
    return data


def banner_then_read(sock: socket.socket) -> bytes:
    """Speak first and shut the write side, then read to EOF."""
    sock.sendall(b"banner")
    sock.shutdown(socket.SHUT_WR)
    return recv_to_eof(sock)


def echo(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
        sock.sendall(chunk)
    return bytes(data)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 to ``upstream_port``, to play a
    network outage: `cut` resets every connection through it and refuses
    new ones until `restore` (on the same port)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        if self.listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone
            # would leave the socket listening until accept() returns.
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                # RST rather than FIN: like a host that went away.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
