"""Inputs the parser properties (tests/fuzz) and their review found that
raised something other than the typed error, hung, or showed a password."""

import time

import pytest

from climber.config import load_climber_config, load_climber_data
from mtop.config import ConfigError, load_config, load_config_data, parse_listen
from mtop.dsn import DSNError, check_postgres_dsn, parse_mysql_dsn
from mtop.urls import ServerLink, URLError, make_url, parse_url


@pytest.mark.parametrize("text", [":\u00b2", "127.0.0.1:\u00b3", "[::1]:\u00b9"])
def test_listen_port_in_non_ascii_digits_is_a_config_error(text):
    # '²'.isdigit() is true, int('²') raises ValueError.
    with pytest.raises(ConfigError, match="not a number"):
        parse_listen(text)


def test_duration_beyond_float_range_is_a_config_error():
    with pytest.raises(ConfigError, match="handshake_timeout"):
        load_config_data({"server": {"handshake_timeout": 10**400}}, check_files=False)


def test_lone_surrogate_in_text_is_a_config_error():
    with pytest.raises(ConfigError, match="server.proto"):
        load_config_data({"server": {"proto": "\ud800"}}, check_files=False)
    with pytest.raises(ConfigError, match="servers.0..username"):
        load_climber_data({"socks5": {}, "servers": [{"host": "h:1", "username": "\ud800", "password": "x"}]})


@pytest.mark.parametrize(
    "text",
    [
        "a: 2001-02-30",  # ValueError from datetime
        "a: 2001-12-14 21:59:43.10 +25:00",
        "a: !!int Secret-x",  # ValueError quoting the value
        "a: !!float Secret-x",
        "a: !!bool Secret-x",  # KeyError
        "a: !!timestamp Secret-x",  # AttributeError
        "[" * 3000 + "]" * 3000,  # RecursionError
        "{a: " * 3000 + "1" + "}" * 3000,
        'server:\n  proto: "\\ud800"',  # valid YAML, but not text: refused by the loaders
    ],
)
def test_yaml_the_library_cannot_construct_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for load in (lambda p: load_config(p, check_files=False), load_climber_config):
        with pytest.raises(ConfigError) as error:
            load(str(path))
        assert "Secret-x" not in str(error.value)


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 12):  # 9**12 leaves when printed in full
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("server:\n  listen: *a11\n  proto: *a11")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load_config(str(path), check_files=False)
    assert time.monotonic() - started < 5
    assert len(str(error.value)) < 2000


@pytest.mark.parametrize("dsn", ["u:pw@tcp(h:\u00b2)/db", "u:pw@tcp(h:0)/db", "u:pw@tcp(h:70000)/db"])
def test_mysql_dsn_port_must_be_an_ascii_port_number(dsn):
    with pytest.raises(DSNError, match="1 to 65535"):
        parse_mysql_dsn(dsn)


@pytest.mark.parametrize(
    "dsn, secret",
    [
        ("host=x password=Abc-1 Def-2", "Def-2"),  # libpq: missing "=" after "Def-2"
        ("postgresql://u:P%zzSecret@h/db", "P%zzSecret"),  # invalid percent-encoded token: "P%zzSecret"
        ("postgres://u:Pw-3@[::1", "Pw-3"),  # quotes the whole URI
        ("postgres://u:Pw-4@h/db?password=Pw-5&bogus=1", "Pw-5"),
    ],
)
def test_postgres_dsn_errors_never_show_the_password(dsn, secret):
    with pytest.raises(DSNError) as error:
        check_postgres_dsn(dsn)
    assert secret not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config_data({"db": {"driverName": "psql", "dsn": dsn}}, check_files=False)
    assert secret not in str(error.value)


@pytest.mark.parametrize(
    "url",
    ["mtop://:pw@h:1/tls", "mtop://" + "u" * 256 + ":pw@h:1/tls", "mtop://u:" + "p" * 256 + "@h:1/tls", "mtop://u:\ud800@h:1/tls"],
)
def test_links_mtop_cannot_carry_are_url_errors(url):
    # Accepted before: every tunnel then failed with a ValueError in encode_auth.
    with pytest.raises(URLError):
        parse_url(url)
    with pytest.raises(ConfigError):
        load_climber_data({"socks5": {}, "servers": [{"url": url}]})


def test_make_url_refuses_what_mtop_cannot_carry():
    for link in (ServerLink("", "p", "h", 1), ServerLink("u", "p" * 256, "h", 1), ServerLink("u\ud800", "p", "h", 1)):
        with pytest.raises(URLError):
            make_url(link)


@pytest.mark.parametrize(
    "url, secret",
    [
        ("mtop://u:Pass/word-1@h:443/tls", "Pass"),  # urlsplit: port 'Pass' not an integer
        ("mtop://u:Pass\uff03word@h:443/tls", "Pass"),  # urlsplit: netloc quoted (NFKC)
        ("mtop://u:Pa?ss@h:443/tls", "Pa"),
    ],
)
def test_link_errors_never_show_the_password(url, secret):
    with pytest.raises(URLError) as error:
        parse_url(url)
    assert secret not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_climber_data({"socks5": {}, "servers": [{"url": url}]})
    assert secret not in str(error.value)


