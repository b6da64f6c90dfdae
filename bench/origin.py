"""The origin the benchmarks talk to: three plain TCP services on
127.0.0.1, blocking sockets, one thread per connection, 1 MiB buffers (so
the origin is never what limits a figure).

``source``  reads an 8-byte big-endian size, then sends that many bytes
            (a fixed 1 MiB random block, repeated) and closes;
``sink``    reads an 8-byte size, then reads until it has that many bytes
            or EOF, and answers the 8-byte count it received;
``echo``    sends back whatever it reads, until EOF.

Run as ``python -m bench.origin``: it prints one JSON line with the three
ports, then serves until stdin closes or it is killed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

BUFFER = 1 << 20
SIZE = struct.Struct("!Q")
BLOCK = os.urandom(BUFFER)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def serve_source(sock: socket.socket) -> None:
    (size,) = SIZE.unpack(recv_exact(sock, SIZE.size))
    block = memoryview(BLOCK)
    while size > 0:
        n = min(size, BUFFER)
        sock.sendall(block[:n])
        size -= n


def serve_sink(sock: socket.socket) -> None:
    (size,) = SIZE.unpack(recv_exact(sock, SIZE.size))
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view, min(BUFFER, size - got))
        if not n:
            break
        got += n
    sock.sendall(SIZE.pack(got))


def serve_echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(BUFFER)
        if not data:
            return
        sock.sendall(data)


SERVICES = {"source": serve_source, "sink": serve_sink, "echo": serve_echo}


class Origin:
    """The three services, each on its own port (``ports[name]``), served
    by daemon threads until `close`."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 4096):
        # Thousands of idle connections mean thousands of threads; they
        # need little stack.
        threading.stack_size(256 * 1024)
        self._listeners: dict[str, socket.socket] = {}
        self.ports: dict[str, int] = {}
        self._closed = threading.Event()
        for name, handler in SERVICES.items():
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0))
            listener.listen(backlog)
            self._listeners[name] = listener
            self.ports[name] = listener.getsockname()[1]
            threading.Thread(target=self._accept, args=(listener, handler), name=f"origin-{name}", daemon=True).start()

    def _accept(self, listener: socket.socket, handler) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, handler), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, handler) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            handler(conn)
        except (OSError, EOFError):
            pass  # the client stopped early (time bound) or went away
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
        for listener in self._listeners.values():
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()


def main() -> None:
    origin = Origin()
    print(json.dumps(origin.ports), flush=True)
    # Serve until the harness closes our stdin (or kills us).
    sys.stdin.read()
    origin.close()


if __name__ == "__main__":
    main()
