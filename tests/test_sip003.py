"""The SIP003 plugin environment (mtop.sip003, climber.sip003)."""

from __future__ import annotations

import pytest

from climber.sip003 import climber_data
from mtop.config import ConfigError, ServerConfig
from mtop.sip003 import from_environment, parse_options

ENV = {"SS_REMOTE_HOST": "0.0.0.0", "SS_REMOTE_PORT": "8443", "SS_LOCAL_HOST": "127.0.0.1", "SS_LOCAL_PORT": "8388"}


def test_options_follow_sip003_escaping():
    assert parse_options("config=/etc/mtop/mtop.yaml;type=quic") == {"config": "/etc/mtop/mtop.yaml", "type": "quic"}
    assert parse_options(r"password=a\;b\=c\\d;insecure") == {"password": "a;b=c\\d", "insecure": ""}
    assert parse_options("") == {}
    with pytest.raises(ConfigError, match="lone backslash"):
        parse_options("user=x\\")
    with pytest.raises(ConfigError, match="without a name"):
        parse_options("=x")


def test_the_environment_is_read_only_when_shadowsocks_set_it():
    assert from_environment({}) is None
    plugin = from_environment({**ENV, "SS_PLUGIN_OPTIONS": "type=tls"})
    assert plugin.remote == ("0.0.0.0", 8443) and plugin.local == ("127.0.0.1", 8388) and plugin.options == {"type": "tls"}
    with pytest.raises(ConfigError, match="SS_LOCAL_HOST/SS_LOCAL_PORT"):
        from_environment({**ENV, "SS_LOCAL_PORT": "none"})


def test_the_server_plugin_serves_one_listener_to_ss_server(tmp_path):
    from mtop.config import load_config_data
    from mtop.sip003 import server_config

    (tmp_path / "s.crt").write_text("x")
    (tmp_path / "s.key").write_text("x")
    config = load_config_data({"server": {"crt": "s.crt", "key": "s.key"}}, str(tmp_path / "mtop.yaml"))
    plugin = from_environment({**ENV, "SS_PLUGIN_OPTIONS": "type=quic"})
    (listener,) = server_config(plugin, config).listeners
    assert (listener.type, listener.listen.port, listener.destination) == ("quic", 8443, ("127.0.0.1", 8388))
    with pytest.raises(ConfigError, match="unknown option 'cert'"):
        server_config(from_environment({**ENV, "SS_PLUGIN_OPTIONS": "cert=x"}), config)
    assert ServerConfig().destination is None


def test_the_client_plugin_forwards_ss_local_to_the_server():
    data = climber_data(from_environment({**ENV, "SS_PLUGIN_OPTIONS": "user=alice;password=p\\;w;type=quic"}))
    assert data == {
        "servers": [{"host": "0.0.0.0:8443", "username": "alice", "password": "p;w", "type": "quic"}],
        "forward": [{"listen": "127.0.0.1:8388", "target": "0.0.0.0:8443"}],
    }
    with pytest.raises(ConfigError, match="user and password"):
        climber_data(from_environment({**ENV, "SS_PLUGIN_OPTIONS": "type=tls"}))


@pytest.mark.parametrize("program", ["mtop-ss-plugin", "climber-ss-plugin"])
@pytest.mark.parametrize("environment", [{}, {"SS_REMOTE_HOST": "", "SS_REMOTE_PORT": "", "SS_LOCAL_HOST": "127.0.0.1", "SS_LOCAL_PORT": "x"}])
def test_a_plugin_outside_shadowsocks_says_so(program, environment):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), program)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SS_")} | environment
    result = subprocess.run([script], capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"{program}: ") and "Traceback" not in result.stderr, result.stderr
