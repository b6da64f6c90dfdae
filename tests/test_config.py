import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtop.config import ConfigError, ListenAddress, load_config, load_config_data, parse_listen, require_database

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
    # "sever" is one edit from "server" (an error since issue 17); "levle"
    # is two (a transposition), so still a warning.
    config = load_config_data({**_data(), "colour": {}, "log": {"levle": "x"}}, str(confdir / "m.yaml"))
    assert any("colour" in w for w in config.warnings)
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


@pytest.mark.parametrize("value,expected", [(None, 30), (0, 0), (365, 365)])
def test_history_days(value, expected):
    db = {"history_days": value} if value is not None else {}
    assert load_config_data({"db": db}, check_files=False).db.history_days == expected


@pytest.mark.parametrize("value", [-1, 3651, "30d", True, 1.5])
def test_bad_history_days(value):
    with pytest.raises(ConfigError, match="db.history_days: .* is not a number of days from 0 .keep no history. to 3650"):
        load_config_data({"db": {"history_days": value}}, check_files=False)


@pytest.mark.parametrize("value,expected", [(None, 1), (4, 4), ("auto", 0), ("AUTO", 0)])
def test_workers(value, expected):
    server = {"workers": value} if value is not None else {}
    assert load_config_data({"server": server}, check_files=False).server.workers == expected


@pytest.mark.parametrize("value", [0, 257, "many", True, 1.5])
def test_bad_workers(value):
    with pytest.raises(ConfigError, match="server.workers: .* is not a number of processes from 1 to 256 or 'auto'"):
        load_config_data({"server": {"workers": value}}, check_files=False)


@pytest.mark.parametrize("value,expected", [(None, "address"), ("address", "address"), ("Connection", "connection")])
def test_worker_affinity(value, expected):
    server = {"worker_affinity": value} if value is not None else {}
    assert load_config_data({"server": server}, check_files=False).server.worker_affinity == expected


@pytest.mark.parametrize("value", ["client", "", 1])
def test_bad_worker_affinity(value):
    with pytest.raises(ConfigError, match="server.worker_affinity: .* is not one of address, connection"):
        load_config_data({"server": {"worker_affinity": value}}, check_files=False)


def test_worker_command_line_keeps_twistd_options_without_the_pid_file():
    from mtop.workers import TWISTD, worker_argv

    argv = ["/usr/bin/twistd", "--pidfile", "/run/mtop.pid", "-r", "asyncio", "--logger", "mtop.logs.json", "mtop", "--config", "/etc/mtop/mtop.yaml"]
    assert worker_argv(argv)[1:] == [
        "-c", TWISTD, "--pidfile=", "--nodaemon", "-r", "asyncio", "--logger", "mtop.logs.json", "mtop", "--config", "/etc/mtop/mtop.yaml",
    ]
    assert "--pidfile=/x" not in worker_argv(["twistd", "--pidfile=/x", "-n", "mtop"])


# ---------------------------------------------------------------------------
# Issue 17: a listen value or a key that would expose the server by mistake,
# the original's own keys, a missing SQLite database.


@pytest.mark.parametrize("value", [29643, "29643"])
@pytest.mark.parametrize(
    "where,key",
    [
        (lambda v: {"server": {"listen": v}}, "server.listen"),
        (lambda v: {"listeners": [{"listen": v}]}, "listeners[0].listen"),
        (lambda v: {"metrics": {"listen": v}}, "metrics.listen"),
    ],
)
def test_a_bare_port_is_an_error_with_both_spellings(confdir, where, key, value):
    data = _data()
    for section, content in where(value).items():
        data[section] = {**data[section], **content} if section == "server" else content
    with pytest.raises(ConfigError) as e:
        load_config_data(data, str(confdir / "mtop.yaml"))
    message = str(e.value)
    assert message.startswith(f"{key}: 29643 ")
    assert "':29643' to listen on all interfaces" in message
    assert "'127.0.0.1:29643' for this machine only" in message


def test_a_bare_port_is_no_fallback(confdir):
    with pytest.raises(ConfigError, match=r"server.fallback: .* needs a host and a port"):
        load_config_data(_data(fallback=8080), str(confdir / "mtop.yaml"))


@pytest.mark.parametrize(
    "data,message",
    [
        ({"server": {"lisen": "127.0.0.1:1"}}, "server.lisen: unknown key; did you mean server.listen?"),
        ({"server": {"Listen": "127.0.0.1:1"}}, "server.Listen: unknown key; did you mean server.listen?"),
        ({"server": {"listenn": "127.0.0.1:1"}}, "did you mean server.listen?"),
        ({"listeners": [{"lsten": "127.0.0.1:1"}]}, "listeners[0].lsten: unknown key; did you mean listeners[0].listen?"),
        ({"metrics": {"listn": "127.0.0.1:1"}}, "metrics.listn: unknown key; did you mean metrics.listen?"),
        ({"sever": {}}, "sever: unknown key; did you mean server?"),
        ({"db": {"DSN": "x.db"}}, "db.DSN: unknown key; did you mean db.dsn?"),
    ],
)
def test_a_key_one_edit_from_a_known_one_is_an_error(confdir, data, message):
    base = _data()
    for section, content in data.items():
        base[section] = {**base[section], **content} if section == "server" else content
    with pytest.raises(ConfigError) as e:
        load_config_data(base, str(confdir / "mtop.yaml"))
    assert message in str(e.value)


