"""The admin API: users over HTTP, JSON under ``/api/v1/``.

Served by ``twistd mtop`` when ``admin.listen`` is set, or alone by
``twistd mtop-admin`` (one API for a cluster sharing the database).
Scripts authenticate with a bearer token (``mtopctl admin token``); a
token (or an admin's password) that is wrong counts against the client's address like a failed
tunnel login (`mtop.limits.AuthThrottle`), and a banned address gets 429.

Routes (the OpenAPI description at ``/api/v1/openapi.json`` is built from
the same table, `ROUTES`, and a test holds it to them):

=======  ===============================  =====================================
GET      /api/v1/users                    page, per_page, sort, order, q
POST     /api/v1/users                    create (password given or generated,
                                          shown once)
GET      /api/v1/users/{name}             one user
PATCH    /api/v1/users/{name}             password, enabled, expires_at,
                                          max_connections, rate_limit,
                                          quota_bytes
DELETE   /api/v1/users/{name}             delete
POST     /api/v1/users/{name}/reset-usage set the traffic counters to 0
GET      /api/v1/users/{name}/usage       traffic over time: hours, step
GET      /api/v1/usage                    every server's traffic over time,
                                          and per server
POST     /api/v1/links                    share links and QR codes (SVG)
POST     /api/v1/session                  log in: a session cookie, a CSRF token
GET      /api/v1/session                  the session
DELETE   /api/v1/session                  log out
GET      /api/v1/tunnels                  open tunnels (here, and per server)
POST     /api/v1/users/{name}/close-tunnels  close them on this server
GET      /api/v1/me                       the admin of the token or session
=======  ===============================  =====================================

A browser logs in instead (`Sessions`): the cookie is HttpOnly, Secure
and SameSite=Strict, and every change made with it must carry the
session's CSRF token in ``X-CSRF-Token``.

Every answer is JSON; an error is ``{"error": {"message", "field"}}`` with
the status `mtop.users.UserError` names (the same messages as
``mtopctl``), and nothing else reaches a response: an unexpected failure
is logged and answered 500 without its details.  Requests are bounded:
headers 16 KiB, body 64 KiB (JSON only), 30 s idle, 20 s to arrive whole.  Each change is
logged as an audit line with the admin's name.

The database work of a request runs in a small thread pool, each thread
with its own connection (`DatabaseThreads`): the blocking
`mtop.users.UserAdmin`, one thread hop per request.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import threading
from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http, server
from twisted.web import pages, static
from twisted.web.resource import Resource

from mtop.admins import Admins
from mtop.database import HISTORY_STEP, DatabaseError, DBSettings, connect
from mtop.logs import logger
from mtop.users import POLICY, SORT_KEYS, UserAdmin, UserError, check_password, policy_value

#: The largest request body read.
MAX_BODY = 64 * 1024
#: The most users one page lists.
MAX_PER_PAGE = 500
#: Characters of a generated password (URL-safe base64 of 18 bytes: 24).
GENERATED_PASSWORD_BYTES = 18
#: Seconds a connection may stay idle.
IDLE_TIMEOUT = 30
#: Seconds a request may take to arrive whole, from its first byte.
REQUEST_DEADLINE = 20
#: The longest usage history one request reads (ten years, in hours), the
#: most points it answers with, and how many it aims for by default.
MAX_HISTORY_HOURS = 24 * 3650
MAX_POINTS = 2000
DEFAULT_POINTS = 288


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class DatabaseThreads:
    """Blocking database work off the reactor: a thread pool whose threads
    each keep one connection to ``settings``' database (reopened after an
    error)."""

    def __init__(self, reactor: Any, settings: DBSettings, threads: int = 4):
        self.reactor = reactor
        self.settings = settings
        self.pool = ThreadPool(1, threads, name="mtop-admin-db")
        self._local = threading.local()
        self._connections: list[Any] = []

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
        for db in self._connections:
            try:
                db.close()
            except Exception:
                pass

    def run(self, work: Callable[[Any], Any]) -> Any:
        """A Deferred firing with ``work(db)`` run in a pool thread."""
        return deferToThreadPool(self.reactor, self.pool, self._in_thread, work)

    def _in_thread(self, work: Callable[[Any], Any]) -> Any:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.settings)
            self._connections.append(db)
        try:
            return work(db)
        except UserError:
            raise
        except Exception:
            # A broken connection is not reused.
            self._local.db = None
            try:
                self._connections.remove(db)
                db.close()
            except Exception:
                pass
            raise


#: (method, path pattern, handler name, summary); ``{name}`` is one segment.
ROUTES: tuple[tuple[str, str, str, str], ...] = (
    ("GET", "/api/v1/users", "list_users", "List users (paged, sortable, searchable)"),
    ("POST", "/api/v1/users", "create_user", "Create a user (the password given, or generated and shown once)"),
    ("GET", "/api/v1/users/{name}", "get_user", "One user"),
    ("PATCH", "/api/v1/users/{name}", "change_user", "Change a user's password or policy"),
    ("DELETE", "/api/v1/users/{name}", "delete_user", "Delete a user"),
    ("POST", "/api/v1/users/{name}/reset-usage", "reset_usage", "Set a user's traffic counters to 0"),
    ("GET", "/api/v1/users/{name}/usage", "user_usage", "A user's traffic over time (hours, step)"),
    ("GET", "/api/v1/usage", "usage", "Every server's traffic over time (hours, step), and per server"),
    ("GET", "/api/v1/tunnels", "tunnels", "Open tunnels: this server's one by one, every server's per user (presence)"),
    ("POST", "/api/v1/users/{name}/close-tunnels", "close_tunnels", "Close a user's open tunnels on this server"),
    ("GET", "/api/v1/me", "me", "The admin this token or session is for"),
    ("POST", "/api/v1/links", "links", "Share links (and QR codes as SVG) of a user for this server's listeners"),
    ("POST", "/api/v1/session", "login", "Log in with an admin's name and password: a session cookie and a CSRF token"),
    ("GET", "/api/v1/session", "session", "The session's admin and CSRF token"),
    ("DELETE", "/api/v1/session", "logout", "Log out"),
)

#: Routes that need no token or session (they make or end one).
PUBLIC = ("login", "session", "logout")
#: The session cookie's name.
COOKIE = b"mtop_session"
#: A session ends after this long without a request, and after
#: `SESSION_MAX_AGE` in any case.
SESSION_IDLE = 3600.0
SESSION_MAX_AGE = 12 * 3600.0

#: Fields PATCH takes.
CHANGE_FIELDS = ("password", *POLICY)


def _match(pattern: str, segments: list[str]) -> dict[str, str] | None:
    parts = pattern.strip("/").split("/")
    if len(parts) != len(segments):
        return None
    found = {}
    for part, segment in zip(parts, segments):
        if part.startswith("{"):
            if not segment:
                return None
            found[part[1:-1]] = segment
        elif part != segment:
            return None
    return found


class LimitedRequest(server.Request):
    """A request whose body may be at most `MAX_BODY` bytes (a declared
    length over it, or a chunked body growing past it, is answered 413)."""

    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        if self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)


class BoundedChannel(http.HTTPChannel):
    """HTTP/1.1 whose requests must arrive whole (line, headers and body)
    within `REQUEST_DEADLINE` seconds of their first byte, however slowly
    the bytes trickle in (the idle timeout alone lets a client that sends a
    byte now and then hold a connection for ever): a late one gets 408 and
    the connection is closed."""

    _deadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(REQUEST_DEADLINE, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        self.transport.loseConnection()


class LiveTunnels:
    """The open tunnels of the server the API runs in (``factory``: its
    `mtop.server.TunnelFactory`).  Read and closed in the reactor's
    thread: `snapshot` and `close_user` are called from database threads
    through `twisted.internet.threads.blockingCallFromThread`."""

    def __init__(self, reactor: Any, factory: Any):
        self.reactor = reactor
        self.factory = factory

    def snapshot(self) -> list[dict[str, Any]]:
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, self._snapshot)

    def close_user(self, username: str) -> int:
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, self._close_user, username)

    def _snapshot(self) -> list[dict[str, Any]]:
        now = self.factory.clock.seconds()
        found = []
        for tunnel in self.factory.tunnels:
            request = tunnel.request
            if request is None or tunnel.state not in ("relay", "connecting"):
                continue
            relay = tunnel.relay
            found.append({
                "username": request.username,
                "client": tunnel.peer,
                "target": request.target,
                "seconds": round(now - tunnel.started, 1),
                "bytes_up": relay.bytes_up if relay is not None else 0,
                "bytes_down": relay.bytes_down if relay is not None else 0,
            })
        found.sort(key=lambda item: (item["username"], -item["seconds"]))
        return found

    def _close_user(self, username: str) -> int:
        tunnels = [t for t in self.factory.tunnels if t.request is not None and t.request.username == username]
        for tunnel in tunnels:
            tunnel.revoke("closed-by-admin", "closed by an admin")
        return len(tunnels)


class Session:
    __slots__ = ("admin", "csrf", "started", "used")

    def __init__(self, admin: str, now: float):
        self.admin = admin
        self.csrf = secrets.token_urlsafe(24)
        self.started = self.used = now


class Sessions:
    """Browser sessions, in this process's memory (a restart logs everyone
    out): an unguessable id in an HttpOnly, Secure, SameSite=Strict cookie,
    and a CSRF token every change made with the cookie must carry in
    ``X-CSRF-Token``."""

    def __init__(self, clock: Any):
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def start(self, admin: str) -> tuple[str, Session]:
        self._expire()
        sid = secrets.token_urlsafe(32)
        session = self._by_id[sid] = Session(admin, self.clock.seconds())
        return sid, session

    def get(self, sid: str) -> Session | None:
        session = self._by_id.get(sid)
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.used > SESSION_IDLE or now - session.started > SESSION_MAX_AGE:
            del self._by_id[sid]
            return None
        session.used = now
        return session

    def end(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def end_admin(self, admin: str) -> None:
        for sid in [sid for sid, session in self._by_id.items() if session.admin == admin]:
            del self._by_id[sid]

    def _expire(self) -> None:
        now = self.clock.seconds()
        for sid in [sid for sid, s in self._by_id.items() if now - s.used > SESSION_IDLE or now - s.started > SESSION_MAX_AGE]:
            del self._by_id[sid]


class AdminResource(Resource):
    """The whole API as one leaf resource (routing by `ROUTES`)."""

    isLeaf = True
    _log = logger()

    def __init__(
        self, threads: DatabaseThreads, throttle: Any, clock: Any = None, listeners: tuple = (),
        public_host: str | None = None, live: Any = None,
    ):
        super().__init__()
        #: The server's own tunnels (`LiveTunnels`), when the API runs in it.
        self.live = live
        self.threads = threads
        self.throttle = throttle
        if clock is None:
            from twisted.internet import reactor as clock
        self.sessions = Sessions(clock)
        #: (type, port, path) of the server's listeners, for share links.
        self.listeners = listeners
        self.public_host = public_host

    # Dispatch

    def render(self, request: server.Request) -> bytes | int:
        try:
            return self._route(request)
        except Exception:
            self._log.failure("admin API: request failed")
            return self._error(request, ApiError(500, "internal error (logged)"))

    def _route(self, request: server.Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            segments = [unquote(part.decode("utf-8", "strict")) for part in request.path.split(b"/")[1:]]
        except UnicodeDecodeError:
            return self._error(request, ApiError(400, "the path is not UTF-8"))
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        method = request.method.decode("ascii", "replace")
        if segments == ["api", "v1", "openapi.json"] and method == "GET":
            return self._json(request, 200, openapi())
        allowed = []
        for route_method, pattern, handler, _ in ROUTES:
            found = _match(pattern, segments)
            if found is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            self._serve(request, getattr(self, handler), found)
            return server.NOT_DONE_YET
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return self._error(request, ApiError(405, f"{method} is not allowed here (only {', '.join(allowed)})"))
        return self._error(request, ApiError(404, "no such API path"))

    def _serve(self, request: server.Request, handler: Callable, params: dict[str, str]) -> None:
        client = getattr(request.getClientAddress(), "host", "?")
        if getattr(request, "too_large", False):
            self._finish(request, *self._error_body(ApiError(413, f"the request body is over {MAX_BODY // 1024} KiB")))
            return
        if self.throttle.banned(client):
            self._finish(request, *self._error_body(ApiError(429, "too many failed logins from this address; wait")))
            return
        try:
            body = self._body(request)
        except ApiError as e:
            self._finish(request, *self._error_body(e))
            return
        name = handler.__name__
        if name in PUBLIC:
            handler(request, body, client)
            return
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        session = None
        if scheme.lower() != "bearer" or not token:
            sid = (request.getCookie(COOKIE) or b"").decode("latin-1")
            session = self.sessions.get(sid) if sid else None
            if session is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="mtop"')
                message = "log in (POST /api/v1/session) or send a bearer token (mtopctl admin token)"
                self._finish(request, *self._error_body(ApiError(401, message)))
                return
            if request.method not in (b"GET", b"HEAD"):
                sent = (request.getHeader(b"x-csrf-token") or b"").decode("latin-1")
                if not secrets.compare_digest(sent, session.csrf):
                    self._finish(request, *self._error_body(ApiError(403, "the X-CSRF-Token header is missing or wrong")))
                    return

        params = {**params, "request_host": request.getRequestHostname().decode("ascii", "replace")}

        def work(db: Any) -> tuple:
            admin = session.admin if session is not None else Admins(db).token_admin(token)
            if admin is None:
                raise ApiError(401, "the token is not valid")
            if session is not None and not Admins(db).exists(admin):
                raise ApiError(401, "the admin of this session is gone")
            return handler(UserAdmin(db), admin, params, request.args, body)

        done = self.threads.run(work)
        done.addCallbacks(lambda result: self._done(request, *result), lambda f: self._failed(request, f, client))

    # Sessions (run in the reactor's thread; the password check in a database thread)

    def login(self, request: server.Request, body: Any, client: str) -> None:
        body = body or {}
        try:
            _known(body, ("name", "password"))
        except ApiError as e:
            self._finish(request, *self._error_body(e))
            return
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
            self._finish(request, *self._error_body(ApiError(400, "give the admin's name and password", "name")))
            return

        def check(db: Any) -> bool:
            return Admins(db).check_password(name, password)

        def checked(ok: bool) -> None:
            if not ok:
                self._failed(request, Failure(ApiError(401, "wrong admin name or password", "password")), client)
                return
            sid, session = self.sessions.start(name)
            request.addCookie(COOKIE, sid.encode(), path=b"/", httpOnly=True, secure=self.secure_cookies, sameSite="strict")
            self._log.info("admin {admin}: logged in from {client}", admin=name, client=client, audit=True)
            self._finish(request, 200, {"admin": name, "csrf": session.csrf})

        self.threads.run(check).addCallbacks(checked, lambda f: self._failed(request, f, client))

    def session(self, request: server.Request, body: Any, client: str) -> None:
        sid = (request.getCookie(COOKIE) or b"").decode("latin-1")
        session = self.sessions.get(sid) if sid else None
        if session is None:
            self._finish(request, *self._error_body(ApiError(401, "not logged in")))
            return
        self._finish(request, 200, {"admin": session.admin, "csrf": session.csrf})

    def logout(self, request: server.Request, body: Any, client: str) -> None:
        sid = (request.getCookie(COOKIE) or b"").decode("latin-1")
        session = self.sessions.get(sid) if sid else None
        if session is not None:
            sent = (request.getHeader(b"x-csrf-token") or b"").decode("latin-1")
            if not secrets.compare_digest(sent, session.csrf):
                self._finish(request, *self._error_body(ApiError(403, "the X-CSRF-Token header is missing or wrong")))
                return
            self.sessions.end(sid)
        request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, secure=self.secure_cookies, sameSite="strict")
        self._finish(request, 204, None)

    #: Whether cookies are marked Secure (browsers keep them over https and
    #: on localhost / 127.0.0.1 only).
    secure_cookies = True

    def _done(self, request: server.Request, status: int, body: Any, audit: tuple | None = None) -> None:
        if audit is not None:
            admin, action, username, detail = audit
            self._log.info(
                "admin {admin}: {action} user={user}{detail}", admin=admin, action=action, user=username, detail=detail,
                audit=True,
            )
        self._finish(request, status, body)

    def _body(self, request: server.Request) -> dict[str, Any] | None:
        if request.method not in (b"POST", b"PATCH"):
            return None
        raw = request.content.read() if request.content is not None else b""
        if not raw:
            return {}
        kind = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send JSON (content-type: application/json)")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _failed(self, request: server.Request, failure: Failure, client: str) -> None:
        error = failure.value
        if isinstance(error, ApiError):
            if error.status == 401 and self.throttle.failed(client):
                self._log.warn("admin API: client {client} banned after failed logins", client=client)
            self._finish(request, *self._error_body(error))
        elif isinstance(error, UserError):
            self._finish(request, *self._error_body(ApiError(error.status, error.message, error.field)))
        elif isinstance(error, DatabaseError):
            self._log.error("admin API: database: {error}", error=str(error))
            self._finish(request, *self._error_body(ApiError(503, "the user database is not available")))
        else:
            self._log.failure("admin API: request failed", failure)
            self._finish(request, *self._error_body(ApiError(500, "internal error (logged)")))

    @staticmethod
    def _error_body(error: ApiError) -> tuple:
        return error.status, {"error": {"message": error.message, "field": error.field}}

    def _error(self, request: server.Request, error: ApiError) -> bytes:
        status, body = self._error_body(error)
        return self._json(request, status, body)

    @staticmethod
    def _json(request: server.Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        if body is None:
            return b""
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def _finish(self, request: server.Request, status: int, body: Any) -> None:
        if request.finished or request._disconnected:
            return
        data = self._json(request, status, body)
        if data:
            request.write(data)
        request.finish()

    # Handlers: run in a database thread; (status, body[, audit]) or a
    # UserError/ApiError.  The audit line (admin, action, user, detail) is
    # logged by the reactor's thread once the change is done.

    def list_users(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        page = _int_arg(args, "page", 1, 1, 10**9)
        per_page = _int_arg(args, "per_page", 50, 1, MAX_PER_PAGE)
        sort = _str_arg(args, "sort", "username")
        order = _str_arg(args, "order", "asc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", "order")
        if sort not in SORT_KEYS:
            raise ApiError(400, f"cannot sort by {sort!r} (one of {', '.join(SORT_KEYS)})", "sort")
        total, rows = users.list((page - 1) * per_page, per_page, sort, order == "desc", _str_arg(args, "q", ""))
        return 200, {"total": total, "page": page, "per_page": per_page, "users": rows}

    def create_user(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        _known(body, ("username", "password", *POLICY))
        username = body.get("username")
        password = body.get("password")
        generated = password is None
        if generated:
            password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        changes = {column: policy_value(column, body[column]) for column in POLICY if column in body}
        if not generated:
            check_password(password)
        if changes:
            users.require(list(changes))
        users.add(username, password)
        if changes:
            users.set_policy(username, changes)
        answer: dict[str, Any] = {"user": users.get(username)}
        if generated:
            answer["password"] = password  # shown this once
        return 201, answer, (admin, "created", username, _fields(changes))

    def get_user(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        return 200, {"user": users.get(params["name"])}

    def change_user(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        _known(body, CHANGE_FIELDS)
        if not body:
            raise ApiError(400, f"nothing to change; give one of {', '.join(CHANGE_FIELDS)}")
        name = params["name"]
        changes = {column: policy_value(column, body[column]) for column in POLICY if column in body}
        if "password" in body:
            users.set_password(name, check_password(body["password"]))
        if changes:
            users.set_policy(name, changes)
        return 200, {"user": users.get(name)}, (admin, "changed", name, _fields(changes, "password" in body))

    def delete_user(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        users.delete(params["name"])
        return 204, None, (admin, "deleted", params["name"], "")

    def reset_usage(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        users.reset_usage(params["name"])
        return 200, {"user": users.get(params["name"])}, (admin, "reset the usage of", params["name"], "")

    def user_usage(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        return 200, users.usage_history(params["name"], *_history_window(args))

    def usage(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        return 200, users.usage_history(None, *_history_window(args))

    def links(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        """The user's share links for each listener of this server, with
        their QR codes (SVG): the password is the one given (only its hash
        is stored, so it cannot be looked up)."""
        from mtop.ctl.url import qr_code
        from mtop.urls import ServerLink, URLError, make_url

        _known(body, ("username", "password", "host"))
        username = body.get("username")
        users.get(username if isinstance(username, str) else "")  # 404 for an unknown user
        password = check_password(body.get("password"))
        host = body.get("host") or self.public_host or params.get("request_host")
        if not isinstance(host, str) or not host:
            raise ApiError(400, "give host: the server's public name (or set admin.public_host)", "host")
        answer = []
        for kind, port, path in self.listeners:
            if kind == "ws":
                continue  # behind a proxy: its public address is the proxy's
            try:
                url = make_url(ServerLink(username, password, host, port, kind, path=path or "/"))
            except URLError as e:
                raise ApiError(400, str(e), "host") from None
            svg = io.BytesIO()
            qr_code(url).save(svg, kind="svg", scale=4, xmldecl=False)
            answer.append({"type": kind, "url": url, "qr_svg": svg.getvalue().decode("ascii")})
        return 200, {"links": answer}

    def tunnels(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        """This server's open tunnels (when the API runs in the server) and,
        from ``mtop_presence``, how many each server of the cluster carries
        per user (published every ``db.presence_interval``)."""
        from mtop.userstore.sql import NOW

        here = self.live.snapshot() if self.live is not None else None
        try:
            rows = users.db.run(
                "SELECT server_id, username, tunnels FROM mtop_presence "
                f"WHERE tunnels > 0 AND expires_at > {NOW[users.db.driver]} ORDER BY server_id, username"
            ).fetchall()
        except users.db.Error:
            rows = []  # no presence table (an old database): this server's alone
        servers = [{"server": server, "username": name, "tunnels": int(count)} for server, name, count in rows]
        return 200, {"here": here, "servers": servers}

    def close_tunnels(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        name = params["name"]
        if self.live is None:
            raise ApiError(409, "this admin API runs apart from the servers: disable the user to close their tunnels everywhere")
        users.get(name)  # 404 for an unknown user
        closed = self.live.close_user(name)
        return 200, {"closed": closed}, (admin, "closed the tunnels of", name, f" count={closed}")

    def me(self, users: UserAdmin, admin: str, params: dict, args: dict, body: Any) -> tuple:
        return 200, {"admin": admin}


def _history_window(args: dict[bytes, list[bytes]]) -> tuple[int, int]:
    """(hours, step) of a usage request: ``hours`` 1 to `MAX_HISTORY_HOURS`
    (default 24); ``step`` a multiple of `HISTORY_STEP` giving at most
    `MAX_POINTS` points (default: the smallest giving at most
    `DEFAULT_POINTS`)."""
    hours = _int_arg(args, "hours", 24, 1, MAX_HISTORY_HOURS)

    def step_for(points: int) -> int:
        """The smallest multiple of HISTORY_STEP giving at most ``points``."""
        step = -(-hours * 3600 // points)
        return step + -step % HISTORY_STEP

    fewest = step_for(MAX_POINTS)
    step = _int_arg(args, "step", 0, HISTORY_STEP, MAX_HISTORY_HOURS * 3600)
    if not step:
        step = step_for(DEFAULT_POINTS)
    elif step % HISTORY_STEP or step < fewest:
        raise ApiError(
            400, f"step must be a multiple of {HISTORY_STEP} seconds, and at least {fewest} for {hours} hours "
            f"(at most {MAX_POINTS} points)", "step")
    return hours, step


def _known(body: dict[str, Any], fields: tuple[str, ...]) -> None:
    for key in body:
        if key not in fields:
            raise ApiError(400, f"unknown field {key!r} (known: {', '.join(fields)})", key)


def _fields(changes: dict[str, Any], password: bool = False) -> str:
    shown = [f"{column}={'none' if value is None else value}" for column, value in changes.items()]
    if password:
        shown.insert(0, "password=(changed)")
    return (" " + " ".join(shown)) if shown else ""


def _str_arg(args: dict[bytes, list[bytes]], name: str, default: str) -> str:
    values = args.get(name.encode())
    if not values:
        return default
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} is not UTF-8", name) from None


def _int_arg(args: dict[bytes, list[bytes]], name: str, default: int, low: int, high: int) -> int:
    text = _str_arg(args, name, "")
    if not text:
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}", name)
    return int(text)


# OpenAPI

_USER_SCHEMA = {
    "type": "object",
    "properties": {
        "username": {"type": "string"},
        "password": {"type": "string", "enum": ["scrypt", "legacy", "none"], "description": "the kind of hash, never the hash"},
        "created_time": {"type": ["string", "null"]},
        "updated_time": {"type": ["string", "null"]},
        "enabled": {"type": "boolean"},
        "expires_at": {"type": ["string", "null"], "description": "UTC, YYYY-MM-DD HH:MM:SS"},
        "last_seen": {"type": ["string", "null"]},
        "max_connections": {"type": ["integer", "null"]},
        "rate_limit": {"type": ["integer", "null"], "description": "bytes per second"},
        "quota_bytes": {"type": ["integer", "null"]},
        "bytes_up": {"type": "integer"},
        "bytes_down": {"type": "integer"},
        "used": {"type": "integer"},
    },
}
_POLICY_PROPERTIES = {
    "enabled": {"type": "boolean"},
    "expires_at": {"type": ["string", "null"], "description": "2027-01-31, 2027-01-31T12:00Z, or null: never"},
    "max_connections": {"type": ["integer", "string", "null"]},
    "rate_limit": {"type": ["integer", "string", "null"], "description": "bytes per second, or 512K, 10M"},
    "quota_bytes": {"type": ["integer", "string", "null"], "description": "bytes, or 10G"},
}
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "field": {"type": ["string", "null"]}}}}}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of `ROUTES`."""
    paths: dict[str, Any] = {}
    for method, pattern, handler, summary in ROUTES:
        operation: dict[str, Any] = {
            "operationId": handler,
            "summary": summary,
            "security": [] if handler in PUBLIC else [{"bearer": []}, {"session": []}],
            "responses": {
                "default": {"description": "an error", "content": {"application/json": {"schema": _ERROR}}},
            },
        }
        if "{name}" in pattern:
            operation["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
        user_response = {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"user": _USER_SCHEMA, "password": {"type": "string"}}}}}}
        if handler == "list_users":
            operation["parameters"] = [
                {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}},
                {"name": "sort", "in": "query", "schema": {"type": "string", "enum": list(SORT_KEYS)}},
                {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "part of the name"},
            ]
            operation["responses"]["200"] = {"description": "a page", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"total": {"type": "integer"}, "page": {"type": "integer"},
                                                 "per_page": {"type": "integer"}, "users": {"type": "array", "items": _USER_SCHEMA}}}}}}
        elif handler == "create_user":
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["username"],
                "properties": {"username": {"type": "string"}, "password": {"type": "string"}, **_POLICY_PROPERTIES},
                "additionalProperties": False}}}}
            operation["responses"]["201"] = {"description": "created; password only when generated", **user_response}
        elif handler == "change_user":
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"password": {"type": "string"}, **_POLICY_PROPERTIES},
                "additionalProperties": False}}}}
            operation["responses"]["200"] = {"description": "the user as changed", **user_response}
        elif handler == "delete_user":
            operation["responses"]["204"] = {"description": "deleted"}
        elif handler == "links":
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["username", "password"],
                "properties": {"username": {"type": "string"}, "password": {"type": "string"},
                               "host": {"type": "string", "description": "the server's public name (default: admin.public_host)"}},
                "additionalProperties": False}}}}
            link = {"type": "object", "properties": {"type": {"type": "string"}, "url": {"type": "string"}, "qr_svg": {"type": "string"}}}
            operation["responses"]["200"] = {"description": "one link per listener", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"links": {"type": "array", "items": link}}}}}}
        elif handler in ("login", "session"):
            session = {"type": "object", "properties": {"admin": {"type": "string"}, "csrf": {"type": "string"}}}
            if handler == "login":
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name", "password"],
                    "properties": {"name": {"type": "string"}, "password": {"type": "string"}}, "additionalProperties": False}}}}
            operation["responses"]["200"] = {"description": "the session (cookie mtop_session set at login)",
                                             "content": {"application/json": {"schema": session}}}
        elif handler == "logout":
            operation["responses"]["204"] = {"description": "logged out (the cookie cleared)"}
        elif handler in ("user_usage", "usage"):
            operation.setdefault("parameters", []).extend([
                {"name": "hours", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_HOURS},
                 "description": "how far back (default 24)"},
                {"name": "step", "in": "query", "schema": {"type": "integer", "multipleOf": HISTORY_STEP},
                 "description": f"seconds per point (default: about {DEFAULT_POINTS} points; at most {MAX_POINTS})"},
            ])
            bytes_pair = {"up": {"type": "integer"}, "down": {"type": "integer"}}
            properties: dict[str, Any] = {
                "since": {"type": "integer", "description": "Unix seconds, the database's clock"},
                "until": {"type": "integer"},
                "step": {"type": "integer"},
                "points": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "integer"}, **bytes_pair}}},
                "servers": {"type": "array", "items": {"type": "object", "properties": {"server": {"type": "string"}, **bytes_pair}}},
            }
            operation["responses"]["200"] = {"description": "traffic in bytes, oldest point first", "content": {
                "application/json": {"schema": {"type": "object", "properties": properties}}}}
        elif handler == "me":
            operation["responses"]["200"] = {"description": "the admin", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"admin": {"type": "string"}}}}}}
        else:
            operation["responses"]["200"] = {"description": "the user", **user_response}
        paths.setdefault(pattern, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "MTop admin API", "version": "1"},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": COOKIE.decode(),
                        "description": "from POST /api/v1/session; changes also need the X-CSRF-Token header"},
        }},
        "paths": paths,
    }


