"""A small in-process OAuth2 / OpenID Connect provider for integration tests.

It runs a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (ephemeral port) in a
daemon thread and implements enough of OAuth2 for the gateway, for tests that
drive a consent flow with an HTTP client, and for Dovecot's ``oauth2`` passdb:

* ``GET /authorize`` -- authorization code request with PKCE (RFC 6749 4.1,
  RFC 7636, ``S256`` only).  Consent is simulated (``consent``,
  ``consent_email``): approve -> ``302 redirect_uri?code=..&state=..``, deny ->
  ``302 redirect_uri?error=access_denied&..``; an unknown client or an
  unregistered ``redirect_uri`` -> ``400`` JSON, no redirect.
* ``POST /token`` -- client authentication by ``client_secret_post`` or HTTP
  Basic (RFC 6749 2.3.1) and these grants:

  - ``refresh_token`` (RFC 6749 6), with optional rotation and reuse
    detection (``rotate_refresh``, ``reused_refresh``);
  - ``authorization_code`` (RFC 6749 4.1.3) with PKCE verification, single-use
    codes, and an RS256 ``id_token`` when the scope has ``openid``;
  - ``client_credentials`` (Microsoft 365 application access: the token is for
    the mailbox in ``app_mailboxes[client_id]``);
  - ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523, Google service
    accounts with domain-wide delegation; no client authentication, the
    assertion is signed by a key from :meth:`register_service_account`).
* ``POST /revoke`` -- token revocation (RFC 7009).
* ``GET|POST /userinfo`` -- OpenID Connect userinfo (``Authorization: Bearer``).
* ``GET /jwks`` -- the public key set that verifies ``id_token``.
* ``GET /.well-known/openid-configuration`` -- discovery document.
* ``GET /tokeninfo?access_token=TOKEN`` (or ``Authorization: Bearer TOKEN``)
  -- what Dovecot's ``tokeninfo_url`` calls; expiry is checked against
  ``time.time()`` on every request so Dovecot rejects expired tokens.  It
  answers for every access token, whichever grant minted it.

All state lives in dicts guarded by one lock; tests inspect ``requests`` and
``refresh_count()`` to assert e.g. single-flight refresh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from authlib.deprecate import AuthlibDeprecationWarning
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

with warnings.catch_warnings():  # authlib 1.6 points to joserfc; authlib.jose is what we use
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.jose import JsonWebKey, JsonWebToken
    from authlib.jose.errors import BadSignatureError, JoseError

DEFAULT_SCOPE = "https://mail.google.com/"
#: The scope of Microsoft 365 application (client_credentials) access to IMAP/SMTP.
MS_APP_SCOPE = "https://outlook.office365.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google's answer when domain-wide delegation is not granted.
DELEGATION_DENIED = ("Client is unauthorized to retrieve access tokens using this method, "
                     "or client not authorized for any of the scopes requested.")
#: Google's answer for an assertion with bad iat/exp.
JWT_TIMING = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
              "timeframe. Check your iat and exp values in the JWT claim.")
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_RS256 = JsonWebToken(["RS256"])


def s256(verifier: str) -> str:
    """The PKCE ``S256`` code challenge of ``verifier`` (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


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
class Revocation:
    """One ``POST /revoke`` that passed client authentication."""

    token: str
    token_type_hint: str | None
    client_id: str
    #: What the token was: ``"access"``, ``"refresh"`` or ``None`` (unknown token).
    kind: str | None
    time: float = field(default_factory=time.time)


@dataclass
class _AccessToken:
    email: str
    expires_at: float
    refresh_token: str | None
    scope: str
    client_id: str | None = None


@dataclass
class _RefreshToken:
    email: str
    lifetime: float
    scope: str
    revoked: bool = False
    count: int = 0
    #: The client it was issued to (None: any registered client may use it, as issue() does).
    client_id: str | None = None
    #: The first refresh token of its rotation chain ("" = itself).
    family: str = ""
    #: Set once rotated: the refresh token that replaced it.
    rotated_to: str | None = None


@dataclass
class _AuthCode:
    client_id: str
    redirect_uri: str
    scope: str
    email: str
    challenge: str
    nonce: str | None
    offline: bool
    expires_at: float
    used: bool = False
    refresh_token: str | None = None
    access_token: str | None = None


@dataclass
class _ServiceAccount:
    client_email: str
    key_id: str
    public_key: Any
    private_key_pem: str


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

        # -- authorization code flow (GET /authorize, grant_type=authorization_code)
        #: The simulated user's answer on the consent screen: "approve" or "deny".
        self.consent: str = "approve"
        #: Who consents; None: the request's ``login_hint``, else "user@example.com".
        self.consent_email: str | None = None
        #: The scope the user grants; None: the requested scope (set it to simulate
        #: Google's granular consent with a box unticked).
        self.consent_scope: str | None = None
        #: Seconds an authorization code stays redeemable.
        self.code_lifetime: float = 60.0
        #: Google's behaviour: no refresh_token unless the authorization request had
        #: ``access_type=offline``.  Off by default (a refresh token is always issued).
        self.refresh_requires_offline: bool = False
        #: RFC 6749 10.5: redeeming a used code revokes the tokens issued from it.
        self.revoke_on_code_reuse: bool = True
        #: Codes presented again after their successful redemption.
        self.reused_codes: list[str] = []
        #: Lifetime of access tokens minted by the authorization_code,
        #: client_credentials and jwt-bearer grants (and of the access tokens later
        #: refreshed from an authorization_code grant's refresh token).
        self.grant_lifetime: float = 3600.0
        #: Lifetime of an ``id_token``.
        self.id_token_lifetime: float = 3600.0

        # -- refresh tokens
        #: Each refresh_token grant returns a new refresh token; the old one dies.
        self.rotate_refresh: bool = False
        #: Stale (rotated-away) refresh tokens presented to ``POST /token``.
        self.reused_refresh: list[str] = []
        #: With rotation: presenting a stale refresh token revokes its whole chain
        #: (Auth0/Okta-style reuse detection).  Off by default: only recorded.
        self.reuse_revokes_family: bool = False

        # -- revocation
        #: Every authenticated ``POST /revoke``, in order.
        self.revocations: list[Revocation] = []
        #: Google's behaviour: revoking an access token also revokes its refresh token.
        self.revoke_access_revokes_grant: bool = False
        #: Google's revoke endpoint takes no client authentication; set False to match.
        self.revoke_requires_client_auth: bool = True

        # -- application grants
        #: client_credentials: client_id -> the one mailbox the application may
        #: access (an Exchange application access policy).  No entry -> unauthorized_client.
        self.app_mailboxes: dict[str, str] = {}
        #: jwt-bearer: emails for which domain-wide delegation is granted (the ``sub``
        #: mailbox or the service account's ``client_email``); None = all.
        self.delegation_allowed: set[str] | None = None

        self._lock = threading.RLock()
        self._clients: dict[str, str | None] = {}
        self._redirect_uris: dict[str, list[str] | None] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._service_accounts: dict[str, _ServiceAccount] = {}
        self._signing_key: Any = None
        self._jwks_keys: list[Any] = []
        self.rotate_signing_key(keep_old=False)
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
    def issuer(self) -> str:
        """The ``iss`` of id_tokens (and of the discovery document)."""
        return self.url

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def tokeninfo_url(self) -> str:
        return self.url + "/tokeninfo?access_token="

    @property
    def authorize_url(self) -> str:
        return self.url + "/authorize"

    @property
    def jwks_url(self) -> str:
        return self.url + "/jwks"

    @property
    def userinfo_url(self) -> str:
        return self.url + "/userinfo"

    @property
    def revocation_url(self) -> str:
        return self.url + "/revoke"

    @property
    def discovery_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    # ---------------------------------------------------------------- admin
    def register_client(self, client_id: str, client_secret: str | None,
                        redirect_uris: list[str] | tuple[str, ...] | None = None) -> None:
        """Register (or re-register) a client.

        ``redirect_uris``: the exact URIs ``/authorize`` accepts for it; None
        accepts any ``http://`` URI on 127.0.0.1, localhost or [::1] (any port
        and path).  ``client_secret=None`` makes a public client (it
        authenticates with ``client_id`` alone).
        """
        with self._lock:
            self._clients[client_id] = client_secret
            self._redirect_uris[client_id] = None if redirect_uris is None else list(redirect_uris)

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

    # ------------------------------------------------------ new admin / query
    @property
    def authorizations(self) -> list[dict[str, str]]:
        """The query of every ``GET /authorize`` received, in order."""
        return [r.query for r in self.requests_to("/authorize")]

    def token_requests(self, grant_type: str | None = None) -> list[RecordedRequest]:
        """Recorded ``POST /token`` requests, optionally only those of ``grant_type``."""
        return [r for r in self.requests_to("/token")
                if grant_type is None or r.form.get("grant_type") == grant_type]

    def current_refresh(self, email: str, client_id: str | None = None) -> str | None:
        """The newest live (not revoked, not rotated away) refresh token of
        ``email`` (issued to ``client_id`` if given), or None."""
        with self._lock:
            for token, rt in reversed(list(self._refresh.items())):
                if (rt.email == email and not rt.revoked and rt.rotated_to is None
                        and (client_id is None or rt.client_id == client_id)):
                    return token
        return None

    def refresh_tokens_for(self, email: str) -> list[str]:
        """Every refresh token ever issued for ``email`` (issue order, dead ones included)."""
        with self._lock:
            return [t for t, rt in self._refresh.items() if rt.email == email]

    def is_refresh_valid(self, refresh_token: str) -> bool:
        """Would ``refresh_token`` be accepted by the refresh_token grant now?"""
        with self._lock:
            rt = self._refresh.get(refresh_token)
            return rt is not None and not rt.revoked and rt.rotated_to is None

    def is_access_valid(self, access_token: str) -> bool:
        """Would ``/tokeninfo`` accept ``access_token`` now?"""
        with self._lock:
            at = self._access.get(access_token)
            return at is not None and at.expires_at > time.time()

    def subject_for(self, email: str) -> str:
        """The stable ``sub`` of ``email`` (Google-like digits; same for every provider)."""
        digest = hashlib.sha256(email.strip().lower().encode()).digest()
        return str(10 ** 20 + int.from_bytes(digest[:8], "big"))

    def register_service_account(self, client_email: str) -> str:
        """Register a service account with a fresh RSA 2048 key; returns its
        private key (PKCS#8 PEM, as in Google's JSON key file).  See
        :meth:`service_account_info` for the whole JSON key file."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
        public = JsonWebKey.import_key(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        with self._lock:
            self._service_accounts[client_email] = _ServiceAccount(
                client_email, secrets.token_hex(20), public, pem)
        return pem

    def service_account_info(self, client_email: str) -> dict[str, str]:
        """A Google service-account JSON key file for a registered service account
        (``token_uri`` is this provider's token URL)."""
        with self._lock:
            sa = self._service_accounts[client_email]
        return {"type": "service_account", "project_id": "test-project",
                "private_key_id": sa.key_id, "private_key": sa.private_key_pem,
                "client_email": sa.client_email,
                "client_id": str(int(self.subject_for(sa.client_email)) + 1),
                "auth_uri": self.authorize_url, "token_uri": self.token_url}

    def rotate_signing_key(self, keep_old: bool = True) -> str:
        """Generate a new id_token signing key (RSA 2048); returns its ``kid``.
        With ``keep_old`` the previous keys stay in the JWKS."""
        key = JsonWebKey.generate_key("RSA", 2048, is_private=True)
        kid = key.thumbprint()
        key = JsonWebKey.import_key(key.as_dict(is_private=True), {"kid": kid})
        with self._lock:
            self._jwks_keys = ([*self._jwks_keys, key] if keep_old else [key])
            self._signing_key = key
        return kid

    @property
    def signing_kid(self) -> str:
        """The ``kid`` of the key signing id_tokens now."""
        return self._signing_key.as_dict()["kid"]

    def jwks(self) -> dict[str, Any]:
        """The public key set served at ``/jwks``."""
        with self._lock:
            keys = list(self._jwks_keys)
        return {"keys": [{**k.as_dict(is_private=False), "use": "sig", "alg": "RS256"}
                         for k in keys]}

    def discovery(self) -> dict[str, Any]:
        """The OpenID Connect discovery document."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "userinfo_endpoint": self.userinfo_url,
            "revocation_endpoint": self.revocation_url,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code", "refresh_token",
                                      "client_credentials", JWT_BEARER],
            "token_endpoint_auth_methods_supported": ["client_secret_post",
                                                      "client_secret_basic"],
            "scopes_supported": ["openid", "email", "profile", self.scope],
        }

    # ------------------------------------------------------------- internal
    def _mint_access(self, refresh_token: str) -> str:
        rt = self._refresh[refresh_token]
        token = secrets.token_urlsafe(32)
        self._access[token] = _AccessToken(rt.email, time.time() + rt.lifetime,
                                           refresh_token, rt.scope)
        return token

    def _mint_standalone(self, email: str, scope: str, client_id: str | None) -> str:
        token = secrets.token_urlsafe(32)
        self._access[token] = _AccessToken(email, time.time() + self.grant_lifetime, None,
                                           scope, client_id)
        return token

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _client_credentials(self, form: dict[str, str],
                            headers: dict[str, str]) -> tuple[str | None, str | None]:
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
        return client_id, client_secret

    def _authenticated_client(self, form: dict[str, str], headers: dict[str, str]) -> str | None:
        """The authenticated client_id, or None (call with the lock held)."""
        client_id, client_secret = self._client_credentials(form, headers)
        if client_id not in self._clients or self._clients[client_id] != client_secret:
            return None
        return client_id

    def _redirect_uri_ok(self, client_id: str, uri: str) -> bool:
        allowed = self._redirect_uris.get(client_id)
        if allowed is not None:
            return uri in allowed
        parts = urlsplit(uri)
        return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS

    def _family(self, token: str) -> str:
        return self._refresh[token].family or token

    def _revoke_family(self, token: str) -> None:
        """Revoke ``token``, every refresh token of its rotation chain, and their access tokens."""
        family = self._family(token)
        members = {t for t, rt in self._refresh.items() if (rt.family or t) == family}
        for t in members:
            self._refresh[t].revoked = True
        for a in [a for a, at in self._access.items() if at.refresh_token in members]:
            del self._access[a]

    def _id_token(self, email: str, client_id: str, nonce: str | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": client_id, "azp": client_id,
            "sub": self.subject_for(email), "email": email, "email_verified": True,
            "iat": now, "exp": now + int(self.id_token_lifetime)}
        if nonce is not None:
            claims["nonce"] = nonce
        key = self._signing_key
        header = {"alg": "RS256", "kid": key.as_dict()["kid"], "typ": "JWT"}
        return _RS256.encode(header, claims, key).decode("ascii")

    # ------------------------------------------------------------- /authorize
    def _handle_authorize(self, query: dict[str, str]) -> tuple[int, dict[str, Any] | str]:
        """(302, location) or (400, JSON error body)."""
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        with self._lock:
            if client_id not in self._clients:
                return 400, {"error": "invalid_client",
                             "error_description": "The OAuth client was not found."}
            if not redirect_uri or not self._redirect_uri_ok(client_id, redirect_uri):
                return 400, {"error": "redirect_uri_mismatch",
                             "error_description": "The redirect_uri is not registered for "
                                                  f"this client: {redirect_uri!r}"}
        state = query.get("state")

        def back(params: dict[str, str]) -> tuple[int, str]:
            if state is not None:
                params["state"] = state
            sep = "&" if urlsplit(redirect_uri).query else "?"
            return 302, redirect_uri + sep + urlencode(params)

        if query.get("response_type") != "code":
            return back({"error": "unsupported_response_type",
                         "error_description": "response_type must be code"})
        if not query.get("code_challenge"):
            return back({"error": "invalid_request",
                         "error_description": "Missing required parameter: code_challenge"})
        if query.get("code_challenge_method") != "S256":
            return back({"error": "invalid_request",
                         "error_description": "code_challenge_method must be S256"})
        scope = query.get("scope", "").strip()
        if not scope:
            return back({"error": "invalid_request",
                         "error_description": "Missing required parameter: scope"})
        if self.consent != "approve":
            return back({"error": "access_denied",
                         "error_description": "The user denied the request."})
        email = self.consent_email or query.get("login_hint") or "user@example.com"
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _AuthCode(
                client_id, redirect_uri, self.consent_scope or scope, email,
                query["code_challenge"], query.get("nonce"),
                query.get("access_type") == "offline", time.time() + self.code_lifetime)
        return back({"code": code})

    # ----------------------------------------------------------------- /token
    def _handle_token(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if self.token_delay:
            time.sleep(self.token_delay)
        grant_type = form.get("grant_type")
        if grant_type == JWT_BEARER:
            return self._grant_jwt_bearer(form)
        with self._lock:
            client_id = self._authenticated_client(form, headers)
            if client_id is None:
                return 401, {"error": "invalid_client"}
            if grant_type == "refresh_token":
                return self._grant_refresh(form, client_id)
            if grant_type == "authorization_code":
                return self._grant_code(form, client_id)
            if grant_type == "client_credentials":
                return self._grant_client_credentials(form, client_id)
            return 400, {"error": "unsupported_grant_type"}

    def _grant_refresh(self, form: dict[str, str], client_id: str) -> tuple[int, dict[str, Any]]:
        rtok = form.get("refresh_token", "")
        rt = self._refresh.get(rtok)
        if rt is not None and rt.rotated_to is not None:
            self.reused_refresh.append(rtok)
            if self.reuse_revokes_family:
                self._revoke_family(rtok)
            rt = None
        if rt is None or rt.revoked:
            return 400, {"error": "invalid_grant",
                         "error_description": "Token has been expired or revoked."}
        if rt.client_id is not None and rt.client_id != client_id:
            return 400, {"error": "invalid_grant",
                         "error_description": "Token was issued to another client."}
        rt.count += 1
        body: dict[str, Any] = {}
        if self.rotate_refresh:
            new = secrets.token_urlsafe(32)
            self._refresh[new] = _RefreshToken(rt.email, rt.lifetime, rt.scope,
                                               client_id=rt.client_id, family=rt.family or rtok)
            rt.rotated_to = new
            body["refresh_token"] = rtok = new
        access = self._mint_access(rtok)
        body = {"access_token": access, "token_type": "Bearer",
                "expires_in": int(rt.lifetime), "scope": rt.scope, **body}
        if rt.client_id is not None and "openid" in rt.scope.split():
            body["id_token"] = self._id_token(rt.email, rt.client_id, None)
        return 200, body

    def _grant_code(self, form: dict[str, str], client_id: str) -> tuple[int, dict[str, Any]]:
        code = form.get("code", "")
        ac = self._codes.get(code)
        if ac is None:
            return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
        if ac.client_id != client_id:
            return 400, {"error": "invalid_grant",
                         "error_description": "Authorization code was issued to another client."}
        if ac.used:
            self.reused_codes.append(code)
            if self.revoke_on_code_reuse:
                if ac.refresh_token is not None:
                    self._revoke_family(ac.refresh_token)
                if ac.access_token is not None:
                    self._access.pop(ac.access_token, None)
            return 400, {"error": "invalid_grant",
                         "error_description": "Authorization code has already been used."}
        if ac.expires_at <= time.time():
            return 400, {"error": "invalid_grant",
                         "error_description": "Authorization code has expired."}
        if form.get("redirect_uri") != ac.redirect_uri:
            return 400, {"error": "invalid_grant",
                         "error_description": "redirect_uri does not match the authorization "
                                              "request."}
        verifier = form.get("code_verifier")
        if not verifier:
            return 400, {"error": "invalid_grant",
                         "error_description": "PKCE verification failed: code_verifier missing."}
        if not _VERIFIER.fullmatch(verifier):
            return 400, {"error": "invalid_grant",
                         "error_description": "PKCE verification failed: code_verifier must be "
                                              "43-128 characters of [A-Za-z0-9-._~]."}
        if not secrets.compare_digest(s256(verifier), ac.challenge):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        ac.used = True
        body: dict[str, Any]
        if ac.offline or not self.refresh_requires_offline:
            refresh = secrets.token_urlsafe(32)
            self._refresh[refresh] = _RefreshToken(ac.email, float(self.grant_lifetime), ac.scope,
                                                   client_id=client_id)
            access = self._mint_access(refresh)
            ac.refresh_token = refresh
            body = {"access_token": access, "token_type": "Bearer",
                    "expires_in": int(self.grant_lifetime), "refresh_token": refresh,
                    "scope": ac.scope}
        else:
            access = self._mint_standalone(ac.email, ac.scope, client_id)
            body = {"access_token": access, "token_type": "Bearer",
                    "expires_in": int(self.grant_lifetime), "scope": ac.scope}
        ac.access_token = access
        if "openid" in ac.scope.split():
            body["id_token"] = self._id_token(ac.email, client_id, ac.nonce)
        return 200, body

    def _grant_client_credentials(self, form: dict[str, str],
                                  client_id: str) -> tuple[int, dict[str, Any]]:
        scope = form.get("scope", "").strip()
        if not scope:
            return 400, {"error": "invalid_request",
                         "error_description": "AADSTS900144: The request body must contain "
                                              "the following parameter: 'scope'."}
        if not all(s.endswith("/.default") for s in scope.split()):
            return 400, {"error": "invalid_scope",
                         "error_description": f"AADSTS1002012: The provided value for scope "
                                              f"{scope} is not valid. Client credential flows "
                                              "must have a scope value with /.default suffixed "
                                              "to the resource identifier "
                                              "(application ID URI)."}
        mailbox = self.app_mailboxes.get(client_id)
        if mailbox is None:
            return 400, {"error": "unauthorized_client",
                         "error_description": "The application is not granted access to any "
                                              "mailbox (no app_mailboxes entry)."}
        access = self._mint_standalone(mailbox, scope, client_id)
        lifetime = int(self.grant_lifetime)
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": lifetime,
                     "ext_expires_in": lifetime, "scope": scope}

    def _grant_jwt_bearer(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        def bad(description: str, status: int = 400,
                error: str = "invalid_grant") -> tuple[int, dict[str, Any]]:
            return status, {"error": error, "error_description": description}

        assertion = form.get("assertion", "")
        if not assertion:
            return bad("Missing required parameter: assertion", error="invalid_request")
        try:
            header_b64, payload_b64, _sig = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            unverified = json.loads(_b64url_decode(payload_b64))
            if not isinstance(header, dict) or not isinstance(unverified, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            return bad("Invalid JWT: the assertion is not a JWS compact serialization.")
        if header.get("alg") != "RS256":
            return bad(f"Invalid JWT: alg must be RS256, not {header.get('alg')!r}.")
        iss = unverified.get("iss")
        with self._lock:
            sa = self._service_accounts.get(iss) if isinstance(iss, str) else None
        if sa is None:
            return bad("Invalid grant: account not found")
        if "kid" in header and header["kid"] != sa.key_id:
            return bad("Invalid JWT Signature.")
        try:
            claims = dict(_RS256.decode(assertion, sa.public_key))
        except BadSignatureError:
            return bad("Invalid JWT Signature.")
        except JoseError as exc:
            return bad(f"Invalid JWT: {exc}")
        if claims.get("aud") != self.token_url:
            return bad("Invalid JWT: Failed audience check. The expected value was "
                       f"{self.token_url}, got {claims.get('aud')!r}.")
        iat, exp = claims.get("iat"), claims.get("exp")
        now = time.time()
        if not isinstance(iat, (int, float)) or not isinstance(exp, (int, float)):
            return bad(JWT_TIMING + " (iat or exp missing)")
        if exp - iat > 3600:
            return bad(JWT_TIMING + " (exp - iat > 3600)")
        if exp <= now:
            return bad(JWT_TIMING + " (expired)")
        if iat > now + 60:
            return bad(JWT_TIMING + " (iat in the future)")
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.strip():
            return bad("Empty or missing scope not allowed.", error="invalid_scope")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            return bad("Invalid email or User ID")
        email = sub or sa.client_email
        with self._lock:
            allowed = self.delegation_allowed
            if sub and sub != sa.client_email and allowed is not None \
                    and sub not in allowed and sa.client_email not in allowed:
                return bad(DELEGATION_DENIED, status=401, error="unauthorized_client")
            access = self._mint_standalone(email, " ".join(scope.split()), None)
        return 200, {"access_token": access, "token_type": "Bearer",
                     "expires_in": int(self.grant_lifetime)}

    # ---------------------------------------------------------------- /revoke
    def _handle_revoke(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            client_id = self._authenticated_client(form, headers)
            if client_id is None:
                if self.revoke_requires_client_auth:
                    return 401, {"error": "invalid_client"}
                client_id = self._client_credentials(form, headers)[0] or ""
            token = form.get("token", "")
            if not token:
                return 400, {"error": "invalid_request",
                             "error_description": "Missing required parameter: token"}
            hint = form.get("token_type_hint")
            kind: str | None = None
            rt = self._refresh.get(token)
            at = self._access.get(token)
            if rt is not None:
                kind = "refresh"
            elif at is not None:
                kind = "access"
            owner = rt.client_id if rt is not None else at.client_id if at is not None else None
            if owner is not None and client_id and owner != client_id \
                    and self.revoke_requires_client_auth:
                return 400, {"error": "invalid_request",
                             "error_description": "Token was issued to another client."}
            self.revocations.append(Revocation(token, hint, client_id, kind))
            if rt is not None:
                self._revoke_family(token)
            elif at is not None:
                del self._access[token]
                if self.revoke_access_revokes_grant and at.refresh_token in self._refresh:
                    self._revoke_family(at.refresh_token)
            return 200, {}

    # ------------------------------------------------------ /tokeninfo etc.
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

    def _handle_userinfo(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        with self._lock:
            at = self._access.get(token)
            if at is None or at.expires_at <= time.time():
                return 401, {"error": "invalid_token"}
            email = at.email
        return 200, {"sub": self.subject_for(email), "email": email, "email_verified": True}


def _b64url_decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from exc


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

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

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
        provider = self.provider
        if path == "/tokeninfo":
            self._reply(*provider._handle_tokeninfo(query, headers))
        elif path == "/authorize":
            status, answer = provider._handle_authorize(query)
            if status == 302:
                assert isinstance(answer, str)
                self._redirect(answer)
            else:
                assert isinstance(answer, dict)
                self._reply(status, answer)
        elif path == "/userinfo":
            self._reply(*provider._handle_userinfo(headers))
        elif path == "/jwks":
            self._reply(200, provider.jwks())
        elif path == "/.well-known/openid-configuration":
            self._reply(200, provider.discovery())
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
        elif path == "/revoke":
            merged = dict(query)  # Google also takes ?token=
            merged.update(form)
            self._reply(*self.provider._handle_revoke(merged, headers))
        elif path == "/userinfo":
            self._reply(*self.provider._handle_userinfo(headers))
        else:
            self._reply(404, {"error": "not_found"})
