"""QUIC in the configs and taps: ``listeners:``, ``server.type: quic``,
climber's ``type: quic`` servers, and the reactor check."""

import subprocess
import sys

import pytest
import yaml
from twisted.python import usage

from climber.tap import Options as ClimberOptions
from mtop.certs import init_certs
from mtop.config import ConfigError, ListenAddress, ListenerConfig, load_config_data
from mtop.tap import Options as ServerOptions

SERVER = {"listen": ":8443", "crt": "server.crt", "key": "server.key", "proto": "mtop"}


def load(data, tmp_path, check_files=False):
    return load_config_data(data, str(tmp_path / "mtop.yaml"), check_files=check_files)


def test_the_server_block_is_the_one_listener(tmp_path):
    config = load({"server": {**SERVER, "type": "quic"}}, tmp_path)
    assert config.listeners == (
        ListenerConfig("quic", ListenAddress(None, 8443), str(tmp_path / "server.crt"), str(tmp_path / "server.key"), "mtop"),
    )


def test_listeners_inherit_from_the_server_block(tmp_path):
    config = load(
        {"server": SERVER, "listeners": [{"type": "tls"}, {"type": "quic", "proto": "h3-mtop", "listen": "127.0.0.1:9443"}]},
        tmp_path,
    )
    tls, quic = config.listeners
    assert (tls.type, tls.listen, tls.proto) == ("tls", ListenAddress(None, 8443), "mtop")
    assert (quic.type, quic.listen, quic.proto, quic.crt) == ("quic", ListenAddress("127.0.0.1", 9443), "h3-mtop", tls.crt)


@pytest.mark.parametrize(
    "listeners,message",
    [
        ([{"type": "udp"}], "listeners[0].type: 'udp' is not one of tls, quic"),
        ([{"type": "tls"}, {"type": "tls"}], "listeners[1].listen: :8443 is already a tls listener"),
        ("quic", "listeners: expected a list"),
        ([], "listeners: expected a list"),
    ],
)
def test_listener_errors_name_the_key(tmp_path, listeners, message):
    with pytest.raises(ConfigError) as info:
        load({"server": SERVER, "listeners": listeners}, tmp_path)
    assert message in str(info.value)


def test_quic_packet_size(tmp_path):
    assert load({"server": SERVER}, tmp_path).server.quic_packet_size == 1350
    assert load({"server": {**SERVER, "quic_packet_size": 9000}}, tmp_path).server.quic_packet_size == 9000
    with pytest.raises(ConfigError, match=r"server.quic_packet_size: 1000 is not a UDP payload size from 1200"):
        load({"server": {**SERVER, "quic_packet_size": 1000}}, tmp_path)


def test_server_tap_refuses_another_chosen_reactor(tmp_path):
    # The suite's reactor is installed (and is not asyncio's): as with
    # ``twistd -r epoll``, the tap cannot change it and says what to run.
    init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    path = tmp_path / "mtop.yaml"
    path.write_text(yaml.safe_dump({"server": {**SERVER, "type": "quic"}, "db": {"dsn": "mtop.db"}}))
    with pytest.raises(usage.UsageError) as info:
        ServerOptions().parseOptions(["--config", str(path)])
    assert "run twistd without -r" in str(info.value)
    assert f"or: twistd -r asyncio mtop --config {path}" in str(info.value)


def test_server_tap_without_quic_needs_no_asyncio(tmp_path):
    init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    path = tmp_path / "mtop.yaml"
    path.write_text(yaml.safe_dump({"server": SERVER, "db": {"dsn": "mtop.db"}}))
    (tmp_path / "mtop.db").touch()  # the tap refuses a missing SQLite database
    options = ServerOptions()
    options.parseOptions(["--config", str(path)])
    assert [item.config.type for item in options.settings.listeners] == ["tls"]


def test_climber_tap_refuses_another_chosen_reactor():
    with pytest.raises(usage.UsageError) as info:
        ClimberOptions().parseOptions(["--server", "mtop://u:p@127.0.0.1:4433/quic?proto=mtop", "--insecure"])
    assert "QUIC runs on Twisted's asyncio reactor" in str(info.value)
    assert "twistd -r asyncio climber" in str(info.value)


#: Parses the tap's options in a fresh interpreter (no reactor installed, as
#: in ``twistd`` without ``-r``) and prints the reactor installed after.
_REACTOR_AFTER = """
import sys
from {module} import Options
Options().parseOptions(sys.argv[1:])
from twisted.internet import reactor
print(type(reactor).__name__)
"""


def _reactor_after(module, args, cwd):
    result = subprocess.run(
        [sys.executable, "-c", _REACTOR_AFTER.format(module=module), *args],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_taps_install_the_asyncio_reactor_for_quic_only(tmp_path):
    """Without ``-r``: QUIC configured gets the asyncio reactor, TLS alone
    keeps the default one (epoll), which costs less per connection."""
    init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    (tmp_path / "mtop.db").touch()
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"server": SERVER, "listeners": [{"type": "tls"}, {"type": "quic"}], "db": {"dsn": "mtop.db"}}))
    tls = tmp_path / "tls.yaml"
    tls.write_text(yaml.safe_dump({"server": SERVER, "db": {"dsn": "mtop.db"}}))
    assert _reactor_after("mtop.tap", ["--config", str(both)], tmp_path) == "AsyncioSelectorReactor"
    assert _reactor_after("mtop.tap", ["--config", str(tls)], tmp_path) == "EPollReactor"
    quic_link = "mtop://u:p@127.0.0.1:4433/quic?proto=mtop"
    tls_link = "mtop://u:p@127.0.0.1:4433/?proto=mtop"
    assert _reactor_after("climber.tap", ["--server", quic_link, "--insecure"], tmp_path) == "AsyncioSelectorReactor"
    assert _reactor_after("climber.tap", ["--server", tls_link, "--insecure"], tmp_path) == "EPollReactor"


@pytest.mark.parametrize(
    "section, error",
    [
        ({"backend": "foo"}, "quic.backend: 'foo' is not one of auto, qh3, aioquic"),
        ({"max_streams": 0}, "quic.max_streams: must be 1 to 65535, got 0"),
        ({"max_streams": 70000}, "quic.max_streams: must be 1 to 65535, got 70000"),
        ({"bakend": "qh3"}, "quic.bakend: unknown key; did you mean quic.backend?"),
    ],
)
def test_quic_section_errors_name_the_key(section, error):
    from mtop.config import ConfigError, load_config_data

    with pytest.raises(ConfigError) as raised:
        load_config_data({"quic": section}, check_files=False)
    assert str(raised.value) == error


def test_quic_section_defaults_and_values():
    from climber.config import load_climber_data
    from mtop.config import load_config_data

    assert load_config_data({}, check_files=False).quic.max_streams == 512
    config = load_config_data({"quic": {"backend": "aioquic", "max_streams": 300}}, check_files=False)
    assert (config.quic.backend, config.quic.max_streams) == ("aioquic", 300)
    climber = load_climber_data({
        "quic": {"backend": "qh3"},
        "socks5": {"listen": "127.0.0.1:1080"},
        "servers": [{"host": "127.0.0.1:443", "type": "quic", "username": "u", "password": "p"}],
    })
    assert [s.quic_backend for s in climber.servers] == ["qh3"]
