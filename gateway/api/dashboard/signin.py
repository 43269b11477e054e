"""Dashboard sign-in: the sessions behind its cookie, their CSRF tokens, and the throttled token check.

A browser signs in with an ``api`` token once; the gateway then knows it by a
random session id in an HttpOnly, SameSite=Strict cookie (Secure when
``api.public_url`` is https) that expires after ``api.dashboard_session_ttl``
seconds. Sessions live in this process's memory: a restart signs everyone out.
Only the SHA-256 of the cookie value is kept as the key, so a lookup's timing
says nothing about a valid id. A session names its token by public id; the
resource re-reads that token on every request, so revoking it (from the
dashboard, the API or the CLI) ends the session at once.

Sign-in failures go through the same `gateway.limits.AuthLimiter` as IMAP and
SMTP logins: counted per client address, answered after the same growing
delay, and a locked-out address gets the wrong-token answer without the token
being checked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import task
from twisted.logger import Logger

from gateway.auth.tokens import TokenCheck
from gateway.limits import MAX_DELAY, AuthLimiter

log = Logger()

MAX_SESSIONS = 10000          # signed-in browsers kept at once; the oldest go first past it
SIGNIN_COOKIE_TTL = 3600      # the sign-in form's own cookie (its CSRF binding)
PROTOCOL = "dashboard"        # the `protocol` label of the limiter's metrics


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


@dataclass
class Notice:
    """A one-line message at the top of the next page: ``kind`` is ok or error."""

    kind: str
    text: str


@dataclass(frozen=True)
class Once:
    """A value the next page shows once, with a copy button: a new token's secret, a one-time link."""

    title: str
    value: str
    note: str
    link: bool = False   # the value is a URL the admin may also open


@dataclass
class WebSession:
    """One signed-in browser."""

    key: str                   # SHA-256 of the cookie value
    token_id: str              # the api token it signed in with (public id)
    csrf: str                  # carried by every form of this session
    expires: float
    client: str
    notices: list[Notice] = field(default_factory=list)
    once: Once | None = None   # a new token or one-time link: on the next page only, then dropped

    def take_notices(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices

    def take_once(self) -> Once | None:
        once, self.once = self.once, None
        return once


class WebSessions:
    """The signed-in browsers of this process, by cookie."""

    def __init__(self, ttl: float, clock: Callable[[], float], secure: bool) -> None:
        self.ttl = ttl
        self.clock = clock
        self.secure = secure
        # __Host-: the browser only keeps it from https, for this host and path / (no sub-domain can set it).
        self.cookie_name = ("__Host-" if secure else "") + "gateway_session"
        self.signin_cookie_name = ("__Host-" if secure else "") + "gateway_signin"
        self._key = secrets.token_bytes(32)  # binds sign-in forms to their cookie; new every start
        self._sessions: dict[str, WebSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, token_id: str, client: str) -> tuple[str, WebSession]:
        """A new session for a token that just checked out: (cookie value, session)."""
        now = self.clock()
        if len(self._sessions) >= MAX_SESSIONS:
            self._sweep(now)
        value = secrets.token_urlsafe(32)
        session = WebSession(key=_digest(value), token_id=token_id, csrf=secrets.token_urlsafe(32),
                             expires=now + self.ttl, client=client)
        self._sessions[session.key] = session
        return value, session

    def find(self, value: str | None) -> WebSession | None:
        """The live session of a cookie value, or None (unknown or expired: then forgotten)."""
        if not value:
            return None
        key = _digest(value)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session

    def close(self, session: WebSession) -> None:
        self._sessions.pop(session.key, None)

    def close_token(self, token_id: str) -> int:
        """Forget every session signed in with this token (it was revoked); how many."""
        doomed = [k for k, s in self._sessions.items() if s.token_id == token_id]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    def _sweep(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        if len(self._sessions) >= MAX_SESSIONS:  # still full of live ones: the oldest half goes
            oldest = sorted(self._sessions, key=lambda k: self._sessions[k].expires)
            for key in oldest[: len(oldest) // 2]:
                del self._sessions[key]

    # The sign-in form's CSRF token: bound to a cookie of its own (there is no session yet).

    def signin_csrf(self, signin_cookie: str) -> str:
        return hmac.new(self._key, b"signin:" + signin_cookie.encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()

    def signin_csrf_ok(self, signin_cookie: str | None, presented: str) -> bool:
        if not signin_cookie or not presented:
            return False
        return hmac.compare_digest(self.signin_csrf(signin_cookie).encode(), presented.encode("utf-8", "replace"))

    @staticmethod
    def csrf_ok(session: WebSession, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode("utf-8", "replace"))


@dataclass(frozen=True)
class SignInResult:
    """What a sign-in attempt came to: the token's public record when it checked out."""

    record: dict[str, Any] | None
    reason: str          # "" when it checked out, else a login reason code (bad-token, cidr, locked-out...)
    held: float = 0.0    # seconds the answer was held by the limiter

    @property
    def message(self) -> str:
        if self.reason == "cidr":
            return "Access denied, traffic not accepted from this IP"
        return "Invalid token: it must be a token with the api scope"


class SignIn:
    """Checks a token typed into the sign-in form, throttled like a bad IMAP or SMTP login."""

    def __init__(self, store: Any, limits: AuthLimiter | None, reactor: Any) -> None:
        self.store = store
        self.limits = limits
        self.reactor = reactor

    async def attempt(self, secret: str, client: str) -> SignInResult:
        limits = self.limits
        if limits is not None and limits.locked(client):
            # Locked out: the wrong-token answer whatever the token, without checking it (as for IMAP).
            return await self._refused(client, "locked-out", MAX_DELAY)
        check, record = await self.store.verify_token(secret.strip(), "api", client or None)
        if check is TokenCheck.OK and record is not None:
            if limits is not None:
                limits.succeeded(client)
            log.info("Dashboard sign-in client={client} token={token} result=ok", event="dashboard.signin",
                     client=client, token=record["id"], result="ok")
            return SignInResult(record, "")
        delay = limits.failed(client, "", PROTOCOL) if limits is not None else 0.0
        return await self._refused(client, check.reason or "bad-token", delay)

    async def _refused(self, client: str, reason: str, delay: float) -> SignInResult:
        if delay > 0:
            await task.deferLater(self.reactor, delay, lambda: None)
        log.info("Dashboard sign-in client={client} result=fail reason={reason} {detail}",
                 event="dashboard.signin", client=client, result="fail", reason=reason,
                 detail=f"(answer held {delay:.1f} s)" if delay > 0 else "")
        return SignInResult(None, reason, delay)
