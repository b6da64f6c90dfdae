"""The user stores against real databases: SQLite, PostgreSQL and MariaDB
(each test session in its own throwaway database), with mtopctl creating
and changing users as an operator would."""

import datetime

import pytest
import pytest_twisted
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from helpers import run_sql
from mtop import ctl, passwords
from mtop.auth import Authenticator
from mtop.database import BASE_TABLE, POLICY_COLUMN_NAMES, DBSettings, connect
from mtop.tap import user_store
from mtop.config import load_config
from mtop.userstore import IUsageSink, IUserChangeFeed, IUserStore, StoreUnavailable, Usage, UsageCounting
from mtop.userstore.mysql import MySQLUserStore
from mtop.userstore.postgres import PostgresUserStore
from mtop.userstore.sqlite import SQLiteUserStore


@pytest.mark.parametrize(
    "make_store, change_feed",
    [
        (lambda tmp_path: SQLiteUserStore(str(tmp_path / "users.db")), False),
        (lambda tmp_path: MySQLUserStore("mtop:pw@tcp(127.0.0.1:3306)/mtop"), False),
        (lambda tmp_path: PostgresUserStore("postgresql://mtop@127.0.0.1/mtop", reactor), True),
    ],
    ids=["sqlite", "mysql", "postgres"],
)
def test_each_backend_provides_what_it_declares(tmp_path, make_store, change_feed):
    """The contracts the sessions and the authenticator rely on (no
    database is opened: the store is not started)."""
    store = make_store(tmp_path)
    verifyObject(IUserStore, store)
    verifyObject(IUsageSink, store)
    verifyObject(IService, store)
    assert store.usage_counting is UsageCounting.UNKNOWN  # until its columns are read
    assert IUserChangeFeed.providedBy(store) is change_feed
    if change_feed:
        verifyObject(IUserChangeFeed, store)


@pytest_twisted.ensureDeferred
async def test_a_store_stopped_before_its_startup_check_ends_logs_no_error(backend):
    """The check's query finishing after the pool closed is not "cannot read
    mtop_user" (an error line that used to land in whatever ran next)."""
    settings, config = backend
    mtopctl(config, "db", "init")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(10):
            store = started_store(config)
            await stopped(store)
        await deferLater(reactor, 0.5, lambda: None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(e) for e in events if e.get("log_level") is LogLevel.error] == []


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def backend(request, tmp_path):
    """(settings, path of an mtop.yaml using them) with no mtop_user table."""
    driver = request.param
    if driver == "sqlite":
        dsn = str(tmp_path / "users.db")
        config_dsn = "users.db"
        driver_name = "sqlite"
    elif driver == "postgres":
        dsn = config_dsn = request.getfixturevalue("postgres_dsn")
        driver_name = "psql"  # the original's name
    else:
        dsn = config_dsn = request.getfixturevalue("mysql_dsn")
        driver_name = "mysql"
    settings = DBSettings(driver, dsn)
    if driver != "sqlite":
        db = connect(settings)
        db.execute("DROP TABLE IF EXISTS mtop_user")
        db.execute("DROP TABLE IF EXISTS mtop_usage_flush")
        db.execute("DROP TABLE IF EXISTS mtop_quota_lease")
        db.execute("DROP TABLE IF EXISTS mtop_presence")
        db.execute("DROP TABLE IF EXISTS mtop_usage_history")
        db.commit()
        db.close()
    config = tmp_path / "mtop.yaml"
    config.write_text(
        "server: {listen: ':0', crt: x.crt, key: x.key}\n"
        f"db: {{driverName: {driver_name}, dsn: '{config_dsn}', cache_ttl: 0}}\n"
    )
    return settings, config


def mtopctl(config, *args, stdin=None, monkeypatch=None):
    code = ctl.main(["-c", str(config), *args])
    assert code == 0, f"mtopctl {' '.join(args)} exited {code}"


sql = run_sql


def with_users(config, *names):
    """``db init`` and a legacy-hashed user of each name (password NAME-Pw-5)."""
    mtopctl(config, "db", "init")
    for name in names:
        mtopctl(config, "user", "add", "-u", name, "-p", f"{name}-Pw-5", "--legacy")


def started_store(config_path):
    config = load_config(str(config_path), check_files=False)
    store = user_store(config, reactor)
    store.startService()
    return store


