"""The dashboard as a Twisted resource: routing, sign-in and sign-out, the session and CSRF checks in
front of every page and form (`actions` does the rest, through the JSON API's handlers)."""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from gateway.api.asynchronous import AsyncLeaf
from twisted.web import server

from gateway.api.dashboard import pages
from gateway.api.dashboard.actions import Actions, Visit
from gateway.api.dashboard.assets import Static
from gateway.api.dashboard.pages import BASE, HOME, Chrome
from gateway.api.dashboard.signin import Notice, SignIn, WebSession, WebSessions
from gateway.api.dashboard.web import Answer, Form, Query, first, form_of, peer_ip, redirect, write
from gateway.api.resources import Handlers
from gateway.auth.tokens import address_allowed
from gateway.limits import AuthLimiter

log = Logger()

DEFAULT_SESSION_TTL = 28800.0
_SIGNIN_COOKIE = re.compile(rb"[A-Za-z0-9_-]{20,100}")


@dataclasses.dataclass(frozen=True)
class DashboardOptions:
    """``api.public_url`` (the Secure flag, the hosted flow's way back), ``api.dashboard_session_ttl`` and
    ``oauth2.state_ttl`` (how long a one-time link stays valid, said next to it)."""

    public_url: str = "http://127.0.0.1:3000"
    session_ttl: float = DEFAULT_SESSION_TTL
    state_ttl: float = 900.0


