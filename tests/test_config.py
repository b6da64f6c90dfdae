import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtop.config import ConfigError, ListenAddress, load_config, load_config_data, parse_listen

ORIGINAL = """
server:
  type: tls
  listen: :443
  crt: ./server.crt
  key: ./server.key
  proto: mtop
log:
  level: info
db:
  driverName: sqlite
  dsn: ./mtop.db
"""


@pytest.fixture
def confdir(tmp_path):
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    return tmp_path


def test_original_config_loads_unchanged(confdir):
    path = confdir / "mtop.yaml"
    path.write_text(ORIGINAL)
    config = load_config(str(path))
    assert config.server.listen == ListenAddress(None, 443)
    assert config.server.crt == str(confdir / "server.crt")
    assert config.db.dsn == str(confdir / "mtop.db")
    assert config.server.proto == "mtop"
    assert config.server.handshake_timeout == 10.0
    assert config.server.idle_timeout == 300.0
    assert config.warnings == ()


@pytest.mark.parametrize(
    "text,expected",
    [
        (":443", ListenAddress(None, 443)),
        ("127.0.0.1:8443", ListenAddress("127.0.0.1", 8443)),
        ("[::1]:443", ListenAddress("::1", 443)),
        ("localhost:0", ListenAddress("localhost", 0)),
    ],
)
def test_listen_forms(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["443x", "::1:443", "[::1]443", "host:70000", "host:", "", "[]:1"])
def test_bad_listen_names_key_and_value(text):
    with pytest.raises(ConfigError) as e:
        parse_listen(text)
    assert "server.listen" in str(e.value)


def _data(**server):
    base = {"crt": "server.crt", "key": "server.key"}
    base.update(server)
    return {"server": base}


@pytest.mark.parametrize(
    "server,fragment",
    [
        ({"type": "udp"}, "server.type"),
        ({"handshake_timeout": "soon"}, "server.handshake_timeout"),
        ({"handshake_timeout": -1}, "server.handshake_timeout"),
        ({"reply_errors": "yes"}, "server.reply_errors"),
        ({"proto": ""}, "server.proto"),
        ({"tls_min_version": "1.1"}, "server.tls_min_version"),
    ],
)
def test_bad_values_name_the_key(confdir, server, fragment):
    with pytest.raises(ConfigError) as e:
        load_config_data(_data(**server), str(confdir / "mtop.yaml"))
    assert fragment in str(e.value)


def test_missing_certificate_names_the_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config_data(_data(), str(tmp_path / "mtop.yaml"))
    assert str(tmp_path / "server.crt") in str(e.value)


def test_unknown_keys_warn(confdir):
    config = load_config_data({**_data(), "sever": {}, "log": {"levle": "x"}}, str(confdir / "m.yaml"))
    assert any("sever" in w for w in config.warnings)
    assert any("log.levle" in w for w in config.warnings)


def test_durations(confdir):
    config = load_config_data(
        _data(handshake_timeout="500ms", idle_timeout="2m", connect_timeout=3), str(confdir / "m.yaml")
    )
    assert config.server.handshake_timeout == 0.5
    assert config.server.idle_timeout == 120
    assert config.server.connect_timeout == 3


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "line" in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "nope.yaml"))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)))
def test_any_document_loads_or_is_a_config_error(document):
    try:
        load_config_data(document, "/nonexistent/m.yaml", check_files=False)
    except ConfigError:
        pass


def test_hardening_defaults(confdir):
    path = confdir / "mtop.yaml"
    path.write_text(ORIGINAL)
    config = load_config(str(path))
    assert config.acl.refusal("127.0.0.1", 80) is not None  # loopback refused unless allowed
    assert config.limits.max_tunnels is None and config.limits.max_handshakes == 1024
    assert config.limits.max_per_client == 512 and config.limits.max_handshakes_per_client == 64
    assert (config.auth_throttle.max_failures, config.auth_throttle.window, config.auth_throttle.ban) == (10, 60, 300)
    assert config.auth_throttle.max_in_flight == 4
    assert config.server.auth_failure_delay == 0.5
    assert config.server.fallback is None
    assert [listener.proxy_protocol for listener in config.listeners] == [False]