#: The panel's files (HTML, JavaScript, CSS: no build step).
PANEL_DIR = os.path.join(os.path.dirname(__file__), "panel")
#: What the panel's pages may do: their own scripts and styles, images
#: from data: URIs (the QR codes), fetches to this origin; nothing inline,
#: no framing.
PANEL_HEADERS = (
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)


class PanelFile(static.File):
    """The panel's static files, with `PANEL_HEADERS`; no directory
    listings."""

    childNotFound = pages.notFound()

    def render(self, request: server.Request) -> bytes | int:
        for name, value in PANEL_HEADERS:
            request.setHeader(name, value)
        return super().render(request)

    def directoryListing(self) -> Resource:
        return pages.notFound()


def admin_site(resource: AdminResource) -> server.Site:
    root = PanelFile(PANEL_DIR)
    root.putChild(b"api", resource)
    site = server.Site(root, timeout=IDLE_TIMEOUT)
    site.protocol = BoundedChannel  # HTTP/1.1 only: the TLS context offers no h2
    site.requestFactory = LimitedRequest
    site.noisy = False
    site.log = lambda request: None  # the audit lines say what changed
    return site


def admin_service(reactor: Any, config: Any, factory: Any = None) -> Any:
    """The admin API's listening service for ``config`` (an
    `mtop.config.Config` with ``admin.listen``): TLS if configured, the
    database threads started and stopped with it; ``factory``: the tunnel
    factory of the server it runs in (live tunnels), if it does."""
    from twisted.application.service import MultiService, Service

    from mtop.limits import AuthThrottle
    from mtop.listening import ListeningService, listening_endpoint

    admin = config.admin
    threads = DatabaseThreads(reactor, DBSettings(config.db.driverName, config.db.dsn))
    listeners = tuple((item.type, item.listen.port, item.path) for item in config.listeners)
    live = LiveTunnels(reactor, factory) if factory is not None else None
    resource = AdminResource(threads, AuthThrottle(reactor, config.auth_throttle), reactor, listeners, admin.public_host, live)
    site = admin_site(resource)
    serving: Any = site
    scheme = "http"
    if admin.tls:
        from mtop.tls import server_context
        from mtop.tlstransport import server_tls_factory

        context = server_context(admin.crt, admin.key, "http/1.1", config.server.tls_min_version, fallback=True)
        serving = server_tls_factory(site, lambda: context, reactor)
        scheme = "https"

    class Threads(Service):
        def startService(self) -> None:
            super().startService()
            threads.start()

        def stopService(self) -> None:
            super().stopService()
            threads.stop()

    parent = MultiService()
    Threads().setServiceParent(parent)
    ListeningService(
        listening_endpoint(reactor, admin.listen), serving, "Admin API", admin.listen, f" ({scheme}, /api/v1/)"
    ).setServiceParent(parent)
    return parent