def authenticator(store):
    return Authenticator(
        store, reactor, lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a), cache_ttl=0
    )


async def stopped(store):
    result = store.stopService()
    if result is not None:
        await result


async def columns_detected(store):
    await store._detect_columns()


@pytest_twisted.ensureDeferred
async def test_db_init_user_add_and_login(backend, capsys):
    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "alice", "-p", "Alice-pw-1")
    mtopctl(config, "user", "list")
    assert "alice" in capsys.readouterr().out
    store = started_store(config)
    try:
        await columns_detected(store)
        assert set(store.policy_columns) == {"enabled", "expires_at", "max_connections", "rate_limit", "quota_bytes", "bytes_up", "bytes_down"}
        auth = authenticator(store)
        assert await auth.authenticate("alice", "Alice-pw-1") is True
        assert await auth.authenticate("alice", "wrong") is False
        assert await auth.authenticate("nobody", "Alice-pw-1") is False
        record = await store.lookup("alice")
        assert record.enabled and record.quota_bytes is None and record.bytes_up == 0
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_an_original_table_authenticates_then_upgrades_live(backend, capsys, events, debug_logs):
    settings, config = backend
    # The original's table and a row written the original's way.
    sql(settings, BASE_TABLE)
    sql(settings, "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
        ("old", "salt1", passwords.legacy_hash("salt1", "Old-pw-2")))
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.policy_columns == ()
        auth = authenticator(store)
        assert await auth.authenticate("old", "Old-pw-2") is True
        # Upgrade while the store runs: idempotent, and the store sees it.
        mtopctl(config, "db", "upgrade")
        said = capsys.readouterr().out
        assert "added columns: enabled" in said
        assert "created tables: mtop_presence, mtop_quota_lease, mtop_usage_history" in said
        mtopctl(config, "db", "upgrade")
        assert "already up to date" in capsys.readouterr().out
        db = connect(settings)
        assert set(POLICY_COLUMN_NAMES) <= db.columns()
        db.close()
        # A detection can fail while the store reconnects (mtopctl ran in
        # this process and held the reactor): the store's own answer is its
        # next detection (every 60 s), so a few more are allowed here.
        # Once (2026-12-06) the store still had no policy columns after one,
        # on PostgreSQL, in one clean-clone run of many; its log says why.
        for _ in range(30):
            await columns_detected(store)
            if "enabled" in store.policy_columns:
                break
            await deferLater(reactor, 0.1, lambda: None)
        said = [formatEvent(e) for e in events if "columns" in (e.get("log_format") or "")]
        assert "enabled" in store.policy_columns, said
        assert await auth.authenticate("old", "Old-pw-2") is True
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_rows_changed_by_any_program_take_effect(backend):
    settings, config = backend
    mtopctl(config, "db", "init")
    store = started_store(config)
    try:
        await columns_detected(store)
        auth = authenticator(store)
        assert await auth.authenticate("bob", "Bob-pw-3") is False
        sql(settings, "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
            ("bob", "s", passwords.scrypt_hash("Bob-pw-3")))
        assert await auth.authenticate("bob", "Bob-pw-3") is True
        sql(settings, "UPDATE mtop_user SET enabled = ? WHERE username = ?", (False, "bob"))
        assert await auth.authenticate("bob", "Bob-pw-3") is False
        sql(settings, "UPDATE mtop_user SET enabled = NULL, expires_at = ? WHERE username = ?",
            (datetime.datetime(2000, 1, 1), "bob"))
        assert await auth.authenticate("bob", "Bob-pw-3") is False
        sql(settings, "UPDATE mtop_user SET expires_at = ?, quota_bytes = ?, bytes_up = ?, bytes_down = ? WHERE username = ?",
            (datetime.datetime(2999, 1, 1), 1000, 600, 400, "bob"))
        assert await auth.authenticate("bob", "Bob-pw-3") is False  # over quota
        sql(settings, "UPDATE mtop_user SET quota_bytes = ? WHERE username = ?", (1001, "bob"))
        assert await auth.authenticate("bob", "Bob-pw-3") is True
        sql(settings, "DELETE FROM mtop_user WHERE username = ?", ("bob",))
        assert await auth.authenticate("bob", "Bob-pw-3") is False
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_missing_table_is_store_unavailable(backend):
    settings, config = backend
    if settings.driver == "sqlite":
        sql(settings, "SELECT 1")  # creates the empty file
    store = started_store(config)
    try:
        with pytest.raises(StoreUnavailable):
            await store.lookup("alice")
    finally:
        await stopped(store)