@pytest.mark.parametrize(
    "document, secret",
    [
        ({"socks5": {}, "servers": [{"host": "h:1", "username": "u", "password": ["Listed-pw-1"]}]}, "Listed-pw-1"),
        ({"socks5": {}, "servers": ["mtop://u:Item-pw-2@h:1/tls"]}, "Item-pw-2"),
        ({"socks5": {"listen": "127.0.0.1:0", "username": "u", "password": {"x": "Map-pw-3"}}, "servers": []}, "Map-pw-3"),
    ],
)
def test_climber_config_errors_never_show_passwords(document, secret):
    with pytest.raises(ConfigError) as error:
        load_climber_data(document)
    assert secret not in str(error.value)


def test_config_errors_never_show_dsn_passwords():
    for dsn in (["root:List-pw@tcp(h:1)/db"], "root:Go-pw@tcp(h:1)/", "mysql://root:Url-pw@h:1/"):
        with pytest.raises(ConfigError) as error:
            load_config_data({"db": {"driverName": "mysql", "dsn": dsn}}, check_files=False)
        assert "-pw" not in str(error.value), str(error.value)


def test_config_repr_hides_the_dsn():
    config = load_config_data({"db": {"driverName": "psql", "dsn": "postgres://u:Repr-pw-4@h/db"}}, check_files=False)
    assert "Repr-pw-4" not in repr(config)
    assert config.db.dsn == "postgres://u:Repr-pw-4@h/db"


def test_database_errors_and_settings_hide_the_dsn_password():
    from mtop.database import DatabaseError, DBSettings

    error = DatabaseError("cannot connect to PostgreSQL: bad URI \"postgres://u:Db-pw-6@h/db\"")
    assert "Db-pw-6" not in str(error)
    settings = DBSettings("postgres", "postgres://u:Db-pw-7@h/db")
    assert "Db-pw-7" not in repr(settings) and settings.dsn.endswith("@h/db")


@pytest.mark.parametrize(
    "document",
    [
        {"socks5": {}, "servers": [{"host": None}]},  # TypeError: cannot unpack None
        {"socks5": {}, "servers": [{"host": "h:1", "username": "u", "password": "p"}], "forward": [{"listen": None, "target": "h:1"}]},
        {"socks5": {}, "servers": [{"host": "h:1", "username": "u", "password": "p"}], "forward": [{"listen": "127.0.0.1:0", "target": None}]},
    ],
)
def test_climber_keys_without_values_are_config_errors(document):
    with pytest.raises(ConfigError):
        load_climber_data(document)


def test_postgres_uri_password_with_an_unencoded_slash_is_not_quoted():
    # libpq: invalid percent-encoded token: "%:Zq0000000000"
    with pytest.raises(DSNError) as error:
        check_postgres_dsn("postgres://::%:Pw-slash-8/@127.0.0.1/mtop?sslmode=disable")
    assert "Pw-slash-8" not in str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0001-10-01", "0001-10-01 00:00:00"),  # strftime's %Y gave '1-10-01 00:00:00'
        ("2027-01-31T12:00Z", "2027-01-31 12:00:00"),
        ("2027-01-31 12:00:00.5", "2027-01-31 12:00:00"),
    ],
)
def test_mtopctl_dates_are_always_sql_timestamps(text, expected):
    from mtop.ctl import _date

    assert _date(text) == expected


@pytest.mark.parametrize("text", ["0001-01-01T00:00+01:00", "9999-12-31T23:59-01:00"])
def test_mtopctl_dates_outside_the_utc_range_are_argument_errors(text):
    import argparse

    from mtop.ctl import _date

    # OverflowError from astimezone before.
    with pytest.raises(argparse.ArgumentTypeError, match="years 1 to 9999"):
        _date(text)


def test_acl_port_list_of_an_alias_bomb_is_refused_quickly():
    node = ["x"] * 9
    for _ in range(8):  # 9**9 leaves if printed in full
        node = [node] * 9
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load_config_data({"acl": {"allow_ports": [node]}}, check_files=False)
    assert time.monotonic() - started < 5 and len(str(error.value)) < 2000


def test_unknown_keys_with_lone_surrogates_are_warned_of_in_printable_text():
    config = load_config_data({"\ud800x": 1}, check_files=False)
    (warning,) = config.warnings
    warning.encode("utf-8")  # would raise before: twisted's log observer dropped the line
    assert "\\ud800x" in warning


def test_postgres_uri_fragments_overlapping_the_password_are_not_quoted():
    # libpq: invalid percent-encoded token: ":Pw-9@127.0.0.1/%" (the user is "/")
    with pytest.raises(DSNError) as error:
        check_postgres_dsn("postgres:///:Pw-overlap-9@127.0.0.1/%?sslmode=disable")
    assert "Pw-overlap-9" not in str(error.value)
