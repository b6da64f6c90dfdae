import os
import sqlite3

import pytest
import pytest_twisted

from mtop import passwords
from mtop.ctl import main


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "mtop.yaml"
    path.write_text("server:\n  crt: server.crt\n  key: server.key\ndb:\n  driverName: sqlite\n  dsn: users.db\n")
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_user_lifecycle(config, tmp_path, capsys):
    assert run(capsys, "-c", config, "db", "init")[0] == 0
    assert run(capsys, "-c", config, "user", "add", "-u", "alice", "-p", "pw1")[0] == 0
    assert run(capsys, "-c", config, "user", "add", "-u", "old", "-p", "123456", "-s", "abcdefghijkl", "--legacy")[0] == 0
    rows = dict(sqlite3.connect(tmp_path / "users.db").execute("SELECT username, password FROM mtop_user"))
    assert passwords.verify(rows["alice"], "", "pw1") and rows["alice"].startswith("$scrypt$")
    assert rows["old"] == "6baff1c350ee6a3bd3209c64779510f8d8b55a8c7ac55fcd4d0247ebb2e7d2bc"
    code, out, err = run(capsys, "-c", config, "user", "add", "-u", "alice", "-p", "x")
    assert code == 1 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert run(capsys, "-c", config, "user", "passwd", "-u", "alice", "-p", "pw2")[0] == 0
    stored = sqlite3.connect(tmp_path / "users.db").execute("SELECT password FROM mtop_user WHERE username='alice'").fetchone()[0]
    assert passwords.verify(stored, "", "pw2")
    code, out, err = run(capsys, "-c", config, "user", "list")
    assert "alice" in out and "old" in out and "pw2" not in out and stored not in out
    assert run(capsys, "-c", config, "user", "del", "-u", "alice")[0] == 0
    code, out, err = run(capsys, "-c", config, "user", "del", "-u", "alice")
    assert code == 1 and "no user" in err


def test_password_from_stdin(config, tmp_path, capsys, monkeypatch):
    import io

    run(capsys, "-c", config, "db", "init")
    monkeypatch.setattr("sys.stdin", io.StringIO("fromstdin\n"))
    assert run(capsys, "-c", config, "user", "add", "-u", "bob", "--password-stdin")[0] == 0
    stored = sqlite3.connect(tmp_path / "users.db").execute("SELECT password FROM mtop_user").fetchone()[0]
    assert passwords.verify(stored, "", "fromstdin")


def test_missing_database_is_one_clear_line(config, capsys):
    code, out, err = run(capsys, "-c", config, "user", "list")
    assert code == 1 and "mtopctl db init" in err and "Traceback" not in err


