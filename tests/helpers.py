"""Small peers shared by the loopback test modules (importable because
pytest puts this directory on sys.path)."""

import socket

import pytest

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mtop.acl import DestinationACL, parse_network

#: Tests reach their own peers on loopback, which the default ACL refuses.
LOOPBACK_ACL = DestinationACL(allow=(parse_network("127.0.0.0/8"), parse_network("::1/128")))


@implementer(IHalfCloseableProtocol)
class EchoAfterEOF(Protocol):
    """Collects until EOF, then answers ``got:`` + what it read and closes:
    works only if half-close is carried end to end."""

    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.transport.write(b"got:" + self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


#: The local PostgreSQL's admin database (the test databases are made and
#: dropped from it).
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
PG_START_COMMAND = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
MYSQL_ADMIN = dict(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=5)
MYSQL_START_COMMAND = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"


def run_sql(settings, text, params=()):
    """Run one statement on a test database (as any other program would,
    through `mtop.database.connect`); the rows if it returns any."""
    from mtop.database import connect

    db = connect(settings, create=settings.driver == "sqlite")
    try:
        cursor = db.execute(text, params)
        rows = cursor.fetchall() if cursor.description else None
        db.commit()
        return rows
    finally:
        db.close()


def send_half_close_read(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Blocking client: send, shut the write side, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def echo_through(tunnel, payload: bytes) -> bytes:
    """Send ``payload`` through an open climber ``tunnel`` (a
    `climber.tunnel.ServerTunnel`) to an echo target, half-close, and
    return what comes back."""
    from twisted.internet.defer import Deferred

    answer = []
    done: Deferred = Deferred()
    tunnel.attach(answer.append, lambda: done.callback(None), lambda: done.called or done.callback(None))
    tunnel.transport.write(payload)
    tunnel.transport.loseWriteConnection()
    await done
    tunnel.transport.loseConnection()  # both ways shut: the relay's job otherwise
    return b"".join(answer)


def fresh_postgres_database(name: str):
    """A generator (for a fixture): creates PostgreSQL database ``name``,
    yields its libpq DSN, drops it."""
    import psycopg2

    try:
        admin = psycopg2.connect(PG_ADMIN_DSN)
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({e}); start it with: {PG_START_COMMAND}")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def fresh_mysql_database(name: str):
    """A generator (for a fixture): creates MariaDB database ``name``,
    yields its Go-style DSN, drops it."""
    import pymysql

    try:
        admin = pymysql.connect(**MYSQL_ADMIN, autocommit=True)
    except pymysql.err.OperationalError as e:
        pytest.fail(f"MariaDB is not reachable on 127.0.0.1:3306 ({e}); start it with: {MYSQL_START_COMMAND}")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"root:@tcp(127.0.0.1:3306)/{name}?parseTime=true"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()
