"""Start-up warnings for private keys and password-holding configs that
every user can read (`mtop.fileperms`), and password redaction
(`mtop.redact`)."""

import os

import pytest
import yaml

from climber.config import load_climber_config
from mtop import fileperms
from mtop.certs import init_certs
from mtop.config import load_config
from mtop.redact import redact, shown


def _write(path, data, mode):
    path.write_text(yaml.safe_dump(data))
    os.chmod(path, mode)
    return path


@pytest.fixture
def certs(tmp_path):
    return init_certs(str(tmp_path / "certs"), ["localhost"], ["127.0.0.1"])


def _server_doc(certs, dsn=None, listeners=None):
    doc = {"server": {"listen": "127.0.0.1:0", "crt": certs.server_crt, "key": certs.server_key}}
    if dsn:
        doc["db"] = {"driverName": "psql", "dsn": dsn}
    if listeners:
        doc["listeners"] = listeners
    return doc


def test_private_files_give_no_warning(tmp_path, certs):
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs, "postgres://u:Pw-1a2b3c@127.0.0.1/mtop"), 0o600)
    assert os.stat(certs.server_key).st_mode & 0o777 == 0o600  # cert init writes it so
    assert fileperms.startup_warnings(load_config(str(path))) == []


def test_key_readable_by_others_is_named_with_mode_and_fix(tmp_path, certs):
    os.chmod(certs.server_key, 0o644)
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs), 0o644)  # no password: the file may be public
    (warning,) = fileperms.startup_warnings(load_config(str(path)))
    assert certs.server_key in warning and "server.key" in warning
    assert "0644" in warning and f"chmod o-rwx {certs.server_key}" in warning


def test_group_readable_key_is_fine(tmp_path, certs):
    os.chmod(certs.server_key, 0o640)
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs), 0o644)
    assert fileperms.startup_warnings(load_config(str(path))) == []


def test_each_listener_key_is_checked_once(tmp_path, certs):
    other = tmp_path / "other.key"
    other.write_bytes(open(certs.server_key, "rb").read())
    os.chmod(other, 0o604)
    os.chmod(certs.server_key, 0o644)
    listeners = [{"type": "tls"}, {"type": "tls", "listen": "127.0.0.1:1", "key": str(other)}, {"type": "quic"}]
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs, listeners=listeners), 0o600)
    warnings = fileperms.startup_warnings(load_config(str(path)))
    assert len(warnings) == 2
    assert certs.server_key in warnings[0] and "listeners[0].key" in warnings[0]
    assert str(other) in warnings[1] and "0604" in warnings[1]


def test_config_with_a_dsn_password_readable_by_others(tmp_path, certs):
    password = "Dsn-pw-5e1f0a"
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs, f"postgres://u:{password}@127.0.0.1/mtop"), 0o644)
    (warning,) = fileperms.startup_warnings(load_config(str(path)))
    assert str(path) in warning and "db.dsn" in warning and "0644" in warning
    assert f"chmod o-rwx {path}" in warning
    assert password not in warning


@pytest.mark.parametrize(
    "dsn",
    ["host=127.0.0.1 password=Kw-pw-93ab dbname=mtop", "postgresql://u:Uri-pw-1c@127.0.0.1/mtop"],
)
def test_every_dsn_form_with_a_password_counts(tmp_path, certs, dsn):
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs, dsn), 0o604)
    assert len(fileperms.startup_warnings(load_config(str(path)))) == 1


def test_config_without_passwords_may_be_readable(tmp_path, certs):
    path = _write(tmp_path / "mtop.yaml", _server_doc(certs, "postgres://postgres@127.0.0.1/mtop?sslmode=disable"), 0o644)
    assert fileperms.startup_warnings(load_config(str(path))) == []


def _sqlite_config(tmp_path, certs, mode):
    db_path = tmp_path / "users.db"
    db_path.write_bytes(b"")
    os.chmod(db_path, mode)
    doc = _server_doc(certs)
    doc["db"] = {"driverName": "sqlite", "dsn": str(db_path)}
    return load_config(str(_write(tmp_path / "mtop.yaml", doc, 0o600))), str(db_path)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666])
def test_sqlite_database_readable_by_others_is_named_with_mode_and_fix(tmp_path, certs, mode):
    config, db_path = _sqlite_config(tmp_path, certs, mode)
    (warning,) = fileperms.startup_warnings(config)
    assert db_path in warning and "password hashes" in warning and "db.dsn" in warning
    assert f"mode {mode:04o}" in warning and warning.endswith(f"run: chmod 600 {db_path}")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660])