def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000])
def test_db_init_creates_the_sqlite_database_private(config, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        code, out, err = run(capsys, "-c", config, "db", "init")
    finally:
        os.umask(old)
    assert code == 0 and err == ""
    db_path = tmp_path / "users.db"
    assert _mode(db_path) == 0o600
    assert run(capsys, "-c", config, "user", "add", "-u", "alice", "-p", "Alice-pw-1")[0] == 0
    assert _mode(db_path) == 0o600
    # SQLite's rollback journal, which holds pages of the table while a
    # write is under way, gets the database's mode.
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE mtop_user SET salt = 'x'")
        assert _mode(f"{db_path}-journal") == 0o600
        db.execute("ROLLBACK")
    finally:
        db.close()


def test_db_init_in_a_new_directory(tmp_path, capsys):
    path = tmp_path / "mtop.yaml"
    path.write_text("server:\n  crt: server.crt\n  key: server.key\ndb:\n  driverName: sqlite\n  dsn: state/users.db\n")
    assert run(capsys, "-c", str(path), "db", "init")[0] == 0
    assert _mode(tmp_path / "state" / "users.db") == 0o600


def test_db_init_names_an_existing_world_readable_database(config, tmp_path, capsys):
    db_path = tmp_path / "users.db"
    sqlite3.connect(db_path).close()
    os.chmod(db_path, 0o644)
    code, out, err = run(capsys, "-c", config, "db", "init")
    assert code == 0 and "database ready" in out
    # Left as it is (the operator may have reasons), with the fix named.
    assert _mode(db_path) == 0o644
    assert len(err.strip().splitlines()) == 1
    assert str(db_path) in err and "0644" in err and f"chmod 600 {db_path}" in err
    os.chmod(db_path, 0o600)
    assert run(capsys, "-c", config, "db", "init")[2] == ""


@pytest.mark.parametrize("where", ["afile/users.db", "x" * 300 + ".db"])
def test_db_init_that_cannot_create_the_database_says_so_in_one_line(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("")
    path = tmp_path / "mtop.yaml"
    path.write_text(f"server:\n  crt: server.crt\n  key: server.key\ndb:\n  driverName: sqlite\n  dsn: {where}\n")
    code, out, err = run(capsys, "-c", str(path), "db", "init")
    assert code == 1 and "cannot create SQLite database" in err and len(err.strip().splitlines()) == 1


def test_url_matches_the_vectors(vectors, capsys):
    for case in vectors["share_url"]["cases"]:
        code, out, err = run(
            capsys, "url", "-u", case["username"], "-p", case["password"], "-H", case["host"],
            "-P", str(case["port"]), "-t", case["type"], "-o", case["proto"],
        )
        assert code == 0 and out.strip() == case["url"]


def test_cert_init_writes_usable_files(tmp_path, capsys):
    from mtop.tls import server_context

    code, out, err = run(capsys, "cert", "init", "--host", "vpn.example", "--ip", "127.0.0.1", "--dir", str(tmp_path))
    assert code == 0
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0
    server_context(str(tmp_path / "server.crt"), str(tmp_path / "server.key"), "mtop")
    code, out, err = run(capsys, "cert", "init", "--host", "vpn.example", "--dir", str(tmp_path))
    assert code == 1 and "--force" in err


def test_cert_init_makes_a_ca_and_an_ecdsa_p256_server_certificate(tmp_path, capsys):
    """What the original README's openssl recipe made: a CA, and a P-256
    server certificate it signed for the names given, plus the config lines."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    code, out, err = run(
        capsys, "cert", "init", "--host", "vpn.example", "--ip", "203.0.113.7", "--dir", str(tmp_path)
    )
    assert code == 0, err
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    chain = x509.load_pem_x509_certificates((tmp_path / "server.crt").read_bytes())
    leaf = chain[0]
    assert [c.subject for c in chain] == [leaf.subject, ca.subject]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["vpn.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.7")]
    for cert, key_file in ((leaf, "server.key"), (ca, "ca.key")):
        key = serialization.load_pem_private_key((tmp_path / key_file).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        assert cert.public_key() == key.public_key()
        assert (tmp_path / key_file).stat().st_mode & 0o777 == 0o600
    # The lines for both configs, with absolute paths.
    lines = out.splitlines()
    mtop_part = lines[lines.index("mtop.yaml:") :]
    assert f"    crt: {tmp_path / 'server.crt'}" in mtop_part and f"    key: {tmp_path / 'server.key'}" in mtop_part
    climber_part = lines[[i for i, line in enumerate(lines) if line.startswith("climber.yaml")][0] :]
    assert '    - host: "vpn.example:443"' in climber_part
    assert f"      ca: {tmp_path / 'ca.crt'}" in climber_part


def test_cert_init_group_makes_the_server_key_group_readable(tmp_path, capsys):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    code, out, err = run(capsys, "cert", "init", "--host", "localhost", "--dir", str(tmp_path), "--group", group)
    assert code == 0, err
    key = (tmp_path / "server.key").stat()
    assert (key.st_mode & 0o777, key.st_gid) == (0o640, os.getgid())
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    code, out, err = run(
        capsys, "cert", "init", "--host", "localhost", "--dir", str(tmp_path / "x"), "--group", "no-such-group-x"
    )
    assert code == 1 and err.strip().endswith("--group no-such-group-x: no such group")


@pytest.mark.parametrize(
    "text, size",
    [("512K", 512 << 10), ("10M", 10 << 20), ("2GiB", 2 << 30), ("1.5g", 3 << 29), ("100", 100), ("none", None)],
)
def test_sizes(text, size):
    from mtop.ctl import _size

    assert _size(text) == size


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "", "12Q", "9999999T"])
def test_bad_sizes_are_one_line_errors(text):
    import argparse

    from mtop.ctl import _size

    with pytest.raises(argparse.ArgumentTypeError):
        _size(text)


# --version

def test_version_is_the_distributions(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"mtopctl {metadata.version('mtop')}\n"


# user hash, and the original's row format from user add --legacy

def test_user_hash_prints_the_two_column_values(capsys):
    code, out, err = run(capsys, "user", "hash", "-p", "Pw-1")
    assert code == 0 and err == ""
    salt_line, password_line = out.splitlines()
    salt, stored = salt_line.removeprefix("salt="), password_line.removeprefix("password=")
    assert salt_line.startswith("salt=") and password_line.startswith("password=")
    assert stored.startswith("$scrypt$") and passwords.verify(stored, salt, "Pw-1")
    assert not passwords.verify(stored, salt, "Pw-2")


def test_user_hash_legacy_is_the_originals_format(capsys, monkeypatch):
    import io
    import re

    monkeypatch.setattr("sys.stdin", io.StringIO("Old-pw 2\n"))
    code, out, err = run(capsys, "user", "hash", "--legacy", "--password-stdin")
    assert code == 0
    salt, stored = (line.split("=", 1)[1] for line in out.splitlines())
    assert re.fullmatch(r"[A-Za-z0-9]{12}", salt)
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert stored == passwords.legacy_hash(salt, "Old-pw 2")


def test_user_hash_insert_statement_adds_a_user_that_logs_in(config, tmp_path, capsys):
    run(capsys, "-c", config, "db", "init")
    code, out, err = run(capsys, "user", "hash", "-u", "o'brien", "-p", "Pw-3")
    assert code == 0 and len(out.splitlines()) == 1
    assert out.startswith("INSERT INTO mtop_user (username, salt, password) VALUES ('o''brien', '")
    db = sqlite3.connect(tmp_path / "users.db")
    db.executescript(out)
    salt, stored = db.execute("SELECT salt, password FROM mtop_user WHERE username = ?", ("o'brien",)).fetchone()
    assert passwords.verify(stored, salt, "Pw-3")


@pytest.mark.parametrize("argv", [("-u", "back\\slash"), ("-u", "a", "-s", "x\\y"), ("-u", "")])
def test_user_hash_refuses_what_a_literal_would_change(capsys, argv):
    code, out, err = run(capsys, "user", "hash", "-p", "x", *argv)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1


def test_user_add_legacy_writes_the_originals_row(config, tmp_path, capsys):
    """12-character salt, lowercase hex SHA-256 of salt@password: the row the
    original's mctl writes (the other databases: tests/test_userstores.py)."""
    import hashlib
    import re

    run(capsys, "-c", config, "db", "init")
    assert run(capsys, "-c", config, "user", "add", "-u", "old", "-p", "Old-pw", "--legacy")[0] == 0
    salt, stored = sqlite3.connect(tmp_path / "users.db").execute("SELECT salt, password FROM mtop_user").fetchone()
    assert re.fullmatch(r"[A-Za-z0-9]{12}", salt)
    assert stored == hashlib.sha256(f"{salt}@Old-pw".encode()).hexdigest()
    assert run(capsys, "-c", config, "user", "passwd", "-u", "old", "-p", "New-pw", "--legacy")[0] == 0
    salt, stored = sqlite3.connect(tmp_path / "users.db").execute("SELECT salt, password FROM mtop_user").fetchone()
    assert len(salt) == 12 and stored == hashlib.sha256(f"{salt}@New-pw".encode()).hexdigest()


# url --qr, --qr-file

def _png_modules(path):
    """The dark/light matrix of a segno PNG (1-bit greyscale, filters None
    and Up), one entry per module: a small decoder, so the test does not
    trust segno to read back what it wrote."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert (depth, colour) in ((1, 0), (1, 3))
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = (width + 7) // 8
    rows, previous = [], bytes(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        kind, line = line[0], bytearray(line[1:])
        assert kind in (0, 2)
        if kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        previous = bytes(line)
        rows.append([(line[x // 8] >> (7 - x % 8)) & 1 for x in range(width)])
    if colour == 3:  # a palette: find which index is dark
        palette = chunks[b"PLTE"][0]
        dark_index = 0 if sum(palette[0:3]) < sum(palette[3:6]) else 1
        rows = [[1 if v == dark_index else 0 for v in row] for row in rows]
    else:  # greyscale: 0 is black
        rows = [[1 - v for v in row] for row in rows]
    return rows


def _expected_modules(link, border=4, scale=1):
    from mtop.ctl.url import qr_code

    matrix = [[1 if m else 0 for m in row] for row in qr_code(link).matrix]
    size = len(matrix) + 2 * border
    padded = [[0] * size for _ in range(border)]
    padded += [[0] * border + row + [0] * border for row in matrix]
    padded += [[0] * size for _ in range(border)]
    return [[v for v in row for _ in range(scale)] for row in padded for _ in range(scale)]


LINK_ARGS = ("url", "-u", "alice", "-p", "s3cret/pw", "-H", "vpn.example", "-t", "quic")
LINK = "mtop://alice:s3cret%2Fpw@vpn.example:443/quic?proto=mtop"


def test_url_qr_draws_the_link_in_the_terminal(capsys):
    import segno

    code, out, err = run(capsys, *LINK_ARGS, "--qr")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == LINK
    # Each character is two modules, top and bottom; a blank is dark.
    halves = {" ": (1, 1), "\u2580": (0, 1), "\u2584": (1, 0), "\u2588": (0, 0)}
    modules = []
    for line in lines[1:]:
        modules += [[halves[c][0] for c in line], [halves[c][1] for c in line]]
    expected = _expected_modules(LINK)
    assert modules[: len(expected)] == expected
    # The half line below an odd number of rows is left blank.
    assert len(modules) - len(expected) <= 1 and all(v == 1 for row in modules[len(expected) :] for v in row)
    code = segno.make_qr(LINK)
    assert not code.is_micro


def test_url_qr_file_writes_png_and_svg(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from mtop.ctl.url import QR_FILE_SCALE, qr_code

    png, svg = tmp_path / "link.png", tmp_path / "link.SVG"
    for path in (png, svg):
        code, out, err = run(capsys, *LINK_ARGS, "--qr-file", str(path))
        assert code == 0 and out == LINK + "\n"
        assert path.stat().st_mode & 0o777 == 0o600  # the password is in it
    assert _png_modules(png) == _expected_modules(LINK, scale=QR_FILE_SCALE)
    assert ET.fromstring(svg.read_bytes()).tag == "{http://www.w3.org/2000/svg}svg"
    import io

    again = io.BytesIO()
    qr_code(LINK).save(again, kind="svg", scale=QR_FILE_SCALE)
    assert svg.read_bytes() == again.getvalue()


def test_url_qr_file_of_another_kind_is_one_line_before_any_prompt(tmp_path, capsys):
    code, out, err = run(capsys, "url", "-u", "a", "-H", "h", "--qr-file", str(tmp_path / "x.gif"))
    assert code == 1 and out == "" and "must end in .png or .svg" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.gif").exists()


# check, over TLS and QUIC, against the in-process server

@pytest.fixture
def quic_port(server):
    """The in-process server's tunnel factory also served over QUIC."""
    from twisted.internet import reactor

    from mtop.quic.server import QuicServerProtocol, server_configuration

    factory, _, paths = server
    protocol = QuicServerProtocol(reactor, factory, server_configuration(paths.server_crt, paths.server_key, "mtop", 30), 5)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    yield port.getHost().port
    protocol.close_all()
    port.stopListening()


@pytest.fixture
def target_port():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def check_process(*argv):
    """``mtopctl check`` as its own process (it runs a reactor for QUIC),
    in a thread so the in-process server keeps serving."""
    import subprocess
    import sys
    from pathlib import Path

    from twisted.internet.threads import deferToThread

    root = Path(__file__).resolve().parents[1]
    return deferToThread(
        subprocess.run, [sys.executable, "-m", "mtop.ctl", "check", *argv],
        capture_output=True, text=True, timeout=60, cwd=root,
    )


@pytest.mark.parametrize("kind", ["tls", "quic"])
@pytest_twisted.ensureDeferred
async def test_check_reports_one_line_for_tls_and_quic(quic_backend, server, quic_port, target_port, kind):
    import re

    port = quic_port if kind == "quic" else server[1]
    ca = server[2].ca_crt
    target = f"127.0.0.1:{target_port}"
    result = await check_process("--ca", ca, "--target", target, f"mtop://alice:pw@127.0.0.1:{port}/{kind}?proto=mtop")
    assert result.returncode == 0, result.stderr
    version = "QUIC" if kind == "quic" else "TLSv1.3"
    assert re.fullmatch(
        rf"OK: {version}, ALPN mtop, handshake \d+\.\d ms; tunnel to {target} open after \d+\.\d ms\n", result.stdout
    ), result.stdout
    assert result.stderr == ""
    # Failures: one line, exit status 1.
    failures = [
        (f"mtop://alice:Bad-pw-9@127.0.0.1:{port}/{kind}", ["--ca", ca], "without a reply"),
        (f"mtop://alice:pw@127.0.0.1:{port}/{kind}", [], f"127.0.0.1:{port}: "),  # untrusted certificate
    ]
    if kind == "quic":
        failures.append((f"mtop://alice:pw@127.0.0.1:{target_port}/quic", ["--ca", ca, "--timeout", "1"], "timeout"))
    for link, extra, words in failures:
        result = await check_process(*extra, "--target", target, link)
        assert result.returncode == 1 and result.stdout == "", result
        assert len(result.stderr.splitlines()) == 1 and words in result.stderr, result.stderr
        assert result.stderr.startswith("mtopctl: error: ") and "Bad-pw-9" not in result.stderr
