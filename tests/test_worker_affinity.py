"""``server.worker_affinity: address``: the classic BPF program on a
``SO_REUSEPORT`` group that keeps each client address on one socket (one
worker), on real loopback sockets."""

from __future__ import annotations

import socket
import time

import pytest

from mtop import workers
from mtop.config import ListenAddress


def accepted_by(listeners: list[socket.socket], source: str, port: int) -> int:
    """Which of ``listeners`` accepts a connection from ``source``."""
    with socket.socket() as client:
        client.bind((source, 0))
        client.connect(("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for index, listener in enumerate(listeners):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.close()
                return index
            time.sleep(0.005)
    raise AssertionError(f"no listener accepted the connection from {source}")


@pytest.mark.parametrize("host", ["127.0.0.1", None])  # None: dual-stack "::" (or 0.0.0.0)
def test_each_client_address_keeps_to_one_listener_and_addresses_spread(host):
    first = workers.reuseport_socket(ListenAddress(host, 0), socket.SOCK_STREAM, steer=2)
    port = first.getsockname()[1]
    second = workers.reuseport_socket(ListenAddress(host, port), socket.SOCK_STREAM, steer=2)
    listeners = [first, second]
    try:
        chosen = {}
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
            picks = {accepted_by(listeners, source, port) for _ in range(6)}
            assert len(picks) == 1, (source, picks)  # always the same one
            chosen[source] = picks.pop()
        # Address mod 2: neighbours go to different listeners.
        assert chosen["127.0.0.1"] == chosen["127.0.0.3"] != chosen["127.0.0.2"] == chosen["127.0.0.4"], chosen
    finally:
        for listener in listeners:
            listener.close()


def test_without_steering_one_address_is_spread_by_address_pair():
    first = workers.reuseport_socket(ListenAddress("127.0.0.1", 0), socket.SOCK_STREAM)
    port = first.getsockname()[1]
    second = workers.reuseport_socket(ListenAddress("127.0.0.1", port), socket.SOCK_STREAM)
    listeners = [first, second]
    try:
        picks = {accepted_by(listeners, "127.0.0.1", port) for _ in range(40)}
        assert picks == {0, 1}  # all 40 on one: once in 2**39
    finally:
        for listener in listeners:
            listener.close()


def test_a_socket_outside_a_reuseport_group_is_refused_and_a_refusal_is_logged_once(monkeypatch, events):
    with socket.socket() as plain:
        assert workers.steer_by_address(plain, 2) is False
    # A kernel that refuses the program (before Linux 4.5): warned, once.
    monkeypatch.setattr(workers, "steer_by_address", lambda sock, count: False)
    monkeypatch.setattr(workers, "_steering_warned", False)
    for _ in range(2):
        workers.reuseport_socket(ListenAddress("127.0.0.1", 0), socket.SOCK_STREAM, steer=2).close()
    refused = [e for e in events if "worker_affinity" in e.get("log_format", "")]
    assert len(refused) == 1 and "spread by address pair" in refused[0]["log_format"]
