import json
import pathlib
import sqlite3

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher

from mtop import passwords
from mtop.auth import Authenticator
from mtop.certs import init_certs
from helpers import LOOPBACK_ACL
from mtop.dialer import Dialer
from mtop.database import BASE_TABLE as SQLITE_SCHEMA
from mtop.server import TunnelSettings, TunnelFactory
from mtop.tls import server_context
from mtop.tlstransport import server_tls_factory
from mtop.userstore.sqlite import SQLiteUserStore

#: The project's own copy of the MTop v1 wire vectors (byte strings the
#: protocol description and the original implementation agree on).
VECTORS_PATH = pathlib.Path(__file__).resolve().parent / "vectors" / "mtop-v1.json"


@pytest.fixture
def events():
    """Every log event published during the test."""
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


@pytest.fixture(scope="session")
def vectors():
    return json.loads(VECTORS_PATH.read_text())


@pytest.fixture
def server(tmp_path):
    """An MTop server in this process on 127.0.0.1 (real TLS, real SQLite)
    with user alice / pw; yields (factory, port number, certificate paths)."""
    paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    db_path = tmp_path / "users.db"
    db = sqlite3.connect(db_path)
    db.execute(SQLITE_SCHEMA)
    db.execute(
        "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
        ("alice", "s", passwords.legacy_hash("s", "pw")),
    )
    db.commit()
    db.close()
    store = SQLiteUserStore(str(db_path))
    store.startService()
    auth = Authenticator(
        store, reactor, lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)
    )
    factory = TunnelFactory(auth, Dialer(reactor, 5, LOOPBACK_ACL), reactor, TunnelSettings(handshake_timeout=5))
    ctx = server_context(paths.server_crt, paths.server_key, "mtop")
    port = reactor.listenTCP(0, server_tls_factory(factory, lambda: ctx), interface="127.0.0.1")
    yield factory, port.getHost().port, paths
    port.stopListening()
    store.stopService()
    for tunnel in list(factory.tunnels):
        tunnel.transport.abortConnection()




# Real databases: each test session gets its own throwaway database on the
# local PostgreSQL and MariaDB servers, dropped at the end.



def _session_db_name():
    import os
    import secrets

    return f"mtop_test_{os.getpid()}_{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def postgres_dsn():
    """A libpq DSN of a fresh PostgreSQL database for this test session."""
    from helpers import fresh_postgres_database

    yield from fresh_postgres_database(_session_db_name())


@pytest.fixture(scope="session")
def mysql_dsn():
    """A Go-style DSN of a fresh MariaDB database for this test session."""
    from helpers import fresh_mysql_database

    yield from fresh_mysql_database(_session_db_name())


#: The QUIC libraries the suite runs the QUIC tests on (both are test
#: requirements; ``quic.backend`` chooses one in a config).
QUIC_BACKENDS = ("qh3", "aioquic")


@pytest.fixture(params=QUIC_BACKENDS)
def quic_backend(request, monkeypatch):
    """Runs the test once per QUIC library: ``auto`` (what the code under
    test asks for unless told otherwise) means this one."""
    from mtop.quic import backend

    backend.load(request.param)  # fails loudly when it is not installed
    monkeypatch.setattr(backend, "PREFERENCE", (request.param,))
    return request.param
