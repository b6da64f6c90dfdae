"""Connection strings: the original's Go MySQL form, URLs, libpq; errors
never show the password."""

import pytest
import yaml

from mtop.config import ConfigError, load_config_data
from mtop.dsn import DSNError, check_postgres_dsn, describe_dsn, parse_mysql_dsn


@pytest.mark.parametrize(
    "dsn,expected",
    [
        ("root:pw@tcp(127.0.0.1:3306)/mtop", dict(user="root", password="pw", host="127.0.0.1", port=3306, database="mtop")),
        ("u:p@ss:w@tcp(db.example:3307)/m?charset=utf8&parseTime=true&timeout=5s",
         dict(user="u", password="p@ss:w", host="db.example", port=3307, database="m", charset="utf8", connect_timeout=5.0)),
        ("root@unix(/run/mysqld/mysqld.sock)/mtop", dict(user="root", unix_socket="/run/mysqld/mysqld.sock", database="mtop")),
        ("tcp([::1]:3306)/mtop", dict(host="::1", port=3306, database="mtop")),
        ("/mtop", dict(host="127.0.0.1", port=3306, database="mtop")),
        ("mysql://a%40b:p%2Fw@localhost:3308/mtop?tls=skip-verify",
         dict(user="a@b", password="p/w", host="localhost", port=3308, database="mtop")),
    ],
)
def test_mysql_dsn_forms(dsn, expected):
    parsed = parse_mysql_dsn(dsn)
    for key, value in expected.items():
        assert parsed[key] == value, key


@pytest.mark.parametrize("dsn", ["root:secret@tcp(h:x)/db", "root:secret@tcp(h:1)/", "root:secret@pipe(x)/db", "nonsense"])
def test_mysql_dsn_errors_hide_the_password(dsn):
    with pytest.raises(DSNError) as info:
        parse_mysql_dsn(dsn)
    assert "secret" not in str(info.value)


def test_postgres_dsn_forms_and_description():
    original = "postgres://postgres:secret@127.0.0.1/mtop?sslmode=disable"
    assert check_postgres_dsn(original) == original
    assert check_postgres_dsn("host=127.0.0.1 dbname=mtop user=root")
    assert describe_dsn("postgres", original) == "postgres postgres@127.0.0.1:5432/mtop"
    assert "secret" not in describe_dsn("mysql", "root:secret@tcp(h:1)/db")
    with pytest.raises(DSNError):
        check_postgres_dsn("host=x bogus")


@pytest.mark.parametrize(
    "name,driver", [("psql", "postgres"), ("postgres", "postgres"), ("postgresql", "postgres"), ("mysql", "mysql"), ("MariaDB", "mysql")]
)
def test_driver_names_are_normalised(name, driver):
    dsn = "postgres://postgres@127.0.0.1/mtop?sslmode=disable" if driver == "postgres" else "root:@tcp(127.0.0.1:3306)/mtop"
    config = load_config_data(yaml.safe_load(f"db: {{driverName: {name}, dsn: '{dsn}'}}"), check_files=False)
    assert config.db.driverName == driver and config.db.dsn == dsn


@pytest.mark.parametrize(
    "db,message",
    [
        ("{driverName: oracle}", "db.driverName: 'oracle' is not one of"),
        ("{driverName: psql}", "db.dsn is required for psql"),
        ("{driverName: mysql, dsn: 'root:secret@tcp(h:x)/db'}", "db.dsn: MySQL DSN port"),
    ],
)
def test_db_errors_name_the_key(db, message):
    with pytest.raises(ConfigError) as info:
        load_config_data(yaml.safe_load(f"db: {db}"), check_files=False)
    assert message in str(info.value)
    assert "secret" not in str(info.value)