def test_private_sqlite_database_gives_no_warning(tmp_path, certs, mode):
    config, db_path = _sqlite_config(tmp_path, certs, mode)
    assert fileperms.startup_warnings(config) == []


def test_sqlite_journal_readable_by_others_is_named_too(tmp_path, certs):
    config, db_path = _sqlite_config(tmp_path, certs, 0o600)
    journal = tmp_path / "users.db-journal"
    journal.write_bytes(b"")
    os.chmod(journal, 0o644)
    (warning,) = fileperms.startup_warnings(config)
    assert warning.startswith(f"{journal} is a journal of the SQLite user database {db_path}")
    assert warning.endswith(f"run: chmod 600 {journal}")


def test_only_sqlite_databases_are_files_to_check(tmp_path):
    world_readable = tmp_path / "mtop"
    world_readable.write_bytes(b"")
    os.chmod(world_readable, 0o644)
    assert fileperms.database_warnings("postgres", str(world_readable)) == []
    assert fileperms.database_warnings("mysql", str(world_readable)) == []
    assert len(fileperms.database_warnings("sqlite", str(world_readable))) == 1
    assert fileperms.database_warnings("sqlite", str(tmp_path / "missing.db")) == []


def _climber_doc(**server):
    return {"socks5": {"listen": "127.0.0.1:0"}, "servers": [{"insecure": True, **server}]}


@pytest.mark.parametrize(
    "doc, key",
    [
        (_climber_doc(host="h:1", username="u", password="Srv-pw-77aa"), "servers[0].password"),
        (_climber_doc(url="mtop://u:Url-pw-88bb@h:1/tls"), "servers[0].url"),
        (_climber_doc(urls=["mtop://u:Url-pw-99cc@h:1/tls"]), "servers[0].urls[0]"),
        (
            {**_climber_doc(url="mtop://u:Url-pw-00dd@h:1/tls"), "http": {"listen": "127.0.0.1:0", "username": "a", "password": "Loc-pw"}},
            "http.password and 1 more",  # keys in file order (safe_dump sorts them)
        ),
    ],
)
def test_climber_config_with_passwords_readable_by_others(tmp_path, doc, key):
    path = _write(tmp_path / "climber.yaml", doc, 0o644)
    config = load_climber_config(str(path))
    (warning,) = fileperms.startup_warnings(config)
    assert str(path) in warning and key in warning and "0644" in warning and "chmod o-rwx" in warning
    assert "-pw-" not in warning
    os.chmod(path, 0o600)
    assert fileperms.startup_warnings(config) == []


def test_missing_or_unreadable_files_give_no_warning(tmp_path):
    assert fileperms.readable_by_others(str(tmp_path / "missing")) is None
    assert fileperms.config_file_warnings(None) == []
    assert fileperms.key_file_warnings([("server.key", ""), ("server.key", str(tmp_path / "missing"))]) == []


def test_secrets_in_ignores_links_without_passwords():
    doc = {"servers": [{"url": "mtop://u@h:1/tls", "password": ""}], "db": {"dsn": "postgres://u@h/db"}}
    assert fileperms.secrets_in(doc) == []
    assert fileperms.secrets_in({"socks5": {"password": 1234}}) == ["socks5.password"]


# -- redaction ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, secret",
    [
        ("link mtop://alice:S3cr@t-1@vpn.example.com:443/tls?proto=mtop ok", "S3cr@t-1"),
        ("db.dsn: 'root:Hunter-2@tcp(127.0.0.1:3306)/mtop'", "Hunter-2"),
        ("root:Hunter-3@/mtop", "Hunter-3"),
        ("host=x password=Kw-4 user=y", "Kw-4"),
        ("host=x password = 'Quoted pw-5' user=y", "Quoted pw-5"),
        ("postgres://u:Uri-6@h/db?password=Query-7", "Query-7"),
        ("postgres://u:Uri-6@h/db?password=Query-7", "Uri-6"),
        ("mysql://root:My-8@127.0.0.1:3306/mtop", "My-8"),
    ],
)
def test_redact_masks_passwords(text, secret):
    masked = redact(text)
    assert secret not in masked and "***" in masked


@pytest.mark.parametrize("text", ["postgres://postgres@127.0.0.1/mtop", "10:30 at 127.0.0.1:443", "user=a host=b", "a: b"])
def test_redact_leaves_text_without_passwords(text):
    assert redact(text) == text


def test_shown_is_bounded_for_huge_shared_structures():
    node = ["lol"] * 9
    for _ in range(12):  # 9**12 leaves if printed in full
        node = [node] * 9
    assert len(shown(node)) < 1000
