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
