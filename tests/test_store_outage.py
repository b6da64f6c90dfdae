"""A database outage and its end, as the SQL user stores see them: the real
PostgreSQL and MariaDB servers behind a TCP relay on loopback that the test
cuts (stops listening, drops every connection) and restores on the same
port, so the store meets refused connections and dead sockets as in a
real outage, without touching the shared database servers."""

import gc

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent

from helpers import run_sql
from mtop.database import DBSettings, connect
from mtop.userstore import IUserChangeFeed, StoreUnavailable, Usage


class _Upstream(Protocol):
    def connectionMade(self):
        self.peer = self.factory.client
        self.peer.upstream = self
        self.peer.transport.resumeProducing()
        if self.peer.early:
            self.transport.write(b"".join(self.peer.early))
            self.peer.early = []

    def dataReceived(self, data):
        self.peer.transport.write(data)

    def connectionLost(self, reason):
        self.peer.transport.loseConnection()


class _UpstreamFactory(ClientFactory):
    protocol = _Upstream

    def __init__(self, client):
        self.client = client

    def clientConnectionFailed(self, connector, reason):
        self.client.transport.loseConnection()


class _Client(Protocol):
    upstream = None

    def connectionMade(self):
        self.early = []
        self.factory.relay.accepted += 1
        self.factory.relay.clients.add(self)
        self.transport.pauseProducing()
        reactor.connectTCP(self.factory.relay.host, self.factory.relay.target_port, _UpstreamFactory(self))

    def dataReceived(self, data):
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason):
        self.factory.relay.clients.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class TCPRelay:
    """Relays a loopback port to ``host:target_port`` until `cut`, which
    stops listening and aborts every relayed connection; `restore` listens
    on the same port again."""

    def __init__(self, host, target_port):
        self.host = host
        self.target_port = target_port
        self.clients = set()
        self.accepted = 0
        self.factory = Factory.forProtocol(_Client)
        self.factory.relay = self
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def cut(self):
        d = self.listening.stopListening()
        for client in list(self.clients):
            client.transport.abortConnection()
            if client.upstream is not None:
                client.upstream.transport.abortConnection()
        return d

    def restore(self):
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    def stop(self):
        if self.listening.connected:
            self.cut()


def _problems(events):
    """Events carrying a failure or a traceback: Twisted's "Unhandled
    Error" (``log.err`` from the reactor), "Unhandled error in Deferred"
    (reported when such a Deferred is collected), ``log.failure``."""
    gc.collect()
    return [
        formatEvent(e) or repr(e)
        for e in events
        if "log_failure" in e
        or "failure" in e
        or e.get("isError")
        or "Unhandled error" in (formatEvent(e) or "")
        or "Traceback" in (formatEvent(e) or "")
    ]


def _lines(events, level):
    """Our store's lines at ``level`` (Twisted's own port messages left
    out)."""
    return [formatEvent(e) for e in events if e.get("log_level") == level and formatEvent(e).startswith("users:")]


def _outage_lines(events):
    warnings = [line for line in _lines(events, LogLevel.warn) if "user store unavailable" in line]
    recoveries = [line for line in _lines(events, LogLevel.info) if "user store reachable again" in line]
    return warnings, recoveries


async def _sleep(seconds):
    await deferLater(reactor, seconds, lambda: None)


async def _outcome(call):
    try:
        result = await call()
    except StoreUnavailable:
        return "unavailable"
    return result


def _postgres_store(dsn, port):
    from psycopg2.extensions import make_dsn, parse_dsn

    from mtop.userstore.postgres import PostgresUserStore

    parts = parse_dsn(dsn)
    parts.update(host="127.0.0.1", port=str(port))
    return PostgresUserStore(make_dsn(**parts), reactor)


def _mysql_store(dsn, port):
    from mtop.userstore.mysql import MySQLUserStore

    return MySQLUserStore(dsn.replace("tcp(127.0.0.1:3306)", f"tcp(127.0.0.1:{port})"), query_timeout=2)


@pytest.fixture(params=["postgres", "mysql"])
def behind_relay(request):
    """(store factory, relay): a table with user carol, and a factory of
    stores reaching the database through the relay."""
    driver = request.param
    dsn = request.getfixturevalue(f"{driver}_dsn")
    settings = DBSettings(driver, dsn)
    run_sql(settings, "DROP TABLE IF EXISTS mtop_user")
    run_sql(settings, "DROP TABLE IF EXISTS mtop_usage_flush")
    db = connect(settings)
    try:
        db.upgrade()
    finally:
        db.close()
    run_sql(settings, "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", ("carol", "s", "x"))
    relay = TCPRelay("127.0.0.1", 5432 if driver == "postgres" else 3306)
    make = _postgres_store if driver == "postgres" else _mysql_store
    yield (lambda: make(dsn, relay.port)), relay
    relay.stop()