def test_hardening_keys(confdir):
    config = load_config_data(
        {
            "server": {"crt": "server.crt", "key": "server.key", "fallback": "127.0.0.1:8080", "proxy_protocol": True, "auth_failure_delay": 0},
            "listeners": [{"type": "tls"}, {"type": "tls", "listen": ":8443", "proxy_protocol": False}, {"type": "quic"}],
            "limits": {"max_tunnels": 100, "max_handshakes": 0, "max_per_client": 8},
            "auth_throttle": {"max_failures": 3, "window": "30s", "ban": "1h"},
        },
        str(confdir / "mtop.yaml"),
        check_files=False,
    )
    assert config.server.fallback == ("127.0.0.1", 8080)
    assert [listener.proxy_protocol for listener in config.listeners] == [True, False, False]
    assert (config.limits.max_tunnels, config.limits.max_handshakes, config.limits.max_per_client) == (100, 0, 8)
    assert (config.auth_throttle.max_failures, config.auth_throttle.window, config.auth_throttle.ban) == (3, 30, 3600)
    assert config.server.auth_failure_delay == 0


@pytest.mark.parametrize(
    "data,message",
    [
        ({"server": {"fallback": ":8080"}}, "server.fallback: ':8080' needs a host and a port"),
        ({"server": {"fallback": "web"}}, "server.fallback: 'web' has no port"),
        ({"server": {"type": "quic", "proxy_protocol": True}}, "server.proxy_protocol: the PROXY protocol is for TLS"),
        ({"listeners": [{"type": "quic", "proxy_protocol": True}]}, r"listeners\[0\].proxy_protocol: the PROXY protocol is for TLS"),
        ({"limits": {"max_per_client": -1}}, "limits.max_per_client: -1 is not a whole number"),
        ({"limits": {"max_tunnels": "many"}}, "limits.max_tunnels: 'many' is not a whole number"),
        ({"auth_throttle": {"window": 0}}, "auth_throttle.window: 0 must be a positive duration"),
        ({"auth_throttle": {"max_failures": True}}, "auth_throttle.max_failures: True is not a whole number"),
    ],
)
def test_hardening_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config_data(data, check_files=False)


def test_limits_from_the_open_files_limit():
    import resource

    from mtop.config import LimitsConfig
    from mtop.limits import RESERVED_FILES, limit_settings

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    derived = limit_settings(LimitsConfig()).max_tunnels
    assert derived == (0 if soft == resource.RLIM_INFINITY else max(16, (soft - RESERVED_FILES) // 2))
    assert limit_settings(LimitsConfig(max_tunnels=0)).max_tunnels == 0


@pytest.mark.parametrize("value,expected", [(None, 1), (4, 4), ("auto", 0), ("AUTO", 0)])
def test_workers(value, expected):
    server = {"workers": value} if value is not None else {}
    assert load_config_data({"server": server}, check_files=False).server.workers == expected


@pytest.mark.parametrize("value", [0, 257, "many", True, 1.5])
def test_bad_workers(value):
    with pytest.raises(ConfigError, match="server.workers: .* is not a number of processes from 1 to 256 or 'auto'"):
        load_config_data({"server": {"workers": value}}, check_files=False)


def test_worker_command_line_keeps_twistd_options_without_the_pid_file():
    from mtop.workers import TWISTD, worker_argv

    argv = ["/usr/bin/twistd", "--pidfile", "/run/mtop.pid", "-r", "asyncio", "--logger", "mtop.logs.json", "mtop", "--config", "/etc/mtop/mtop.yaml"]
    assert worker_argv(argv)[1:] == [
        "-c", TWISTD, "--pidfile=", "--nodaemon", "-r", "asyncio", "--logger", "mtop.logs.json", "mtop", "--config", "/etc/mtop/mtop.yaml",
    ]
    assert "--pidfile=/x" not in worker_argv(["twistd", "--pidfile=/x", "-n", "mtop"])