def _kill_connections(settings):
    """Cut every other session to the test database, as a restart would."""
    if settings.driver == "postgres":
        sql(settings, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    else:
        db = connect(settings)
        try:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()"
            ).fetchall()]
            for connection_id in ids:
                db.execute(f"KILL {int(connection_id)}")
        finally:
            db.close()


@pytest.mark.parametrize("driver", ["postgres", "mysql"])
@pytest_twisted.ensureDeferred
async def test_store_reconnects_after_its_connections_are_killed(request, tmp_path, driver):
    dsn = request.getfixturevalue(f"{driver}_dsn")
    settings = DBSettings(driver, dsn)
    config = tmp_path / "mtop.yaml"
    config.write_text(f"server: {{listen: ':0'}}\ndb: {{driverName: {driver}, dsn: '{dsn}', cache_ttl: 0}}\n")
    sql(settings, "DROP TABLE IF EXISTS mtop_user")
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "carol", "-p", "Carol-pw-4", "--legacy")
    store = started_store(config)
    try:
        await columns_detected(store)
        auth = authenticator(store)
        assert await auth.authenticate("carol", "Carol-pw-4") is True
        _kill_connections(settings)
        # Lookups may fail while the pool notices and reconnects, never
        # wrongly succeed, and work again within a few seconds.
        outcomes = []
        for _ in range(60):
            try:
                outcomes.append(await auth.authenticate("carol", "Carol-pw-4"))
            except StoreUnavailable:
                outcomes.append("unavailable")
            if outcomes[-1] is True:
                break
            await deferLater(reactor, 0.25, lambda: None)
        assert outcomes[-1] is True, outcomes
        assert False not in outcomes
    finally:
        await stopped(store)


# Accounting and live changes at the store level


def _counters(settings, username):
    rows = sql(settings, "SELECT bytes_up, bytes_down, last_seen FROM mtop_user WHERE username = ?", (username,))
    return rows[0]


