"""A small in-process OAuth2 provider for integration tests.

It runs a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (ephemeral port) in a
daemon thread and implements just enough of OAuth2 for the gateway and for
Dovecot's ``oauth2`` passdb:

* ``POST /token`` -- ``grant_type=refresh_token`` with client authentication
  by ``client_secret_post`` or HTTP Basic (RFC 6749 sections 2.3.1, 6).
* ``GET /tokeninfo?access_token=TOKEN`` (or ``Authorization: Bearer TOKEN``)
  -- what Dovecot's ``tokeninfo_url`` calls; expiry is checked against
  ``time.time()`` on every request so Dovecot rejects expired tokens.

All state lives in dicts guarded by one lock; tests inspect ``requests`` and
``refresh_count()`` to assert e.g. single-flight refresh.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_SCOPE = "https://mail.google.com/"


@dataclass
class RecordedRequest:
    """One HTTP request seen by the provider (recorded before it is handled)."""

    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]
    time: float = field(default_factory=time.time)

    @property
    def endpoint(self) -> str:
        return urlsplit(self.path).path


@dataclass
class _AccessToken:
    email: str
    expires_at: float
    refresh_token: str | None
    scope: str


@dataclass
class _RefreshToken:
    email: str
    lifetime: float
    scope: str
    revoked: bool = False
    count: int = 0


class OAuth2Provider:
    """Test OAuth2 authorization server + token-info endpoint."""

    def __init__(self, host: str = "127.0.0.1", scope: str = DEFAULT_SCOPE) -> None:
        self.host = host
        self.scope = scope
        #: Seconds to sleep inside ``POST /token`` before answering.
        self.token_delay: float = 0.0
        #: Refresh tokens whose ``POST /token`` answer is dribbled: the status
        #: line and headers at once, then one byte of body every
        #: ``dribble_interval`` seconds, until the client goes away.
        self.dribble: set[str] = set()
        self.dribble_interval: float = 1.0
        #: Refresh tokens whose ``POST /token`` gets this (status, content type, body) instead.
        self.fail_with: dict[str, tuple[int, str, bytes]] = {}
        #: Every request received, in arrival order (copy before iterating
        #: from another thread, or use :meth:`requests_to`).
        self.requests: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._clients: dict[str, str] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> "OAuth2Provider":
        if self._server is not None:
            return self
        provider = self

        class Handler(_Handler):
            pass

        Handler.provider = provider
        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="oauth2-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("provider not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def tokeninfo_url(self) -> str:
        return self.url + "/tokeninfo?access_token="

    # ---------------------------------------------------------------- admin
    def register_client(self, client_id: str, client_secret: str) -> None:
        with self._lock:
            self._clients[client_id] = client_secret

    def issue(self, email: str, access_lifetime: float = 300.0) -> tuple[str, str]:
        """Create a (access_token, refresh_token) pair for ``email``.

        ``access_lifetime`` is used for this access token and for every access
        token later minted from the refresh token (see :meth:`set_lifetime`).
        """
        refresh = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh[refresh] = _RefreshToken(email, float(access_lifetime), self.scope)
            access = self._mint_access(refresh)
        return access, refresh

    def issue_access(self, email: str, lifetime: float = 300.0) -> str:
        """A standalone access token (no refresh token)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._access[token] = _AccessToken(email, time.time() + lifetime, None, self.scope)
        return token

    def set_lifetime(self, refresh_token: str, seconds: float) -> None:
        with self._lock:
            self._refresh[refresh_token].lifetime = float(seconds)

    def refresh_count(self, refresh_token: str) -> int:
        with self._lock:
            rt = self._refresh.get(refresh_token)
            return rt.count if rt else 0

    def revoke_refresh(self, refresh_token: str) -> None:
        with self._lock:
            rt = self._refresh.get(refresh_token)
            if rt is not None:
                rt.revoked = True

    def revoke_access(self, access_token: str) -> None:
        with self._lock:
            self._access.pop(access_token, None)

    def expire_access(self, access_token: str) -> None:
        with self._lock:
            at = self._access.get(access_token)
            if at is not None:
                at.expires_at = time.time() - 1

    def access_tokens_for(self, refresh_token: str) -> list[str]:
        """All access tokens minted from ``refresh_token`` (issue order)."""
        with self._lock:
            return [t for t, a in self._access.items() if a.refresh_token == refresh_token]

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        """Recorded requests whose path is ``endpoint`` (e.g. ``"/token"``)."""
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------- internal
    def _mint_access(self, refresh_token: str) -> str:
        rt = self._refresh[refresh_token]
        token = secrets.token_urlsafe(32)
        self._access[token] = _AccessToken(rt.email, time.time() + rt.lifetime,
                                           refresh_token, rt.scope)
        return token

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _handle_token(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if self.token_delay:
            time.sleep(self.token_delay)
        client_id = form.get("client_id")
        client_secret = form.get("client_secret")
        auth = headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
                cid, _, csec = raw.partition(":")
                # RFC 6749 2.3.1: form-urlencode id and secret before Basic.
                client_id, client_secret = unquote(cid.replace("+", " ")), unquote(csec.replace("+", " "))
            except (binascii.Error, UnicodeDecodeError):
                client_id = client_secret = None
        with self._lock:
            if client_id not in self._clients or self._clients[client_id] != client_secret:
                return 401, {"error": "invalid_client"}
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type"}
            rtok = form.get("refresh_token", "")
            rt = self._refresh.get(rtok)
            if rt is None or rt.revoked:
                return 400, {"error": "invalid_grant",
                             "error_description": "Token has been expired or revoked."}
            rt.count += 1
            access = self._mint_access(rtok)
            return 200, {"access_token": access, "token_type": "Bearer",
                         "expires_in": int(rt.lifetime), "scope": rt.scope}

    def _handle_tokeninfo(self, query: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = query.get("access_token")
        auth = headers.get("authorization", "")
        if not token and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        now = time.time()
        with self._lock:
            at = self._access.get(token or "")
            if at is None or at.expires_at <= now:
                return 401, {"error": "invalid_token"}
            return 200, {"email": at.email, "active": True,
                         "expires_in": max(1, int(at.expires_at - now)),
                         "scope": at.scope}


class _Handler(BaseHTTPRequestHandler):
    provider: OAuth2Provider
    protocol_version = "HTTP/1.1"
    server_version = "TestOAuth2/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep test output quiet

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if status == 401 and body.get("error") == "invalid_token":
            self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        self.end_headers()
        self.wfile.write(data)

    def _parse(self) -> tuple[str, dict[str, str], dict[str, str], dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        form: dict[str, str] = {}
        if body:
            form = {k: v[0] for k, v in
                    parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        self.provider._record(RecordedRequest(self.command, self.path, query, form, headers))
        return parts.path, query, form, headers

    def do_GET(self) -> None:
        path, query, _form, headers = self._parse()
        if path == "/tokeninfo":
            self._reply(*self.provider._handle_tokeninfo(query, headers))
        else:
            self._reply(404, {"error": "not_found"})

    def _dribble(self) -> None:
        body = json.dumps({"access_token": "x" * 200, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(self.provider.dribble_interval)
        except OSError:
            pass  # the client gave up: what the test wants
        self.close_connection = True

    def do_POST(self) -> None:
        path, query, form, headers = self._parse()
        if path == "/token" and form.get("refresh_token") in self.provider.dribble:
            self._dribble()
        elif path == "/token" and form.get("refresh_token") in self.provider.fail_with:
            status, ctype, body = self.provider.fail_with[form["refresh_token"]]
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/token":
            self._reply(*self.provider._handle_token(form, headers))
        elif path == "/tokeninfo":
            merged = dict(query)
            merged.update(form)
            self._reply(*self.provider._handle_tokeninfo(merged, headers))
        else:
            self._reply(404, {"error": "not_found"})