async def _stopped(store):
    result = store.stopService()
    if isinstance(result, Deferred):
        await result


def _carol(store):
    async def lookup():
        record = await store.lookup("carol")
        return None if record is None else record.username

    return lookup


async def _until_carol(store, tries=80):
    seen = []
    for _ in range(tries):
        seen.append(await _outcome(_carol(store)))
        if seen[-1] == "carol":
            break
        await _sleep(0.25)
    return seen


@pytest_twisted.ensureDeferred
async def test_an_outage_is_one_warning_and_its_end_one_line(behind_relay, events):
    make_store, relay = behind_relay
    store = make_store()
    if IUserChangeFeed.providedBy(store):  # PostgreSQL: the LISTEN connection too
        store.watch(lambda username: None)
    store.startService()
    try:
        assert await _outcome(_carol(store)) == "carol"
        await _sleep(0.3)

        await relay.cut()
        during = []
        for _ in range(10):  # through several reconnection attempts
            during.append(await _outcome(_carol(store)))
            during.append(await _outcome(lambda: store.lookup_many(["carol", "dave"])))
            during.append(await _outcome(lambda: store.add_usage("server-a", 1, {"carol": Usage(5, 7)})))
            await _sleep(0.4)
        assert set(during) == {"unavailable"}, during

        relay.restore()
        after = await _until_carol(store)
        assert after[-1] == "carol", after
        # Every connection of the pool is back, not only the first.
        for _ in range(6):
            assert await _outcome(_carol(store)) == "carol"
        assert await store.add_usage("server-a", 1, {"carol": Usage(5, 7)}) is True
        assert (await store.lookup("carol")).bytes_down == 7
        await _sleep(1.0)
    finally:
        await _stopped(store)
    assert _problems(events) == []
    warnings, recoveries = _outage_lines(events)
    assert len(warnings) == 1, warnings
    assert store.description in warnings[0]
    assert len(recoveries) == 1, recoveries
    assert [line for line in _lines(events, LogLevel.error)] == []


@pytest_twisted.ensureDeferred
async def test_a_store_started_in_an_outage_warns_once_and_recovers(behind_relay, events):
    make_store, relay = behind_relay
    await relay.cut()
    store = make_store()
    store.startService()
    try:
        for _ in range(6):
            assert await _outcome(_carol(store)) == "unavailable"
            await _sleep(0.4)
        relay.restore()
        after = await _until_carol(store)
        assert after[-1] == "carol", after
    finally:
        await _stopped(store)
    assert _problems(events) == []
    warnings, recoveries = _outage_lines(events)
    assert len(warnings) == 1, warnings
    assert len(recoveries) == 1, recoveries
    # Not "create it with 'mtopctl db init'": the table is not the problem.
    assert _lines(events, LogLevel.error) == []


@pytest_twisted.ensureDeferred
async def test_a_store_stopped_in_an_outage_stops_reconnecting(behind_relay, events):
    make_store, relay = behind_relay
    store = make_store()
    if IUserChangeFeed.providedBy(store):
        store.watch(lambda username: None)
    store.startService()
    assert await _outcome(_carol(store)) == "carol"
    await relay.cut()
    await _sleep(1.5)
    await _stopped(store)
    accepted = relay.accepted
    relay.restore()
    await _sleep(3.0)  # past the first reconnection delays
    assert relay.accepted == accepted
    assert _problems(events) == []


@pytest_twisted.ensureDeferred
async def test_postgres_sessions_terminated_by_the_server_log_no_traceback(postgres_dsn, events):
    """What a server restart does to the sessions (``pg_terminate_backend``
    on each of them), three times over, without the relay."""
    from mtop.userstore.postgres import PostgresUserStore

    settings = DBSettings("postgres", postgres_dsn)
    run_sql(settings, "DROP TABLE IF EXISTS mtop_user")
    db = connect(settings)
    try:
        db.upgrade()
    finally:
        db.close()
    run_sql(settings, "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)", ("carol", "s", "x"))
    store = PostgresUserStore(postgres_dsn, reactor)
    store.watch(lambda username: None)
    store.startService()
    try:
        assert await _outcome(_carol(store)) == "carol"
        for _ in range(3):
            run_sql(settings, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            seen = await _until_carol(store)
            assert seen[-1] == "carol", seen
            await _sleep(0.5)
    finally:
        await _stopped(store)
    assert _problems(events) == []
    warnings, recoveries = _outage_lines(events)
    # Each cut may or may not be seen as an outage (the connections come
    # back at once), but every warning has its recovery line.
    assert len(warnings) == len(recoveries) <= 3, (warnings, recoveries)