class Dashboard(AsyncLeaf):
    """``/`` and ``/dashboard/...`` on the admin listener: every path goes through :meth:`_respond`."""

    failed = "Dashboard response failed"

    def __init__(self, handlers: Handlers, store: Any, reactor: Any, limits: AuthLimiter | None = None,
                 options: DashboardOptions | None = None) -> None:
        super().__init__()
        options = options or DashboardOptions()
        self.store = store
        self.sessions = WebSessions(options.session_ttl, reactor.seconds,
                                    secure=options.public_url.lower().startswith("https:"))
        self.signin = SignIn(store, limits, reactor)
        self.actions = Actions(handlers, self.sessions, options.public_url, options.state_ttl, reactor.seconds)
        self.static = Static()

    async def _respond(self, request: server.Request, gone: list[Failure]) -> None:
        try:
            answer = await self._dispatch(request)
        except UnicodeDecodeError:
            answer = await self._message(400, "Bad request", "The address is not valid UTF-8.")
        except Exception:
            log.failure("Dashboard {method} {path} failed", method=request.method.decode("ascii", "replace"),
                        path=request.path.split(b"?")[0][:80].decode("latin-1"))
            answer = Answer(500, b"The gateway could not do this; its log says why.\n",
                            content_type="text/plain; charset=utf-8")
        if gone or request.finished:
            return
        write(request, answer)

    async def _dispatch(self, request: server.Request) -> Answer:
        path = "/".join(p.decode("utf-8") for p in request.postpath or []).strip("/")
        method = request.method
        if path.startswith("static/") and method in (b"GET", b"HEAD"):
            return self._static(path[len("static/"):], request)
        if method in (b"GET", b"HEAD"):
            page = self.actions.pages.get(path)
            if page is None:
                return await self._message(404, "Not found", "There is no such page.")
            query: Query = request.args or {}
            visit, ended = await self._visit(request)
            if visit is None:
                notices = [Notice("error", "Your dashboard session ended: its token was revoked. Sign in again.")] \
                    if ended or query.get(b"ended") else []
                return await self._signin_page(request, 200, notices, "/" + ("dashboard/" + path if path else ""))
            return await page(visit, query)
        if method != b"POST":
            return await self._message(405, "Method not allowed", "Use the dashboard's pages and buttons.",
                                       headers={"Allow": "GET, HEAD, POST"})
        if getattr(request, "too_large", False):
            return await self._message(413, "Too large", "That form was larger than the gateway accepts.")
        form = form_of(request)
        if path == "signin":
            return await self._post_signin(request, form)
        change = self.actions.changes.get(path) if path != "signout" else self._signout
        if change is None:
            return await self._message(404, "Not found", "There is no such form.")
        visit, _ended = await self._visit(request)
        if visit is None:
            return await self._signin_page(request, 403, [Notice(
                "error", "Not signed in (or the session has ended): nothing was changed. Sign in and try again.")])
        if not self.sessions.csrf_ok(visit.session, first(form, "csrf")):
            log.warn("Dashboard form {path} from {client} refused: missing or wrong CSRF token",
                     event="dashboard.csrf", path=path, client=visit.client)
            return await self._message(403, "Form refused", "This form did not come from this dashboard session "
                                       "(missing or wrong CSRF token): nothing was changed. Reload the page and "
                                       "try again.")
        return await change(visit, form)

    # Who is asking ---------------------------------------------------------------

    def _chrome(self, session: WebSession | None = None, principal: dict[str, Any] | None = None) -> Chrome:
        chrome = Chrome(css=self.static.url("dashboard.css"), js=self.static.url("dashboard.js"),
                        icon=self.static.url("favicon.svg"))
        if session is None or principal is None:
            return chrome
        account = principal.get("account")
        who = f"token of account {account}" if account else f"admin token “{principal.get('description')}”"
        return dataclasses.replace(chrome, csrf=session.csrf, who=who, admin=account is None)

    async def _visit(self, request: server.Request) -> tuple[Visit | None, bool]:
        """The signed-in browser behind this request, its token re-read; (None, True) when its token was
        revoked or no longer allows this address (the session ends), (None, False) when there is none."""
        raw = request.getCookie(self.sessions.cookie_name.encode("ascii"))
        session = self.sessions.find(raw.decode("ascii", "replace") if raw else None)
        if session is None:
            return None, False
        client = peer_ip(request)
        record = await self.store.get_token(session.token_id)
        if record is None or "api" not in (record.get("scopes") or ()) or \
                not address_allowed(((record.get("restrictions") or {}).get("addresses")), client):
            self.sessions.close(session)
            log.info("Dashboard session of token {token} ended: the token was revoked or no longer allows "
                     "{client}", event="dashboard.signout", token=session.token_id, client=client, reason="token")
            return None, True
        return Visit(session, record, client, self._chrome(session, record)), False

    # Signing in and out ------------------------------------------------------------

    async def _signin_page(self, request: server.Request, status: int, notices: list[Notice],
                           next_path: str = "") -> Answer:
        if status == 200 and request.getHeader(b"sec-fetch-site") == b"cross-site":
            # Back from a provider's consent page: a SameSite=Strict cookie is not sent on a navigation that
            # came from another site. One same-site hop (a refresh) brings it along.
            return Answer(200, await pages.render(pages.bounce(self._chrome())))
        raw = request.getCookie(self.sessions.signin_cookie_name.encode("ascii"))
        value = raw.decode("ascii") if raw and _SIGNIN_COOKIE.fullmatch(raw) else None
        if value is None:
            value = secrets.token_urlsafe(24)
            request.addCookie(self.sessions.signin_cookie_name, value, path="/", max_age="3600", httpOnly=True,
                              secure=self.sessions.secure or None, sameSite="strict")
        page = pages.signin(self._chrome(), self.sessions.signin_csrf(value), notices, next_path)
        return Answer(status, await pages.render(page))

    async def _post_signin(self, request: server.Request, form: Form) -> Answer:
        raw = request.getCookie(self.sessions.signin_cookie_name.encode("ascii"))
        if not self.sessions.signin_csrf_ok(raw.decode("ascii", "replace") if raw else None, first(form, "csrf")):
            return await self._signin_page(request, 403, [Notice(
                "error", "The sign-in form was old or not from this gateway (missing or wrong CSRF token): nothing "
                         "was changed. Try again.")])
        client = peer_ip(request)
        result = await self.signin.attempt(first(form, "token"), client)
        if result.record is None:
            return await self._signin_page(request, 401, [Notice("error", result.message)])
        value, _session = self.sessions.open(result.record["id"], client)
        request.addCookie(self.sessions.cookie_name, value, path="/", max_age=str(int(self.sessions.ttl)),
                          httpOnly=True, secure=self.sessions.secure or None, sameSite="strict")
        self._expire(request, self.sessions.signin_cookie_name)
        return redirect(self._safe_next(first(form, "next")))

    @staticmethod
    def _safe_next(value: str) -> str:
        """Only a dashboard page of this listener (no scheme, no host, no //evil.example)."""
        path = value.split("?", 1)[0]
        if path == HOME or (path.startswith(BASE + "/") and re.fullmatch(r"[a-z/]*", path[len(BASE) + 1:])):
            return path
        return HOME

    def _expire(self, request: server.Request, name: str) -> None:
        request.addCookie(name, "", path="/", max_age="0", expires="Thu, 01 Jan 1970 00:00:00 GMT",
                          httpOnly=True, secure=self.sessions.secure or None, sameSite="strict")

    async def _signout(self, visit: Visit, form: Form) -> Answer:
        self.sessions.close(visit.session)
        log.info("Dashboard sign-out client={client} token={token}", event="dashboard.signout",
                 client=visit.client, token=visit.principal["id"], reason="signout")
        answer = redirect(HOME)
        answer.headers["Clear-Site-Data"] = '"cache"'
        return answer

    # Plain answers -------------------------------------------------------------------

    async def _message(self, status: int, title: str, text: str, headers: dict[str, str] | None = None) -> Answer:
        return Answer(status, await pages.render(pages.message(self._chrome(), title, text)), headers=headers or {})

    def _static(self, name: str, request: server.Request) -> Answer:
        found = self.static.get(name)
        if found is None:
            return Answer(404, b"not found\n", content_type="text/plain; charset=utf-8")
        body, content_type, version = found
        args: Query = request.args or {}
        pinned = (args.get(b"v") or [b""])[0].decode("ascii", "replace") == version
        cache = "public, max-age=31536000, immutable" if pinned else "no-cache"
        return Answer(200, body, content_type=content_type, headers={"Cache-Control": cache})