@pytest_twisted.ensureDeferred
async def test_usage_is_added_exactly_once_per_flush(backend):
    settings, config = backend
    with_users(config, "dave", "erin")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.usage_counting is UsageCounting.COUNTED
        batch = {"dave": Usage(100, 2000, "2026-11-23 10:00:00"), "erin": Usage(7, 0, None)}
        assert await store.add_usage("server-a", 1, batch) is True
        # The same flush again (its first answer was lost): not counted twice.
        assert await store.add_usage("server-a", 1, batch) is False
        # Another server adds to the same rows.
        assert await store.add_usage("server-b", 1, {"dave": Usage(1, 1, None)}) is True
        assert await store.add_usage("server-a", 2, {"dave": Usage(10, 10, None)}) is True
        up, down, seen = _counters(settings, "dave")
        assert (up, down) == (111, 2011)
        assert str(seen).startswith("2026-11-23 10:00:00")
        assert _counters(settings, "erin")[:2] == (7, 0)
        # Each server keeps only its latest ledger row.
        rows = sql(settings, "SELECT server_id, seq FROM mtop_usage_flush ORDER BY server_id")
        assert [tuple(r) for r in rows] == [("server-a", 2), ("server-b", 1)]
        found = await store.lookup_many(["dave", "erin", "nobody"])
        assert set(found) == {"dave", "erin"} and found["dave"].bytes_down == 2011
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_a_flush_prunes_ledger_rows_left_by_servers_long_gone(backend):
    """Each process start leaves one ledger row behind when it stops; a
    flush drops any server's rows older than LEDGER_DAYS (and keeps recent
    ones: their servers may still retry)."""
    from mtop.userstore.sql import LEDGER_DAYS

    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "dave", "-p", "dave-Pw-5", "--legacy")
    old = datetime.datetime.utcnow() - datetime.timedelta(days=LEDGER_DAYS + 2)
    for server_id in ("gone-1", "gone-2"):
        sql(settings, "INSERT INTO mtop_usage_flush (server_id, seq, flushed_at) VALUES (?, ?, ?)", (server_id, 7, old))
    sql(settings, "INSERT INTO mtop_usage_flush (server_id, seq) VALUES (?, ?)", ("recent", 3))
    store = started_store(config)
    try:
        await columns_detected(store)
        await store.ping()  # the health probe: fails if the database does not answer
        assert await store.add_usage("server-a", 1, {"dave": Usage(5, 6, None)}) is True
        rows = sql(settings, "SELECT server_id FROM mtop_usage_flush ORDER BY server_id")
        assert [r[0] for r in rows] == ["recent", "server-a"]
        assert _counters(settings, "dave")[:2] == (5, 6)
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_a_flush_adds_to_the_usage_history_exactly_once(backend):
    """Each flush adds its bytes to the row of its server, user and five
    minutes, in the flush's transaction: a retried flush adds nothing, a
    user deleted meanwhile gets no row, and the API's reading sums the
    servers."""
    from mtop.database import HISTORY_STEP
    from mtop.users import UserAdmin

    settings, config = backend
    with_users(config, "dave", "erin")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.history_available is True
        batch = {"dave": Usage(100, 2000, None), "erin": Usage(0, 0, "2026-11-23 10:00:00"), "gone": Usage(5, 5, None)}
        assert await store.add_usage("server-a", 1, batch) is True
        assert await store.add_usage("server-a", 1, batch) is False  # retried: not added again
        assert await store.add_usage("server-a", 2, {"dave": Usage(1, 2, None)}) is True
        assert await store.add_usage("server-b", 1, {"dave": Usage(10, 20, None)}) is True
    finally:
        await stopped(store)
    rows = sql(settings, "SELECT server_id, username, period, bytes_up, bytes_down FROM mtop_usage_history")
    # A row per server and user (more if a flush crossed a five-minute
    # boundary), and one per server for its whole traffic (username '',
    # with the bytes of the user deleted meanwhile).
    sums = {}
    for server, name, period, up, down in rows:
        assert period % HISTORY_STEP == 0
        sums.setdefault((server, name), [0, 0])
        sums[server, name][0] += up
        sums[server, name][1] += down
    assert sums == {("server-a", "dave"): [101, 2002], ("server-b", "dave"): [10, 20],
                    ("server-a", ""): [106, 2007], ("server-b", ""): [10, 20]}
    db = connect(settings)
    try:
        history = UserAdmin(db).usage_history("dave", 1, HISTORY_STEP)
        assert len(history["points"]) == 3600 // HISTORY_STEP
        assert sum(p["up"] for p in history["points"]) == 111 and sum(p["down"] for p in history["points"]) == 2022
        assert history["points"][-1]["t"] < history["until"] <= history["points"][-1]["t"] + HISTORY_STEP
        assert history["servers"] == [{"server": "server-a", "up": 101, "down": 2002}, {"server": "server-b", "up": 10, "down": 20}]
        everyone = UserAdmin(db).usage_history(None, 2, 2 * HISTORY_STEP)
        assert sum(p["up"] + p["down"] for p in everyone["points"]) == 116 + 2027
        assert [s["server"] for s in everyone["servers"]] == ["server-a", "server-b"]
        UserAdmin(db).delete("dave")
        assert sql(settings, "SELECT DISTINCT username FROM mtop_usage_history")[0][0] == ""
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_the_usage_history_keeps_history_days(backend):
    """Rows older than db.history_days are dropped by the pruning flush;
    with history_days 0 nothing is written; without the table (a database
    not upgraded) flushes work as before."""
    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "dave", "-p", "dave-Pw-5", "--legacy")
    now = int(sql(settings, "SELECT " + {"sqlite": "CAST(strftime('%s', 'now') AS INTEGER)", "postgres":
                  "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)", "mysql": "UNIX_TIMESTAMP()"}[settings.driver])[0][0])
    for days in (3, 40):
        period = (now - days * 86400) // 300 * 300
        sql(settings, "INSERT INTO mtop_usage_history (server_id, username, period, bytes_up, bytes_down) "
            "VALUES ('old', 'dave', ?, 1, 1)", (period,))
    store = started_store(config)
    try:
        await columns_detected(store)
        store.history_days = 7
        assert await store.add_usage("s1", 1, {"dave": Usage(5, 6, None)}) is True  # the first flush prunes
        rows = sql(settings, "SELECT server_id, period FROM mtop_usage_history WHERE username = 'dave' ORDER BY period")
        assert [r[0] for r in rows] == ["old", "s1"] and now - rows[0][1] < 4 * 86400
        store.history_days = 0
        assert await store.add_usage("s1", 2, {"dave": Usage(50, 60, None)}) is True
        assert sql(settings, "SELECT SUM(bytes_up) FROM mtop_usage_history WHERE server_id = 's1'")[0][0] == 5 + 5
    finally:
        await stopped(store)
    sql(settings, "DROP TABLE mtop_usage_history")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.history_available is False
        assert await store.add_usage("s1", 3, {"dave": Usage(1, 1, None)}) is True
        assert _counters(settings, "dave")[:2] == (56, 67)
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_lookup_many_reads_hundreds_of_users(backend):
    settings, config = backend
    mtopctl(config, "db", "init")
    db = connect(settings)
    try:
        for i in range(450):
            db.execute("INSERT INTO mtop_user (username, salt, password, rate_limit) VALUES (?, ?, ?, ?)", (f"u{i:03d}", "s", "x", i))
        db.commit()
    finally:
        db.close()
    store = started_store(config)
    try:
        found = await store.lookup_many([f"u{i:03d}" for i in range(0, 460)])
        assert len(found) == 450
        assert found["u449"].rate_limit == 449
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_postgres_tells_of_row_changes(postgres_dsn, tmp_path):
    settings = DBSettings("postgres", postgres_dsn)
    config = tmp_path / "mtop.yaml"
    config.write_text(f"server: {{listen: ':0'}}\ndb: {{driverName: psql, dsn: '{postgres_dsn}'}}\n")
    sql(settings, "DROP TABLE IF EXISTS mtop_user")
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "frank", "-p", "Frank-pw-6", "--legacy")
    changed = []
    store = user_store(load_config(str(config), check_files=False), reactor)
    store.watch(changed.append)
    store.startService()
    try:
        for _ in range(100):  # until LISTEN is in place (it reports "any user")
            if None in changed:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert None in changed
        sql(settings, "UPDATE mtop_user SET enabled = ? WHERE username = ?", (False, "frank"))
        sql(settings, "UPDATE mtop_user SET bytes_up = bytes_up + 5 WHERE username = ?", ("frank",))
        mtopctl(config, "user", "del", "-u", "frank")
        for _ in range(100):
            if changed.count("frank") >= 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        # The disable and the delete, not the counter update.
        assert changed.count("frank") == 2, changed
        # After a cut, it listens again and says any user may have changed.
        changed.clear()
        _kill_connections(settings)
        for _ in range(200):
            if None in changed:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert None in changed
        mtopctl(config, "user", "add", "-u", "frank", "-p", "Frank-pw-7", "--legacy")
        for _ in range(100):
            if "frank" in changed:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert "frank" in changed
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_mtopctl_sets_shows_and_resets_policy(backend, capsys):
    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "gina", "-p", "Gina-pw-9")
    mtopctl(config, "user", "set", "-u", "gina", "--disable", "--expires", "2030-01-31 12:00", "--max-conns", "3",
            "--rate", "512K", "--quota", "10G")
    sql(settings, "UPDATE mtop_user SET bytes_up = 5, bytes_down = 1073741824 WHERE username = ?", ("gina",))
    store = started_store(config)
    try:
        record = await store.lookup("gina")
    finally:
        await stopped(store)
    assert (record.enabled, record.max_connections, record.rate_limit, record.quota_bytes) == (False, 3, 524288, 10 << 30)
    assert record.expires_at == datetime.datetime(2030, 1, 31, 12, 0)
    capsys.readouterr()
    mtopctl(config, "user", "show", "-u", "gina")
    shown = capsys.readouterr().out
    assert "enabled          no" in shown and "10.0 GiB" in shown and "10.0%" in shown and "Gina-pw-9" not in shown
    mtopctl(config, "user", "set", "-u", "gina", "--enable", "--quota", "none", "--expires", "never")
    mtopctl(config, "user", "reset-usage", "-u", "gina")
    row = sql(settings, "SELECT enabled, quota_bytes, expires_at, bytes_up, bytes_down, rate_limit FROM mtop_user WHERE username = ?", ("gina",))[0]
    assert bool(row[0]) and row[1] is None and row[2] is None and (row[3], row[4]) == (0, 0) and row[5] == 524288
    assert ctl.main(["-c", str(config), "user", "set", "-u", "nobody", "--disable"]) == 1
    assert "no user 'nobody'" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_user_add_legacy_writes_the_originals_row(backend):
    """``mtopctl user add --legacy`` writes exactly what the original's mctl
    writes (12-character salt, lowercase hex SHA-256 of salt@password), as
    each database stores it, and it logs in; so does a row from the INSERT
    ``mtopctl user hash -u`` prints, run as plain SQL."""
    import contextlib
    import hashlib
    import io
    import re

    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "old", "-p", "Old-pw 3", "--legacy")
    db = connect(settings)
    try:
        salt, stored = db.execute("SELECT salt, password FROM mtop_user WHERE username = ?", ("old",)).fetchone()
        db.commit()
    finally:
        db.close()
    assert re.fullmatch(r"[A-Za-z0-9]{12}", salt)
    assert stored == hashlib.sha256(f"{salt}@Old-pw 3".encode()).hexdigest()
    for flags in ((), ("--legacy",)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert ctl.main(["user", "hash", "-u", f"o'new{len(flags)}", "-p", "New-pw 4", *flags]) == 0
        sql(settings, out.getvalue().strip().rstrip(";"))
    store = started_store(config)
    try:
        auth = authenticator(store)
        assert await auth.authenticate("old", "Old-pw 3") is True
        assert await auth.authenticate("old", "Old-pw") is False
        assert await auth.authenticate("o'new0", "New-pw 4") is True
        assert await auth.authenticate("o'new1", "New-pw 4") is True
    finally:
        await stopped(store)


# Quota leases


@pytest_twisted.ensureDeferred
async def test_quota_leases_never_grant_more_than_is_left(backend):
    """Grants for one user from several servers at once add up to the
    quota minus the counters at most; a flush turns leased bytes into
    counted ones; a lapsed lease frees its bytes; a user without a quota
    gets none (None)."""
    from twisted.internet.defer import gatherResults

    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "dave", "-p", "dave-Pw-5", "--legacy")
    mtopctl(config, "user", "set", "-u", "dave", "--quota", "1000")
    mtopctl(config, "user", "add", "-u", "erin", "-p", "erin-Pw-5", "--legacy")
    sql(settings, "UPDATE mtop_user SET bytes_up = 100 WHERE username = 'dave'")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.leases_available is True
        grants = await gatherResults([store.lease_quota(f"s{i}", "dave", 400, 30) for i in range(4)])
        assert sum(grants) == 900 and sorted(grants) == [0, 100, 400, 400], grants
        assert await store.lease_quota("s9", "dave", 1, 30) == 0
        assert await store.lease_quota("s1", "erin", 400, 30) is None
        assert await store.lease_quota("s1", "nobody", 400, 30) is None
        # s0 counts 150 of its lease and gives back 50: 200 are free again.
        holder = next(f"s{i}" for i, g in enumerate(grants) if g == 400)
        assert await store.add_usage(holder, 1, {"dave": Usage(100, 50, None, release=50)}) is True
        rows = sql(settings, "SELECT bytes FROM mtop_quota_lease WHERE server_id = ? AND username = 'dave'", (holder,))
        assert rows[0][0] == 200
        assert await store.lease_quota("s9", "dave", 1000, 30) == 50
        # A lapsed lease (a server gone without renewing) frees its bytes.
        sql(settings, "UPDATE mtop_quota_lease SET expires_at = 1 WHERE server_id = ?", (holder,))
        assert await store.lease_quota("s8", "dave", 1000, 30) == 200
        # Renewing keeps a lease alive.
        await store.renew_leases("s8", 60)
        rows = sql(settings, "SELECT expires_at FROM mtop_quota_lease WHERE server_id = 's8'")
        assert rows[0][0] > 1000
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_without_the_lease_table_flushes_still_work(backend):
    """A database not upgraded since leases came (no mtop_quota_lease):
    the store says so and its flushes do not touch leases."""
    settings, config = backend
    mtopctl(config, "db", "init")
    mtopctl(config, "user", "add", "-u", "dave", "-p", "dave-Pw-5", "--legacy")
    mtopctl(config, "user", "set", "-u", "dave", "--quota", "1000")
    sql(settings, "DROP TABLE mtop_quota_lease")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.leases_available is False
        assert await store.add_usage("s1", 1, {"dave": Usage(5, 6, None, release=9)}) is True
        assert _counters(settings, "dave")[:2] == (5, 6)
    finally:
        await stopped(store)


