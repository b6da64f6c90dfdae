"""TCP Fast Open: climber's ``tcp_fast_open: true`` per server
(``TCP_FASTOPEN_CONNECT`` on its sockets) and the server's
``server.tcp_fast_open: N`` (``TCP_FASTOPEN`` on its TLS listening sockets).

The options are read back from the sockets with getsockopt, and tunnels run
with them on over loopback, whatever this machine's
``net.ipv4.tcp_fastopen`` is (`SYSCTL`, read at import: bit 1 lets clients
use Fast Open, bit 2 servers; without bit 1 the kernel refuses the client
option and climber must warn and go on without it).  Whether a SYN then
carries data depends on that sysctl and on a cookie from an earlier
connection; the tunnels must work either way.
"""

from __future__ import annotations

import os
import pathlib
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory

from helpers import EchoAfterEOF, echo_through

import climber.tunnel
import mtop.listening
from climber.config import ConfigError as ClimberConfigError
from climber.config import ServerEntry, load_climber_data
from climber.pool import ServerPool
from climber.tunnel import TCP_FASTOPEN_CONNECT, TunnelOpener
from mtop.config import ConfigError, ListenAddress, ListenerConfig, load_config_data
from mtop.listeners import PreparedListener, listener_services
from mtop.listening import TCP_FASTOPEN
from mtop.tls import server_context

SYSCTL_PATH = pathlib.Path("/proc/sys/net/ipv4/tcp_fastopen")
#: This machine's net.ipv4.tcp_fastopen (1 on a stock Debian 12: client
#: only), or None where there is no such file.
SYSCTL = int(SYSCTL_PATH.read_text()) if SYSCTL_PATH.exists() else None
CLIENT_ALLOWED = SYSCTL is not None and bool(SYSCTL & 1)
QUEUE = 64
#: An option number no kernel knows, to make setsockopt fail for real.
UNKNOWN_OPTION = 0x7FFF


def test_this_machine_has_the_fast_open_sysctl():
    assert SYSCTL is not None, f"{SYSCTL_PATH} is missing: TCP Fast Open needs Linux"


# The server's config


@pytest.fixture
def confdir(tmp_path):
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    return tmp_path


def load_server(confdir, listeners=None, **server):
    data = {"server": {"crt": "server.crt", "key": "server.key", **server}}
    if listeners is not None:
        data["listeners"] = listeners
    return load_config_data(data, str(confdir / "mtop.yaml"))


def test_server_tcp_fast_open_is_off_by_default_and_reaches_every_tls_listener(confdir):
    config = load_server(confdir)
    assert config.server.tcp_fast_open == 0 and config.listeners[0].tcp_fast_open == 0
    config = load_server(confdir, tcp_fast_open=QUEUE)
    assert config.listeners[0].tcp_fast_open == QUEUE
    config = load_server(confdir, listeners=[{"type": "tls"}, {"type": "quic"}], tcp_fast_open=QUEUE)
    assert [listener.tcp_fast_open for listener in config.listeners] == [QUEUE, 0]


@pytest.mark.parametrize(
    "server, message",
    [
        ({"tcp_fast_open": -1}, "server.tcp_fast_open: -1 is not a TCP Fast Open queue length from 0 (off) to 65535"),
        ({"tcp_fast_open": 70000}, "server.tcp_fast_open: 70000 is not a TCP Fast Open queue length"),
        ({"tcp_fast_open": True}, "server.tcp_fast_open: True is not a TCP Fast Open queue length"),
        ({"tcp_fast_open": "on"}, "server.tcp_fast_open: 'on' is not a TCP Fast Open queue length"),
        ({"type": "quic", "tcp_fast_open": 16}, "server.tcp_fast_open: TCP Fast Open is for TLS on TCP, not for QUIC"),
    ],
)
def test_bad_server_tcp_fast_open_is_a_config_error(confdir, server, message):
    with pytest.raises(ConfigError) as info:
        load_server(confdir, **server)
    assert message in str(info.value)


# climber's config


def climber_servers(**keys):
    entry = {"host": "s.example:443", "username": "u", "password": "p", **keys}
    return load_climber_data({"socks5": {}, "servers": [entry]}).servers


def test_climber_tcp_fast_open_is_off_unless_asked():
    assert climber_servers()[0].tcp_fast_open is False
    assert climber_servers(tcp_fast_open=True)[0].tcp_fast_open is True


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"tcp_fast_open": "yes"}, "servers[0].tcp_fast_open: 'yes' is not a boolean"),
        ({"tcp_fast_open": 1}, "servers[0].tcp_fast_open: 1 is not a boolean"),
        ({"type": "quic", "tcp_fast_open": True}, "servers[0].tcp_fast_open: server s.example:443 is QUIC (UDP)"),
    ],
)
def test_bad_climber_tcp_fast_open_is_a_config_error(keys, message):
    with pytest.raises(ClimberConfigError) as info:
        climber_servers(**keys)
    assert message in str(info.value)


# On sockets, over loopback


