"""Admin API plumbing: routing, bearer-token auth, JSON errors and the body limit, as a `Site`.

`make_site(store, connections, network)` is the only entry point. Handlers live in
`gateway.api.resources`; this module turns their replies and exceptions into
HTTP responses and never shows a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from gateway.api.asynchronous import AsyncLeaf
from twisted.web import http, server

from gateway.api.resources import ApiError, Call, Handler, Handlers, Reply
from gateway.auth.tokens import TokenCheck
from gateway.limits import MAX_DELAY
from gateway.store.base import AsyncStore, Conflict, NotFound, ValidationError

if TYPE_CHECKING:
    from gateway.api.dashboard.resource import DashboardOptions
    from gateway.limits import AuthLimiter

log = Logger()

MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 60
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="gateway"'}


class LimitedRequest(server.Request):
    """A request that keeps at most MAX_BODY bytes of body and remembers if there was more."""

    max_body = MAX_BODY
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            if self.content is not None:
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)


@dataclass(frozen=True)
class Route:
    """One method + path pattern (segments; `{name}` captures one segment)."""

    method: str
    pattern: str
    handler: Handler
    auth: bool

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))

    def match(self, segments: list[str]) -> dict[str, str] | None:
        pattern = self.segments
        if len(pattern) != len(segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(pattern, segments):
            if want.startswith("{") and want.endswith("}"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


class Router:
    """Finds the route for a method and path, or says 404 / 405."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def resolve(self, method: str, segments: list[str]) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            raise ApiError(405, "MethodNotAllowed", f"method {method} not allowed here",
                           headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, "NotFound", "no such API path")


