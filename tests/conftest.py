import json
import pathlib
import sqlite3

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

from mtop import passwords
from mtop.auth import Authenticator
from mtop.certs import init_certs
from mtop.dialer import Dialer
from mtop.schema import SQLITE_SCHEMA
from mtop.server import ServerSettings, TunnelFactory
from mtop.tls import server_context
from mtop.tlstransport import server_tls_factory
from mtop.userstore.sqlite import SQLiteUserStore

VECTORS_PATH = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "mtop-v1.json"


@pytest.fixture(scope="session")
def vectors():
    if not VECTORS_PATH.exists():
        pytest.fail(f"wire vectors missing at {VECTORS_PATH}: the checkout needs ../shared beside it")
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
    factory = TunnelFactory(auth, Dialer(reactor, 5), reactor, ServerSettings(handshake_timeout=5))
    ctx = server_context(paths.server_crt, paths.server_key, "mtop")
    port = reactor.listenTCP(0, server_tls_factory(factory, lambda: ctx), interface="127.0.0.1")
    yield factory, port.getHost().port, paths
    port.stopListening()
    store.stopService()
    for tunnel in list(factory.tunnels):
        tunnel.transport.abortConnection()