def option(fd: int, name: int) -> int:
    """A TCP option of the socket ``fd`` (read through a copy of it)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, name)


@pytest.fixture
def fast_open_listener(server):
    """A TLS listener of the in-process server made as the server makes
    its own (`mtop.listeners.TLSListener`), with tcp_fast_open; yields
    (service, port number, certificate paths)."""
    factory, _, paths = server
    config = ListenerConfig(
        "tls", ListenAddress("127.0.0.1", 0), paths.server_crt, paths.server_key, "mtop", tcp_fast_open=QUEUE
    )
    context = server_context(paths.server_crt, paths.server_key, "mtop")
    (service,) = listener_services([PreparedListener(config, context)], factory, reactor, 5)
    service.startService()
    yield service, service.port.getHost().port, paths
    service.stopService()


@pytest.fixture
def echo_target():
    port = reactor.listenTCP(0, Factory.forProtocol(EchoAfterEOF), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def fast_open_opener(port, paths, host="127.0.0.1"):
    entry = ServerEntry(host, port, "alice", "pw", ca=paths.ca_crt, tcp_fast_open=True)
    return TunnelOpener(reactor, ServerPool((entry,), "failover", reactor))


def fast_open_warnings(events) -> list:
    return [e for e in events if "tcp_fast_open" in e.get("log_format", "")]


def test_the_server_sets_tcp_fastopen_on_its_tls_listening_socket(fast_open_listener):
    service, _, _ = fast_open_listener
    # Linux takes the option whatever the sysctl; it reads back as the queue.
    assert option(service.port.fileno(), TCP_FASTOPEN) == QUEUE


def test_a_listener_without_tcp_fast_open_leaves_it_off(server):
    factory, _, paths = server
    config = ListenerConfig("tls", ListenAddress("127.0.0.1", 0), paths.server_crt, paths.server_key, "mtop")
    (service,) = listener_services([PreparedListener(config, None)], factory, reactor, 5)
    service.startService()
    try:
        assert option(service.port.fileno(), TCP_FASTOPEN) == 0
    finally:
        service.stopService()


def test_a_kernel_refusing_the_server_option_gets_a_warning_and_the_listener_goes_on(server, monkeypatch, events):
    monkeypatch.setattr(mtop.listening, "TCP_FASTOPEN", UNKNOWN_OPTION)
    factory, _, paths = server
    config = ListenerConfig(
        "tls", ListenAddress("127.0.0.1", 0), paths.server_crt, paths.server_key, "mtop", tcp_fast_open=QUEUE
    )
    (service,) = listener_services([PreparedListener(config, None)], factory, reactor, 5)
    service.startService()
    try:
        assert service.port is not None
        (warning,) = fast_open_warnings(events)
        assert warning["log_level"].name == "warn"
        assert "listening without TCP Fast Open" in warning["log_format"]
    finally:
        service.stopService()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_tunnels_with_fast_open_on_both_sides(fast_open_listener, echo_target, events, host):
    """Two tunnels (the second may carry its ClientHello in the SYN, given
    a server cookie from the first and the server bit of the sysctl), to
    an address (connectTCP) and to a name (HostnameEndpoint)."""
    _, port, paths = fast_open_listener
    opener = fast_open_opener(port, paths, host)
    for payload in (b"first", b"second"):
        tunnel = await opener.open("127.0.0.1", echo_target, 5)
        tcp = tunnel.transport.tcp.getHandle().fileno()
        if CLIENT_ALLOWED:
            assert option(tcp, TCP_FASTOPEN_CONNECT) == 1, f"net.ipv4.tcp_fastopen is {SYSCTL}"
        assert await echo_through(tunnel, payload) == b"got:" + payload
    (connector,) = opener.connectors.values()
    if CLIENT_ALLOWED:
        assert connector.fast_open and fast_open_warnings(events) == []
    else:
        # net.ipv4.tcp_fastopen without bit 1: refused, warned about once.
        assert not connector.fast_open and len(fast_open_warnings(events)) == 1, f"net.ipv4.tcp_fastopen is {SYSCTL}"


@pytest_twisted.ensureDeferred
async def test_a_kernel_refusing_the_client_option_gets_one_warning_and_tunnels_go_on(
    fast_open_listener, echo_target, events, monkeypatch
):
    monkeypatch.setattr(climber.tunnel, "TCP_FASTOPEN_CONNECT", UNKNOWN_OPTION)
    _, port, paths = fast_open_listener
    opener = fast_open_opener(port, paths)
    for payload in (b"one", b"two"):
        tunnel = await opener.open("127.0.0.1", echo_target, 5)
        assert option(tunnel.transport.tcp.getHandle().fileno(), TCP_FASTOPEN_CONNECT) == 0
        assert await echo_through(tunnel, payload) == b"got:" + payload
    (warning,) = fast_open_warnings(events)
    assert warning["log_level"].name == "warn" and warning["server"] == f"127.0.0.1:{port}"
    (connector,) = opener.connectors.values()
    assert not connector.fast_open


def test_changing_the_server_fast_open_queue_needs_a_restart(tmp_path):
    """The listening socket is made at start: a reload that changes
    ``server.tcp_fast_open`` says it needs a restart (as for other listener
    changes) rather than pretending to apply it."""
    from mtop.settings import restart_needed

    server = {"listen": "127.0.0.1:8443", "crt": "server.crt", "key": "server.key", "proto": "mtop"}
    before = load_config_data({"server": server}, str(tmp_path / "mtop.yaml"), check_files=False)
    after = load_config_data({"server": {**server, "tcp_fast_open": 64}}, str(tmp_path / "mtop.yaml"), check_files=False)
    assert restart_needed(before, after) == ["listeners"]
    assert restart_needed(after, after) == []