def _peer_ip(request: server.Request) -> str | None:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def _bearer(request: server.Request) -> str | None:
    raw = request.getHeader(b"authorization")
    if not raw:
        return None
    header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class ApiResource(AsyncLeaf):
    """The whole API as one leaf resource: every path goes through the router."""

    failed = "API response failed"

    def __init__(self, store: AsyncStore, connections: Any = None, network: Any = None,
                 account_changed: Any = None, hosted: Any = None, auth_limits: Any = None,
                 reactor: Any = None) -> None:
        super().__init__()
        self.store = store
        self.auth_limits = auth_limits  # wrong bearer tokens count like failed IMAP logins
        self.reactor = reactor
        self.handlers = handlers = Handlers(store, connections, network, account_changed, hosted)
        self.router = Router([Route(m, p, h, a) for m, p, h, a in handlers.routes()])

    async def _respond(self, request: server.Request, gone: list[Failure]) -> None:
        method = request.method.decode("ascii", "replace")
        where = "?"
        try:
            segments = self._segments(request)
            route, params = self.router.resolve(method, segments)
            where = route.pattern
            if getattr(request, "too_large", False):
                raise ApiError(413, "PayloadTooLarge", f"request body is larger than {MAX_BODY} bytes")
            principal = await self._authenticate(request) if route.auth else None
            content = getattr(request, "content", None)
            body = content.read() if content is not None else b""
            args: dict[bytes, list[bytes]] = request.args or {}
            query = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in args.items() if v}
            reply = await route.handler(Call(params, body, principal, _peer_ip(request), query))
        except ApiError as exc:
            reply = _error(exc.status, exc.error, exc.message)
            reply.headers.update(exc.headers)
        except ValidationError as exc:
            reply = _error(400, "BadRequest", str(exc))
        except NotFound as exc:
            reply = _error(404, "NotFound", str(exc))
        except Conflict as exc:
            reply = _error(409, "Conflict", str(exc))
        except Exception:
            # The path pattern, not the path: a DELETE /v1/token/<secret> must not reach the log.
            log.failure("API {method} {route} failed", method=method, route=where)
            reply = _error(500, "InternalError", "internal error")
        if gone or request.finished:
            return
        _write(request, reply)

    @staticmethod
    def _segments(request: server.Request) -> list[str]:
        try:
            segments = [s.decode("utf-8") for s in request.postpath or []]
        except UnicodeDecodeError:
            raise ApiError(400, "BadRequest", "path is not valid UTF-8") from None
        if len(segments) > 1 and segments[-1] == "":
            segments = segments[:-1]  # tolerate one trailing slash
        return segments

    async def _authenticate(self, request: server.Request) -> dict[str, Any]:
        secret = _bearer(request)
        if secret is None:
            raise ApiError(401, "Unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                           headers=_CHALLENGE)
        address = _peer_ip(request) or ""
        limits = self.auth_limits
        if limits is not None and limits.locked(address):  # locked out: refused unchecked, after the longest hold
            await self._hold(MAX_DELAY)
            raise ApiError(401, "Unauthorized", "invalid or revoked token, or no api scope", headers=_CHALLENGE)
        check, record = await self.store.verify_token(secret, "api", address or None)
        if check is TokenCheck.DENIED_ADDRESS:
            raise ApiError(403, "Forbidden", "Access denied, traffic not accepted from this IP")
        if check is not TokenCheck.OK or record is None:
            if limits is not None:
                await self._hold(limits.failed(address, "", "api"))
            raise ApiError(401, "Unauthorized", "invalid or revoked token, or no api scope",
                           headers=_CHALLENGE)
        # A good token does not clear the address's count (unlike a login): a monitor scraping
        # /metrics from a shared address would otherwise keep wiping a guesser's failures.
        return record

    async def _hold(self, seconds: float) -> None:
        """Answer a failed sign-in only after ``seconds`` (the abuse limits' delay), as IMAP and SMTP do."""
        if seconds > 0 and self.reactor is not None:
            from twisted.internet import task
            await task.deferLater(self.reactor, seconds, lambda: None)


def _error(status: int, error: str, message: str) -> Reply:
    return Reply({"error": error, "message": message}, status=status)


def _write(request: server.Request, reply: Reply) -> None:
    if isinstance(reply.body, bytes):
        payload = reply.body
    else:
        text = json.dumps(reply.body, ensure_ascii=False)
        try:
            payload = text.encode("utf-8") + b"\n"
        except UnicodeEncodeError:  # a lone surrogate stored before it was refused: escape it
            payload = json.dumps(reply.body, ensure_ascii=True).encode("ascii") + b"\n"
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    for name, value in reply.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(payload)
    request.finish()


_SECRET_IN_PATH = re.compile(rb"(?i)(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


class _RedactedRequest:
    """A read-only view of a request whose URI has token secrets blanked out."""

    def __init__(self, request: server.Request) -> None:
        self._request = request
        self.uri = _SECRET_IN_PATH.sub(b"<token>", request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _access_log_line(timestamp: str, request: server.Request) -> str:
    """Combined log format, minus any token secret in the path (DELETE /v1/token/<secret>)."""
    return http.combinedLogFormatter(timestamp, _RedactedRequest(request))


def make_site(store: AsyncStore, connections: Any = None, network: Any = None,
              account_changed: Any = None, hosted: Any = None, auth_limits: AuthLimiter | None = None,
              dashboard: DashboardOptions | None = None, reactor: Any = None) -> server.Site:
    """The admin listener as a Twisted Site: the JSON API, the browser pages of hosted OAuth2
    authorization under /oauth/ when ``hosted`` (a `gateway.auth.hosted.HostedAuth`) is given, and the
    dashboard at / and /dashboard/ (`gateway.api.dashboard`).

    `connections` has `.snapshot() -> list[dict]` or is None; `network` is the
    `gateway.net.policy.NetworkPolicy` behind /v1/settings/network, or None;
    `account_changed(account_id)` is told of every account changed or deleted (pooled upstreams);
    `auth_limits` is the `gateway.limits.AuthLimiter` that also throttles dashboard sign-ins;
    `dashboard` its `DashboardOptions` (public URL, session lifetime); `reactor` its clock."""
    from gateway.api.dashboard.resource import Dashboard
    from gateway.api.oauth_web import OAuthWeb, Root

    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    api = ApiResource(store, connections, network, account_changed, hosted, auth_limits, reactor)
    pages = Dashboard(api.handlers, store, reactor, auth_limits, dashboard)
    root = Root(api, OAuthWeb(hosted) if hosted is not None else None, pages)
    site = server.Site(root, requestFactory=LimitedRequest, timeout=REQUEST_TIMEOUT, logFormatter=_access_log_line)
    site.displayTracebacks = False
    site.noisy = False
    return site