def test_the_originals_db_debug_is_a_known_key(confdir):
    path = confdir / "mtop.yaml"
    path.write_text(ORIGINAL + "  debug: true\n")
    assert load_config(str(path)).warnings == ()
    path.write_text(ORIGINAL + "  debug: yes please\n")
    with pytest.raises(ConfigError, match="db.debug"):
        load_config(str(path))


def test_a_missing_sqlite_database_names_the_file_and_the_command(confdir):
    path = confdir / "mtop.yaml"
    path.write_text(ORIGINAL)
    config = load_config(str(path))
    with pytest.raises(ConfigError) as e:
        require_database(config)
    assert str(e.value) == (
        f"db.dsn: the SQLite database {confdir / 'mtop.db'} does not exist; "
        f"create it with: mtopctl -c {path} db init"
    )
    # mtopctl loads the same config to create the file: loading never asks.
    assert load_config(str(path), check_files=False).db.dsn == str(confdir / "mtop.db")
    (confdir / "mtop.db").touch()
    require_database(config)


def test_only_sqlite_databases_are_checked_for_a_file(confdir):
    data = _data()
    data["db"] = {"driverName": "psql", "dsn": "postgres://postgres@127.0.0.1/mtop"}
    require_database(load_config_data(data, str(confdir / "mtop.yaml")))


def test_a_fixed_destination_per_listener(confdir):
    config = load_config_data(
        {
            "server": {"crt": "server.crt", "key": "server.key", "destination": "127.0.0.1:8388"},
            "listeners": [{"type": "tls"}, {"type": "quic", "destination": "[::1]:53"}],
        },
        str(confdir / "mtop.yaml"),
        check_files=False,
    )
    assert [listener.destination for listener in config.listeners] == [("127.0.0.1", 8388), ("::1", 53)]
    assert load_config_data(_data(), str(confdir / "mtop.yaml")).listeners[0].destination is None
    with pytest.raises(ConfigError, match=r"server.destination: ':8388' needs a host and a port"):
        load_config_data(_data(destination=":8388"), str(confdir / "mtop.yaml"))
    with pytest.raises(ConfigError, match=r"listeners\[0\].destination: 'ss' has no port"):
        load_config_data({**_data(), "listeners": [{"destination": "ss"}]}, str(confdir / "mtop.yaml"))


def test_websocket_listeners(confdir):
    import ipaddress

    path = str(confdir / "mtop.yaml")
    config = load_config_data(
        {
            "server": {"crt": "server.crt", "key": "server.key", "ws_ping_interval": "20s"},
            "listeners": [
                {"type": "wss", "path": "/t"},
                {"type": "ws", "path": "/t"},
                {"type": "ws", "listen": "[::1]:8081", "trusted_proxies": ["10.0.0.0/8"]},
            ],
        },
        path,
        check_files=False,
    )
    wss, ws, other = config.listeners
    assert (wss.type, wss.path, wss.trusted_proxies, wss.listen.port) == ("wss", "/t", (), 443)
    # A ws listener is for a proxy on this host: loopback, trusted, by default.
    assert (ws.listen.host, ws.listen.port) == ("127.0.0.1", 8080)
    assert ws.trusted_proxies == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert other.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),) and other.path == "/"
    assert config.server.ws_ping_interval == 20.0 and not config.warnings
    # No certificate needed for ws alone.
    alone = load_config_data({"server": {"type": "ws"}}, path)
    assert alone.listeners[0].listen.host == "127.0.0.1"
    # On every interface: a warning (passwords in the clear).
    open_ws = load_config_data({"server": {"type": "ws", "listen": ":8080"}}, path)
    assert any("in the clear" in w for w in open_ws.warnings)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"server": {"type": "ws", "path": "tunnel"}}, r"server.path: 'tunnel' is not a request path"),
        ({"server": {"type": "ws", "path": "/a?b"}}, r"server.path: '/a\?b' is not a request path"),
        ({"server": {"type": "ws"}, "listeners": [{"type": "tls", "path": "/t"}]}, r"listeners\[0\].path: only WebSocket"),
        ({"server": {"type": "ws", "trusted_proxies": ["nope"]}}, r"server.trusted_proxies: 'nope' is not a network"),
        ({"server": {"type": "wss2"}}, r"server.type: 'wss2' is not one of tls, quic, wss, ws"),
    ],
)
def test_websocket_errors_name_the_key(confdir, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config_data(data, str(confdir / "mtop.yaml"), check_files=False)


def test_admin_section(confdir):
    path = str(confdir / "mtop.yaml")
    base = {"server": {"crt": "server.crt", "key": "server.key"}}
    assert load_config_data(base, path, check_files=False).admin.listen is None
    local = load_config_data({**base, "admin": {"listen": "127.0.0.1:8444"}}, path, check_files=False).admin
    assert (local.listen.port, local.tls) == (8444, False)
    tls = load_config_data({**base, "admin": {"listen": ":8444", "tls": True}}, path, check_files=False).admin
    assert tls.tls and tls.crt.endswith("server.crt") and tls.key.endswith("server.key")
    with pytest.raises(ConfigError, match=r"admin.listen: :8444 without TLS would carry admin passwords"):
        load_config_data({**base, "admin": {"listen": ":8444"}}, path, check_files=False)
    with pytest.raises(ConfigError, match="admin.crt and admin.key: give both"):
        load_config_data({**base, "admin": {"listen": ":8444", "crt": "a.crt"}}, path, check_files=False)
