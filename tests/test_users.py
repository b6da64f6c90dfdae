"""mtop.users.UserAdmin on SQLite, PostgreSQL and MariaDB: what mtopctl
user and the admin API do to mtop_user, with errors naming the field."""

from __future__ import annotations

import pytest

from mtop import passwords
from mtop.database import connect
from mtop.users import NoSuchUser, UserAdmin, UserError, UserExists, open_users, parse_date, parse_size, policy_value
from test_userstores import backend  # noqa: F401 (a fixture)


@pytest.fixture
def admin(backend):  # noqa: F811
    settings, _ = backend
    db = connect(settings, create=True)
    db.upgrade()
    admin = open_users(db)
    yield admin
    db.close()


def test_add_get_change_delete(admin):
    admin.add("alice", "pw-1")
    record = admin.get("alice")
    assert (record["username"], record["password"], record["enabled"], record["used"]) == ("alice", "scrypt", True, 0)
    with pytest.raises(UserExists) as exists:
        admin.add("alice", "pw-2")
    assert (exists.value.status, exists.value.field) == (409, "username")
    admin.set_password("alice", "pw-2", legacy=True)
    assert admin.get("alice")["password"] == "legacy"
    stored = admin.db.execute("SELECT salt, password FROM mtop_user WHERE username = ?", ("alice",)).fetchone()
    assert passwords.legacy_hash(stored[0], "pw-2") == stored[1]
    admin.set_policy("alice", {"enabled": False, "quota_bytes": 10 << 30, "expires_at": "2027-01-31 00:00:00"})
    record = admin.get("alice")
    assert (record["enabled"], record["quota_bytes"], record["expires_at"]) == (False, 10 << 30, "2027-01-31 00:00:00")
    admin.db.execute("UPDATE mtop_user SET bytes_up = 5, bytes_down = 7 WHERE username = ?", ("alice",))
    admin.db.commit()
    assert admin.get("alice")["used"] == 12
    admin.reset_usage("alice")
    assert admin.get("alice")["used"] == 0
    admin.delete("alice")
    for call in (lambda: admin.get("alice"), lambda: admin.delete("alice"), lambda: admin.set_policy("alice", {"enabled": True})):
        with pytest.raises(NoSuchUser) as missing:
            call()
        assert missing.value.status == 404


def test_list_pages_sorts_and_searches(admin):
    for name in ("bob", "Alice", "carol_1", "carol%2", "dave"):
        admin.add(name, "pw")
    admin.db.execute("UPDATE mtop_user SET bytes_up = 100 WHERE username = ?", ("dave",))
    admin.db.commit()
    total, everyone = admin.list()
    assert total == 5 and sorted(r["username"] for r in everyone) == ["Alice", "bob", "carol%2", "carol_1", "dave"]
    # A page is a slice of the same order (the database's collation).
    total, rows = admin.list(offset=1, limit=2)
    assert total == 5 and rows == everyone[1:3]
    total, rows = admin.list(sort="used", descending=True, limit=1)
    assert rows[0]["username"] == "dave"
    # The search is a literal part of the name, case-insensitive: % and _ are not wildcards.
    assert [r["username"] for r in admin.list(search="ALI")[1]] == ["Alice"]
    assert [r["username"] for r in admin.list(search="%")[1]] == ["carol%2"]
    assert [r["username"] for r in admin.list(search="_")[1]] == ["carol_1"]
    with pytest.raises(UserError, match="cannot sort by 'password'") as bad:
        admin.list(sort="password")
    assert bad.value.field == "sort"


@pytest.mark.parametrize(
    "column, value, stored",
    [
        ("quota_bytes", "10G", 10 << 30),
        ("quota_bytes", 1024, 1024),
        ("quota_bytes", None, None),
        ("rate_limit", "512K", 512 << 10),
        ("max_connections", "none", None),
        ("max_connections", 3, 3),
        ("expires_at", "2027-01-31T12:00Z", "2027-01-31 12:00:00"),
        ("enabled", False, False),
    ],
)
def test_policy_values(column, value, stored):
    assert policy_value(column, value) == stored


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("quota_bytes", "ten", "quota_bytes: 'ten' is not a size"),
        ("quota_bytes", -1, r"must be from 0 to 2\^63"),
        ("quota_bytes", True, "is not a number"),
        ("max_connections", 1.5, "is not a number"),
        ("enabled", "yes", "enabled must be true or false"),
        ("expires_at", "soon", "is not a date"),
        ("password", "x", "is not a policy field"),
    ],
)
def test_bad_policy_values_name_the_field(column, value, message):
    with pytest.raises(UserError, match=message) as bad:
        policy_value(column, value)
    assert bad.value.field == column and bad.value.status == 400


def test_parsers():
    assert parse_size("1.5M") == 3 << 19 and parse_size("unlimited") is None
    assert parse_date("never") is None
    with pytest.raises(ValueError):
        parse_size("nan")


def test_names_and_passwords_are_checked(admin):
    for name in ("", "x" * 129):
        with pytest.raises(UserError, match="must be 1 to 128 bytes long") as bad:
            admin.add(name, "pw")
        assert bad.value.field == "username"
    with pytest.raises(UserError, match="must not be empty"):
        admin.add("eve", "")
    with pytest.raises(UserError, match="longer than 255 bytes") as bad:
        admin.add("eve", "p" * 256)
    assert bad.value.field == "password"
    assert isinstance(admin, UserAdmin)


def test_admins_and_tokens(admin):
    from mtop.admins import Admins, token_hash

    admins = Admins(admin.db)
    admins.add("ops", "Ops-pw-1")
    with pytest.raises(UserError, match="already exists"):
        admins.add("ops", "x")
    assert admins.check_password("ops", "Ops-pw-1") and not admins.check_password("ops", "nope")
    assert not admins.check_password("ghost", "Ops-pw-1")
    token = admins.new_token("ops", "ci")
    assert admins.token_admin(token) == "ops" and admins.token_admin(token + "x") is None
    stored = [row[0] for row in admin.db.execute("SELECT token_hash FROM mtop_admin_token").fetchall()]
    assert stored == [token_hash(token)] and token not in stored  # only the hash is kept
    assert admins.list() == [("ops", admins.list()[0][1], 1)]
    admins.set_password("ops", "Ops-pw-2")
    assert admins.check_password("ops", "Ops-pw-2")
    admins.delete("ops")
    assert admins.token_admin(token) is None and admins.list() == []
    with pytest.raises(UserError, match="no admin 'ops'") as missing:
        admins.new_token("ops")
    assert missing.value.status == 404
