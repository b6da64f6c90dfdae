"""The admin API (``twistd mtop-admin``, and ``admin.listen`` in ``twistd
mtop``): bearer tokens, the users routes with the same validation as
mtopctl, JSON errors naming the field, bounded requests, throttled bad
tokens, audit lines, the OpenAPI description kept true, and a 10,000-user
list's response time."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
import socket
import time

import pytest

from conftest import TwistdProcess, _start, run_ctl
from test_hardening_e2e import start_server  # noqa: F401 (a fixture)
from mtop import adminapi

LISTENING = re.compile(r"Admin API listening on 127\.0\.0\.1:(\d+)")


class AdminProcess(TwistdProcess):
    plugin = "mtop-admin"
    kind = "mtop admin API"

    def _wait_ready(self) -> None:
        self.port = int(self.wait_for(LISTENING, 30, what="the listening line").group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def admin_setup(tmp_path):
    """(the API process, a token, the config): a SQLite database with the
    admin table, one admin and their token."""
    config = tmp_path / "mtop.yaml"
    config.write_text(
        "server: {listen: ':8443', crt: x.crt, key: x.key}\n"
        "listeners: [{type: tls}, {type: wss, listen: ':443', path: /ws}, {type: ws, path: /ws}]\n"
        "db: {driverName: sqlite, dsn: users.db}\n"
        "auth_throttle: {max_failures: 3, window: 60, ban: 60}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
    )
    run_ctl(config, "db", "init")
    run_ctl(config, "admin", "add", "-n", "root", "--password-stdin", stdin="Root-pw-1\n")
    token = run_ctl(config, "admin", "token", "-n", "root", "--label", "tests").strip()
    assert token.startswith("mtopadm_")
    generator = _start(AdminProcess("admin", config, tmp_path))
    process = next(generator)
    yield process, token, config
    next(generator, None)


def call(process, method: str, path: str, token: str | None = None, body=None, raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict | None, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    assert response.getheader("content-type") == "application/json; charset=utf-8"
    return response.status, (json.loads(payload) if payload else None), dict(response.getheaders())


def test_users_routes(admin_setup):
    process, token, config = admin_setup
    assert call(process, "GET", "/api/v1/me", token)[:2] == (200, {"admin": "root"})
    status, body, _ = call(process, "POST", "/api/v1/users", token, {"username": "alice", "quota_bytes": "10G", "rate_limit": 1048576})
    assert status == 201 and len(body["password"]) >= 20  # generated, shown once
    assert (body["user"]["quota_bytes"], body["user"]["rate_limit"], body["user"]["password"]) == (10 << 30, 1 << 20, "scrypt")
    # mtopctl sees the same user, and the generated password logs in (checked by the hash).
    assert "alice" in run_ctl(config, "user", "list")
    status, body, _ = call(process, "POST", "/api/v1/users", token, {"username": "bob", "password": "Bob-pw-12"})
    assert status == 201 and "password" not in body
    status, body, _ = call(process, "PATCH", "/api/v1/users/bob", token, {"enabled": False, "expires_at": "2030-01-01"})
    assert status == 200 and (body["user"]["enabled"], body["user"]["expires_at"]) == (False, "2030-01-01 00:00:00")
    status, body, _ = call(process, "GET", "/api/v1/users?sort=username&order=desc&per_page=1", token)
    assert (status, body["total"], [u["username"] for u in body["users"]]) == (200, 2, ["bob"])
    assert [u["username"] for u in call(process, "GET", "/api/v1/users?q=LIC", token)[1]["users"]] == ["alice"]
    db = sqlite3.connect(config.parent / "users.db")
    db.execute("UPDATE mtop_user SET bytes_up = 10, bytes_down = 5 WHERE username = 'bob'")
    db.commit()
    db.close()
    assert call(process, "GET", "/api/v1/users/bob", token)[1]["user"]["used"] == 15
    assert call(process, "POST", "/api/v1/users/bob/reset-usage", token)[1]["user"]["used"] == 0
    assert call(process, "DELETE", "/api/v1/users/bob", token)[:2] == (204, None)
    assert call(process, "GET", "/api/v1/users/bob", token)[:2] == (404, {"error": {"message": "no user 'bob'", "field": "username"}})
    log = process.log()
    assert "admin root: created user=alice rate_limit=1048576 quota_bytes=10737418240" in log
    assert "admin root: changed user=bob enabled=False expires_at=2030-01-01 00:00:00" in log
    assert "admin root: deleted user=bob" in log
    assert "Bob-pw-12" not in log and token not in log and "Traceback" not in log


@pytest.mark.parametrize(
    "method, path, body, status, field, message",
    [
        ("POST", "/api/v1/users", {"username": "x" * 129}, 400, "username", "must be 1 to 128 bytes long"),
        ("POST", "/api/v1/users", {"username": "carol", "password": ""}, 400, "password", "must not be empty"),
        ("POST", "/api/v1/users", {"username": "carol", "quota": 1}, 400, "quota", "unknown field 'quota'"),
        ("POST", "/api/v1/users", {"username": "carol", "max_connections": -2}, 400, "max_connections", "must be from 0"),
        ("POST", "/api/v1/users", {"username": "carol", "enabled": "yes"}, 400, "enabled", "true or false"),
        ("PATCH", "/api/v1/users/nobody", {"enabled": True}, 404, "username", "no user 'nobody'"),
        ("PATCH", "/api/v1/users/nobody", {}, 400, None, "nothing to change"),
        ("GET", "/api/v1/users?per_page=100000", None, 400, "per_page", "from 1 to 500"),
        ("GET", "/api/v1/users?sort=password", None, 400, "sort", "cannot sort by 'password'"),
        ("GET", "/api/v1/usage?step=301", None, 400, "step", "multiple of 300 seconds"),
        ("GET", "/api/v1/usage?hours=720&step=300", None, 400, "step", "at least 1500 for 720 hours"),
        ("GET", "/api/v1/usage?hours=0", None, 400, "hours", "from 1 to 87600"),
        ("GET", "/api/v1/users/nobody/usage", None, 404, "username", "no user 'nobody'"),
        ("PUT", "/api/v1/users", {}, 405, None, "PUT is not allowed here"),
        ("GET", "/api/v1/nothing", None, 404, None, "no such API path"),
    ],
)
def test_bad_requests_get_json_naming_the_field(admin_setup, method, path, body, status, field, message):
    process, token, _ = admin_setup
    got, answer, _ = call(process, method, path, token, body)
    assert got == status and answer["error"]["field"] == field and message in answer["error"]["message"], answer


def test_requests_are_bounded_and_refused_cleanly(admin_setup):
    process, token, _ = admin_setup
    big = json.dumps({"username": "x", "pad": "a" * (adminapi.MAX_BODY + 10)}).encode()
    assert call(process, "POST", "/api/v1/users", token, raw=big, headers={"Content-Type": "application/json"})[0] == 413
    assert call(process, "POST", "/api/v1/users", token, raw=b"{nope", headers={"Content-Type": "application/json"})[0] == 400
    assert call(process, "POST", "/api/v1/users", token, raw=b"username=x", headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert call(process, "POST", "/api/v1/users", token, raw=b"[1]", headers={"Content-Type": "application/json"})[0] == 400
    status, _, headers = call(process, "GET", "/api/v1/me")
    assert status == 401 and headers.get("WWW-Authenticate") == 'Bearer realm="mtop"'
    assert "Traceback" not in process.log()


def test_bad_tokens_are_throttled_per_address(admin_setup):
    process, token, _ = admin_setup
    for _ in range(3):
        assert call(process, "GET", "/api/v1/me", "mtopadm_wrong")[0] == 401
    # Banned: even the right token waits out the ban from this address.
    status, body, _ = call(process, "GET", "/api/v1/me", token)
    assert status == 429 and "too many failed logins" in body["error"]["message"]
    process.wait_for(r"admin API: client 127\.0\.0\.1 banned after failed logins", 10)


def test_openapi_describes_every_route_and_the_answers(admin_setup):
    process, token, _ = admin_setup
    status, spec, _ = call(process, "GET", "/api/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert described == {(method, pattern) for method, pattern, _, _ in adminapi.ROUTES}
    # What the API answers has only the fields the description names.
    call(process, "POST", "/api/v1/users", token, {"username": "dora", "password": "Dora-pw-1"})
    user = call(process, "GET", "/api/v1/users/dora", token)[1]["user"]
    schema = spec["paths"]["/api/v1/users/{name}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(user) <= set(schema["properties"]["user"]["properties"])
    listing = call(process, "GET", "/api/v1/users", token)[1]
    list_schema = spec["paths"]["/api/v1/users"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(listing) == set(list_schema["properties"])
    create = spec["paths"]["/api/v1/users"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(create["properties"]) == {"username", "password", *adminapi.POLICY}
    change = spec["paths"]["/api/v1/users/{name}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(change["properties"]) == set(adminapi.CHANGE_FIELDS)


def test_usage_history(admin_setup):
    """Traffic over time from mtop_usage_history: every point present,
    summed over servers, and per server; the cluster's from the servers'
    own rows (username ''); the answer has only the fields the OpenAPI
    description names."""
    process, token, config = admin_setup
    for name in ("alice", "bob"):
        assert call(process, "POST", "/api/v1/users", token, {"username": name, "password": "Pw-123456"})[0] == 201
    now = int(time.time())
    db = sqlite3.connect(config.parent / "users.db")
    rows = [("s1", "alice", now // 300 * 300, 10, 100), ("s2", "alice", now // 300 * 300, 1, 2),
            ("s1", "alice", (now - 7200) // 300 * 300, 5, 50), ("s1", "bob", (now - 600) // 300 * 300, 1000, 1),
            ("s1", "alice", (now - 30 * 3600) // 300 * 300, 7, 7), ("s1", "", now // 300 * 300, 1, 2),
            ("s2", "", now // 300 * 300, 3, 4), ("s1", "", (now - 40 * 3600) // 300 * 300, 5, 6)]
    db.executemany("INSERT INTO mtop_usage_history (server_id, username, period, bytes_up, bytes_down) VALUES (?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    status, body, _ = call(process, "GET", "/api/v1/users/alice/usage?hours=24&step=3600", token)
    assert status == 200 and body["step"] == 3600 and len(body["points"]) == 24
    assert [p["t"] for p in body["points"]] == list(range(body["since"], body["until"], 3600))
    assert body["points"][-1] == {"t": body["until"] - 3600, "up": 11, "down": 102}
    assert sum(p["up"] for p in body["points"]) == 16  # not the row from 30 hours ago
    assert body["servers"] == [{"server": "s1", "up": 15, "down": 150}, {"server": "s2", "up": 1, "down": 2}]
    status, everyone, _ = call(process, "GET", "/api/v1/usage?hours=48", token)
    assert status == 200 and everyone["step"] == 600 and len(everyone["points"]) == 288  # the default: about 288 points
    assert sum(p["up"] for p in everyone["points"]) == 9 and sum(p["down"] for p in everyone["points"]) == 12
    assert everyone["servers"] == [{"server": "s1", "up": 6, "down": 8}, {"server": "s2", "up": 3, "down": 4}]
    spec = call(process, "GET", "/api/v1/openapi.json")[1]
    for path, answer in (("/api/v1/users/{name}/usage", body), ("/api/v1/usage", everyone)):
        schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert set(answer) == set(schema["properties"]), path
    # Deleting a user drops their history, not the servers'.
    assert call(process, "DELETE", "/api/v1/users/alice", token)[0] == 204
    db = sqlite3.connect(config.parent / "users.db")
    assert db.execute("SELECT DISTINCT username FROM mtop_usage_history ORDER BY username").fetchall() == [("",), ("bob",)]
    db.close()


def test_a_list_of_10000_users(admin_setup):
    process, token, config = admin_setup
    db = sqlite3.connect(config.parent / "users.db")
    db.executemany(
        "INSERT INTO mtop_user (username, salt, password, bytes_up, quota_bytes) VALUES (?, 's', 'x', ?, ?)",
        [(f"user{i:05d}", i, (i % 7) << 30) for i in range(10000)],
    )
    db.commit()
    db.close()
    timings = {}
    for name, path in (
        ("first page of 50", "/api/v1/users"),
        ("page 100 of 50", "/api/v1/users?page=100"),
        ("500 by usage", "/api/v1/users?per_page=500&sort=used&order=desc"),
        ("search", "/api/v1/users?q=user0999"),
    ):
        samples = []
        for _ in range(5):
            started = time.monotonic()
            status, body, _ = call(process, "GET", path, token)
            samples.append((time.monotonic() - started) * 1000)
            assert status == 200 and body["total"] in (10000, 10)
        timings[name] = sorted(samples)[len(samples) // 2]
    print("admin API, 10,000 users, median of 5:", ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))
    assert call(process, "GET", "/api/v1/users?per_page=500&sort=used&order=desc", token)[1]["users"][0]["username"] == "user09999"


def test_the_server_serves_the_api_too(start_server, e2e_setup, tmp_path):  # noqa: F811
    port = free_port()
    server = start_server(f"admin:\n  listen: 127.0.0.1:{port}\n")
    server.wait_for(rf"Admin API listening on 127\.0\.0\.1:{port} \(http, /api/v1/\)", 10)
    config = server.config
    run_ctl(config, "db", "upgrade")
    run_ctl(config, "admin", "add", "-n", "ops", "--password-stdin", stdin="Ops-pw-123\n")
    token = run_ctl(config, "admin", "token", "-n", "ops").strip()
    api = AdminProcess.__new__(AdminProcess)  # only its port is used by call()
    api.port = port
    assert call(api, "GET", "/api/v1/me", token)[:2] == (200, {"admin": "ops"})
    status, body, _ = call(api, "GET", "/api/v1/users", token)
    assert status == 200 and e2e_setup.alice.name in {u["username"] for u in body["users"]}


def test_a_browser_session_with_csrf(admin_setup):
    process, token, config = admin_setup
    status, body, headers = call(process, "POST", "/api/v1/session", body={"name": "root", "password": "Root-pw-1"})
    assert status == 200 and body["admin"] == "root" and len(body["csrf"]) > 20
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("mtop_session=") and "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie
    session = {"Cookie": cookie.split(";")[0]}
    assert call(process, "GET", "/api/v1/me", headers=session)[:2] == (200, {"admin": "root"})
    assert call(process, "GET", "/api/v1/session", headers=session)[1] == body
    # A change with the cookie alone (a cross-site form could send that): refused.
    status, answer, _ = call(process, "POST", "/api/v1/users", body={"username": "eve"}, headers=session)
    assert status == 403 and "X-CSRF-Token" in answer["error"]["message"]
    status, _, _ = call(process, "POST", "/api/v1/users", body={"username": "eve"}, headers={**session, "X-CSRF-Token": body["csrf"]})
    assert status == 201
    process.wait_for(r"admin root: created user=eve", 10)
    # Logging out ends the session.
    assert call(process, "DELETE", "/api/v1/session", headers={**session, "X-CSRF-Token": body["csrf"]})[0] == 204
    assert call(process, "GET", "/api/v1/me", headers=session)[0] == 401
    # A wrong password: 401, counted against the address.
    status, answer, _ = call(process, "POST", "/api/v1/session", body={"name": "root", "password": "nope"})
    assert status == 401 and answer["error"]["field"] == "password"
    assert "Root-pw-1" not in process.log() and "nope" not in process.log()


def test_share_links_with_qr_codes(admin_setup):
    process, token, config = admin_setup
    call(process, "POST", "/api/v1/users", token, {"username": "frank", "password": "Frank-pw-1"})
    status, body, _ = call(process, "POST", "/api/v1/links", token,
                           {"username": "frank", "password": "Frank-pw-1", "host": "vpn.example.com"})
    assert status == 200
    # The config's TLS and wss listeners (the ws one is behind a proxy: no link).
    assert [link["url"] for link in body["links"]] == [
        "mtop://frank:Frank-pw-1@vpn.example.com:8443/tls?proto=mtop",
        "mtop://frank:Frank-pw-1@vpn.example.com:443/wss?path=/ws",
    ]
    for link in body["links"]:
        assert link["qr_svg"].startswith("<svg") and link["qr_svg"].rstrip().endswith("</svg>")
    assert call(process, "POST", "/api/v1/links", token, {"username": "nobody", "password": "x"})[0] == 404
    assert "Frank-pw-1" not in process.log()


def test_apart_from_the_servers_tunnels_come_from_presence(admin_setup):
    process, token, config = admin_setup
    db = sqlite3.connect(config.parent / "users.db")
    db.executemany(
        "INSERT INTO mtop_presence (server_id, username, tunnels, active, expires_at) VALUES (?, ?, ?, 0, ?)",
        [("s1", "alice", 2, 2**40), ("s2", "bob", 1, 0)],  # s2's row has expired: a server gone
    )
    db.commit()
    db.close()
    status, body, _ = call(process, "GET", "/api/v1/tunnels", token)
    assert status == 200 and body == {"here": None, "servers": [{"server": "s1", "username": "alice", "tunnels": 2}]}
    call(process, "POST", "/api/v1/users", token, {"username": "gina", "password": "Gina-pw-1"})
    status, body, _ = call(process, "POST", "/api/v1/users/gina/close-tunnels", token)
    assert status == 409 and "disable the user" in body["error"]["message"]
