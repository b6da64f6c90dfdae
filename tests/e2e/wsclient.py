"""A blocking WebSocket client for the tests (wsproto over a socket, TLS
or not): speaks MTop over binary messages with the half-close convention
of `mtop.websocket` (an empty text message)."""

from __future__ import annotations

import socket
import ssl

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData, Request, TextMessage


class Rejected(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class WSClient:
    def __init__(self, port: int, *, path: str = "/", host: str = "localhost", ca=None, tls: bool = True,
                 headers: list[tuple[bytes, bytes]] = (), timeout: float = 10.0, address: str = "127.0.0.1"):
        sock = socket.create_connection((address, port), timeout=timeout)
        if tls:
            context = ssl.create_default_context(cafile=str(ca))
            context.set_alpn_protocols(["http/1.1"])
            sock = context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.buffer = b""
        self.eof = False
        self.close_code: int | None = None
        try:
            self._upgrade(host, path, headers)
        except BaseException:
            self.close()
            raise

    def _upgrade(self, host: str, path: str, headers) -> None:
        self.sock.sendall(self.ws.send(Request(host=host, target=path, extra_headers=list(headers))))
        body = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed before the upgrade was answered")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self._pending()
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Rejected(status, b"")
                if isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status, body)

    def _pending(self) -> None:
        for event in self.ws.events():
            self._event(event)

    def _event(self, event) -> None:
        if isinstance(event, BytesMessage):
            self.buffer += event.data
        elif isinstance(event, TextMessage):
            assert event.data == "", event.data
            self.eof = True
        elif isinstance(event, Ping):
            self.sock.sendall(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.close_code = event.code
            self.eof = True
            try:
                self.sock.sendall(self.ws.send(event.response()))
            except Exception:
                pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_eof(self) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data="")))

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(1 << 18)
        if not data:
            self.eof = True
            return False
        self.ws.receive_data(data)
        self._pending()
        return True

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(f"ended after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