# Presence (max_connections and rate_limit across servers)


@pytest_twisted.ensureDeferred
async def test_presence_replaces_a_servers_rows_and_reads_the_others(backend):
    """Each publication replaces the server's rows and answers with the
    other servers' live rows that have tunnels; lapsed rows are not
    counted, and are dropped by a later publication."""
    from mtop.userstore.sql import PRESENCE_PRUNE_AFTER

    settings, config = backend
    mtopctl(config, "db", "init")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.presence_available is True
        assert await store.publish_presence("s1", {"dave": (2, True), "erin": (1, False)}, 30) == {}
        assert await store.publish_presence("s2", {"dave": (1, False), "zoe": (0, False)}, 30) == {
            "dave": [("s1", 2, True)],
            "erin": [("s1", 1, False)],
        }
        seen = await store.publish_presence("s3", {}, 30)
        assert {name: sorted(rows) for name, rows in seen.items()} == {
            "dave": [("s1", 2, True), ("s2", 1, False)],
            "erin": [("s1", 1, False)],
        }
        # s1 carries only erin now: its dave row is gone.
        assert await store.publish_presence("s1", {"erin": (1, True)}, 30) == {"dave": [("s2", 1, False)]}
        # s2 stops renewing: once lapsed it is not counted...
        sql(settings, "UPDATE mtop_presence SET expires_at = 1 WHERE server_id = 's2'")
        assert await store.publish_presence("s3", {}, 30) == {"erin": [("s1", 1, True)]}
        # ...and a pruning publication (every 60th) drops its rows.
        assert PRESENCE_PRUNE_AFTER < 1_000_000_000
        store._presence_count = 60
        await store.publish_presence("s3", {}, 30)
        assert not sql(settings, "SELECT server_id FROM mtop_presence WHERE server_id = 's2'")
        rows = sql(settings, "SELECT server_id, username, tunnels, active FROM mtop_presence ORDER BY server_id, username")
        assert [tuple(row) for row in rows] == [("s1", "erin", 1, 1)]
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_without_the_presence_table_the_store_says_so(backend):
    settings, config = backend
    mtopctl(config, "db", "init")
    sql(settings, "DROP TABLE mtop_presence")
    store = started_store(config)
    try:
        await columns_detected(store)
        assert store.presence_available is False
        with pytest.raises(StoreUnavailable):
            await store.publish_presence("s1", {"dave": (1, True)}, 30)
    finally:
        await stopped(store)


@pytest_twisted.ensureDeferred
async def test_a_presence_read_writes_nothing(backend):
    settings, config = backend
    mtopctl(config, "db", "init")
    store = started_store(config)
    try:
        await columns_detected(store)
        await store.publish_presence("s1", {"dave": (1, True)}, 30)
        assert await store.publish_presence("s2", None, 30) == {"dave": [("s1", 1, True)]}
        assert [tuple(row) for row in sql(settings, "SELECT server_id FROM mtop_presence")] == [("s1",)]
    finally:
        await stopped(store)


@pytest.fixture
def debug_logs():
    """Our debug events reach the log (and `events`) during the test."""
    from mtop import logs

    logs.set_level("debug")
    yield
    logs.set_level("info")


def test_an_earlier_column_detection_answering_last_does_not_undo_a_later_one():
    """Detections overlap (start-up, the periodic one, a caller's): the
    answer of one begun before an upgrade must not replace the answer of
    one begun after it."""
    from twisted.internet.defer import Deferred

    from mtop.userstore.sql import SQLUserStore

    class Store(SQLUserStore):
        driver = "sqlite"

        def __init__(self):
            super().__init__("test")
            self.queries: list[Deferred] = []

        def _run_query(self, query, *args):
            d = Deferred()
            self.queries.append(d)
            return d

    store = Store()
    store._detect_columns()  # begun before the upgrade
    store._detect_columns()  # begun after it
    before, after = store.queries
    after.callback([("username",), ("enabled",)])
    store.queries[-1].callback([("mtop_user",), ("mtop_usage_history",)])
    assert store.policy_columns == ("enabled",) and store.history_available is True
    before.callback([("username",)])  # the older answer arrives last
    assert store.policy_columns == ("enabled",)
    assert len(store.queries) == 3  # and it asked for no tables either
