"""Self-tests of the test OAuth2 provider's consent flow and grants, spoken to with plain
`requests` (no gateway; one test logs in to Dovecot with the new kinds of token)."""

from __future__ import annotations

import base64
import hashlib
import imaplib
import secrets
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.deprecate import AuthlibDeprecationWarning

from .dovecot import xoauth2_callback
from .oauth2_provider import DELEGATION_DENIED, JWT_BEARER, MS_APP_SCOPE

with warnings.catch_warnings():
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.jose import JsonWebKey, JsonWebToken

jwt = JsonWebToken(["RS256"])

CLIENT_ID = "provider-test-client"
CLIENT_SECRET = "provider-test-secret"
REDIRECT = "http://127.0.0.1:9/oauth/callback"  # registered; never followed
LOOPBACK_CLIENT = "provider-test-loopback"      # any loopback redirect_uri
OTHER_CLIENT = "provider-test-other"
APP_CLIENT = "provider-test-app"
SCOPE = "openid email https://mail.google.com/"


@pytest.fixture(scope="module", autouse=True)
def _clients(oauth2_provider):
    oauth2_provider.register_client(CLIENT_ID, CLIENT_SECRET, redirect_uris=[REDIRECT])
    oauth2_provider.register_client(LOOPBACK_CLIENT, "loopback-secret")
    oauth2_provider.register_client(OTHER_CLIENT, "other-secret", redirect_uris=[REDIRECT])
    oauth2_provider.register_client(APP_CLIENT, "app-secret")


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def _authorize(provider, *, client_id: str = CLIENT_ID, redirect_uri: str = REDIRECT,
               challenge: str | None = None, **extra: str) -> requests.Response:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "scope": SCOPE, "state": "st-" + secrets.token_hex(4),
              "code_challenge": challenge or _pkce()[1], "code_challenge_method": "S256",
              **extra}
    params = {k: v for k, v in params.items() if v is not None}
    return requests.get(provider.authorize_url, params=params, allow_redirects=False, timeout=10)


def _callback(r: requests.Response) -> tuple[str, dict[str, str]]:
    """(redirect target without query, query) of a 302 from /authorize."""
    assert r.status_code == 302, (r.status_code, r.text)
    parts = urlsplit(r.headers["Location"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return f"{parts.scheme}://{parts.netloc}{parts.path}", query


def _code(provider, verifier_challenge: tuple[str, str] | None = None,
          **extra: str) -> tuple[str, str]:
    """Run /authorize (approved); returns (code, verifier)."""
    verifier, challenge = verifier_challenge or _pkce()
    _target, query = _callback(_authorize(provider, challenge=challenge, **extra))
    return query["code"], verifier


def _exchange(provider, code: str, verifier: str | None, *, client=(CLIENT_ID, CLIENT_SECRET),
              redirect_uri: str = REDIRECT) -> requests.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if verifier is not None:
        form["code_verifier"] = verifier
    return requests.post(provider.token_url, data=form, auth=client, timeout=10)


def _refresh(provider, refresh: str, client=(CLIENT_ID, CLIENT_SECRET)) -> requests.Response:
    return requests.post(provider.token_url, timeout=10,
                         data={"grant_type": "refresh_token", "refresh_token": refresh,
                               "client_id": client[0], "client_secret": client[1]})


def _tokeninfo(provider, access: str) -> requests.Response:
    return requests.get(provider.tokeninfo_url + access, timeout=10)


def _assert_invalid_grant(r: requests.Response, description: str | None = None) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"] == "invalid_grant", r.text
    if description is not None:
        assert description in r.json()["error_description"], r.text


def test_discovery_document_and_urls(oauth2_provider):
    """The discovery document names the endpoints the provider's properties give."""
    p = oauth2_provider
    doc = requests.get(p.discovery_url, timeout=10).json()
    assert doc["issuer"] == p.issuer == p.url
    assert (doc["authorization_endpoint"], doc["token_endpoint"], doc["userinfo_endpoint"],
            doc["revocation_endpoint"], doc["jwks_uri"]) == (
        p.authorize_url, p.token_url, p.userinfo_url, p.revocation_url, p.jwks_url)
    assert doc["code_challenge_methods_supported"] == ["S256"]


def test_code_flow_pkce_id_token_userinfo(oauth2_provider, new_email):
    """Approve -> 302 with code and state; the code + verifier buy an access token Dovecot's
    tokeninfo and /userinfo accept, a refresh token that refreshes, and an RS256 id_token
    that verifies with /jwks; the authorization request is recorded."""
    p = oauth2_provider
    email = new_email("code")
    verifier, challenge = _pkce()
    r = _authorize(p, challenge=challenge, login_hint=email, access_type="offline",
                   prompt="consent", nonce="n-123", state="xyz")
    target, query = _callback(r)
    assert target == REDIRECT
    assert set(query) == {"code", "state"} and query["state"] == "xyz"
    assert p.authorizations[-1]["login_hint"] == email
    assert p.authorizations[-1]["access_type"] == "offline"
    assert p.authorizations[-1]["prompt"] == "consent"

    r = _exchange(p, query["code"], verifier)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == int(p.grant_lifetime)
    assert body["scope"] == SCOPE
    assert p.current_refresh(email) == body["refresh_token"]
    assert p.current_refresh(email, client_id=OTHER_CLIENT) is None

    info = _tokeninfo(p, body["access_token"]).json()
    assert info["email"] == email and info["active"] is True and info["scope"] == SCOPE
    r = requests.get(p.userinfo_url, headers={"Authorization": "Bearer " + body["access_token"]},
                     timeout=10)
    assert r.status_code == 200
    assert r.json() == {"sub": p.subject_for(email), "email": email, "email_verified": True}

    jwks = requests.get(p.jwks_url, timeout=10).json()
    assert all("d" not in k and "p" not in k for k in jwks["keys"])  # public only
    header = jwt.decode(body["id_token"], JsonWebKey.import_key_set(jwks)).header
    claims = jwt.decode(body["id_token"], JsonWebKey.import_key_set(jwks),
                        claims_options={"iss": {"essential": True, "value": p.issuer},
                                        "aud": {"essential": True, "value": CLIENT_ID}})
    claims.validate()
    assert header["kid"] == p.signing_kid and header["alg"] == "RS256"
    assert claims["sub"] == p.subject_for(email) == p.subject_for(email.upper())
    assert claims["email"] == email and claims["email_verified"] is True
    assert claims["nonce"] == "n-123" and claims["exp"] > claims["iat"]

    r = _refresh(p, body["refresh_token"])
    assert r.status_code == 200, r.text
    assert "refresh_token" not in r.json()  # no rotation by default
    assert _tokeninfo(p, r.json()["access_token"]).json()["email"] == email
    # the refresh token is bound to the client it was issued to
    _assert_invalid_grant(_refresh(p, body["refresh_token"], (OTHER_CLIENT, "other-secret")),
                          "another client")


def test_id_token_after_signing_key_rotation(oauth2_provider, new_email):
    """After rotate_signing_key() the JWKS holds both keys: old and new id_tokens verify."""
    p = oauth2_provider
    code, verifier = _code(p, login_hint=new_email())
    old_id = _exchange(p, code, verifier).json()["id_token"]
    old_kid = p.signing_kid
    new_kid = p.rotate_signing_key()
    assert new_kid != old_kid and p.signing_kid == new_kid
    code, verifier = _code(p, login_hint=new_email())
    new_id = _exchange(p, code, verifier).json()["id_token"]
    keys = JsonWebKey.import_key_set(requests.get(p.jwks_url, timeout=10).json())
    assert jwt.decode(old_id, keys).header["kid"] == old_kid
    assert jwt.decode(new_id, keys).header["kid"] == new_kid


def test_consenting_user(oauth2_provider, monkeypatch, new_email):
    """The consenting user is consent_email, else login_hint, else user@example.com; the
    granted scope is consent_scope when set; no openid scope -> no id_token."""
    p = oauth2_provider

    def who(**extra) -> dict:
        code, verifier = _code(p, **extra)
        body = _exchange(p, code, verifier).json()
        return {"email": _tokeninfo(p, body["access_token"]).json()["email"], **body}

    assert who()["email"] == "user@example.com"
    hinted = new_email("hint")
    assert who(login_hint=hinted)["email"] == hinted
    chosen = new_email("chosen")
    monkeypatch.setattr(p, "consent_email", chosen)
    assert who(login_hint=hinted)["email"] == chosen
    monkeypatch.setattr(p, "consent_scope", "https://mail.google.com/")
    body = who()
    assert body["scope"] == "https://mail.google.com/" and "id_token" not in body


def test_consent_denied(oauth2_provider, monkeypatch):
    """Deny -> 302 to the redirect_uri with error=access_denied and the state."""
    monkeypatch.setattr(oauth2_provider, "consent", "deny")
    target, query = _callback(_authorize(oauth2_provider, state="s1"))
    assert target == REDIRECT
    assert query["error"] == "access_denied" and query["state"] == "s1"
    assert query["error_description"] and "code" not in query


def test_authorize_bad_client_or_redirect_uri_is_not_redirected(oauth2_provider):
    """An unknown client or an unregistered redirect_uri -> 400 JSON, no Location; a client
    without registered URIs accepts any http loopback URI only."""
    p = oauth2_provider
    r = _authorize(p, client_id="nobody")
    assert r.status_code == 400 and "Location" not in r.headers
    assert r.json()["error"] == "invalid_client"
    for uri in ("http://127.0.0.1:9/other", "https://evil.example/cb", None):
        r = _authorize(p, redirect_uri=uri)
        assert r.status_code == 400 and "Location" not in r.headers, uri
        assert r.json()["error"] == "redirect_uri_mismatch"
    for uri in ("http://127.0.0.1:1234/cb", "http://localhost:5/x?y=1", "http://[::1]:7/"):
        target, query = _callback(_authorize(p, client_id=LOOPBACK_CLIENT, redirect_uri=uri))
        assert "code" in query, uri
    assert _callback(_authorize(p, client_id=LOOPBACK_CLIENT,
                                redirect_uri="http://localhost:5/x?y=1"))[1]["y"] == "1"
    for uri in ("https://127.0.0.1/cb", "http://evil.example/cb", "http://127.0.0.1.evil.example/"):
        r = _authorize(p, client_id=LOOPBACK_CLIENT, redirect_uri=uri)
        assert r.status_code == 400 and r.json()["error"] == "redirect_uri_mismatch", uri


def test_authorize_requires_pkce_s256(oauth2_provider):
    """No code_challenge, method plain or missing, or response_type=token -> an error redirect."""
    p = oauth2_provider
    for extra, error in [({"code_challenge": ""}, "invalid_request"),
                         ({"code_challenge_method": "plain"}, "invalid_request"),
                         ({"code_challenge_method": None}, "invalid_request"),
                         ({"response_type": "token"}, "unsupported_response_type")]:
        target, query = _callback(_authorize(p, state="s", **extra))
        assert target == REDIRECT
        assert query["error"] == error and query["state"] == "s" and "code" not in query, extra


def test_pkce_failure(oauth2_provider):
    """A wrong, malformed or missing code_verifier -> 400 invalid_grant 'PKCE verification
    failed'; failed attempts do not consume the code, the right verifier still works."""
    p = oauth2_provider
    code, verifier = _code(p)
    r = _exchange(p, code, _pkce()[0])
    _assert_invalid_grant(r)
    assert r.json()["error_description"] == "PKCE verification failed"
    _assert_invalid_grant(_exchange(p, code, None), "PKCE verification failed")
    _assert_invalid_grant(_exchange(p, code, "short"), "PKCE verification failed")
    _assert_invalid_grant(_exchange(p, code, verifier[:-1] + "!"), "PKCE verification failed")
    assert _exchange(p, code, verifier).status_code == 200


def test_code_reuse_revokes_its_tokens(oauth2_provider, new_email):
    """A code redeemed twice -> invalid_grant, recorded; the tokens of the first redemption are
    revoked (RFC 6749 10.5)."""
    p = oauth2_provider
    email = new_email("reuse")
    code, verifier = _code(p, login_hint=email)
    body = _exchange(p, code, verifier).json()
    _assert_invalid_grant(_exchange(p, code, verifier), "already been used")
    assert code in p.reused_codes
    assert _tokeninfo(p, body["access_token"]).status_code == 401
    _assert_invalid_grant(_refresh(p, body["refresh_token"]))
    assert p.current_refresh(email) is None


def test_code_redirect_uri_client_and_expiry(oauth2_provider, monkeypatch):
    """The token request's redirect_uri must be the authorization's; the code belongs to its
    client; it expires after code_lifetime; a made-up code and a wrong secret are refused."""
    p = oauth2_provider
    code, verifier = _code(p)
    _assert_invalid_grant(_exchange(p, code, verifier, redirect_uri=REDIRECT + "/x"), "redirect_uri")
    _assert_invalid_grant(_exchange(p, code, verifier, redirect_uri=""), "redirect_uri")
    _assert_invalid_grant(_exchange(p, code, verifier, client=(OTHER_CLIENT, "other-secret")),
                          "another client")
    r = _exchange(p, code, verifier, client=(CLIENT_ID, "wrong"))
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}
    _assert_invalid_grant(_exchange(p, "made-up", verifier))
    assert _exchange(p, code, verifier).status_code == 200

    monkeypatch.setattr(p, "code_lifetime", 0.0)
    code, verifier = _code(p)
    _assert_invalid_grant(_exchange(p, code, verifier), "expired")


def test_refresh_requires_offline(oauth2_provider, monkeypatch):
    """With refresh_requires_offline (Google), only access_type=offline gets a refresh token."""
    p = oauth2_provider
    monkeypatch.setattr(p, "refresh_requires_offline", True)
    code, verifier = _code(p)
    body = _exchange(p, code, verifier).json()
    assert "refresh_token" not in body and _tokeninfo(p, body["access_token"]).status_code == 200
    code, verifier = _code(p, access_type="offline")
    assert "refresh_token" in _exchange(p, code, verifier).json()


def test_follow_redirect_to_loopback_callback(oauth2_provider, new_email):
    """A client following redirects lands on its loopback listener with code and state."""
    p = oauth2_provider
    seen: list[str] = []

    class Callback(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Callback)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        redirect = f"http://127.0.0.1:{server.server_address[1]}/cb"
        verifier, challenge = _pkce()
        r = requests.get(p.authorize_url, timeout=10, params={
            "response_type": "code", "client_id": LOOPBACK_CLIENT, "redirect_uri": redirect,
            "scope": SCOPE, "state": "follow", "code_challenge": challenge,
            "code_challenge_method": "S256", "login_hint": new_email()})
        assert r.status_code == 200 and r.text == "ok"
        assert [h.status_code for h in r.history] == [302]
    finally:
        server.shutdown()
        server.server_close()
    [path] = seen
    query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
    assert query["state"] == "follow"
    r = _exchange(p, query["code"], verifier, client=(LOOPBACK_CLIENT, "loopback-secret"),
                  redirect_uri=redirect)
    assert r.status_code == 200, r.text


def test_userinfo_refuses_bad_tokens(oauth2_provider, new_email):
    """/userinfo: unknown, expired or missing bearer token -> 401 invalid_token."""
    p = oauth2_provider
    access = p.issue_access(new_email())
    p.expire_access(access)
    for headers in ({"Authorization": "Bearer made-up"}, {"Authorization": "Bearer " + access}, {}):
        r = requests.get(p.userinfo_url, headers=headers, timeout=10)
        assert r.status_code == 401 and r.json() == {"error": "invalid_token"}
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_refresh_rotation_and_reuse_detection(oauth2_provider, monkeypatch, new_email):
    """With rotate_refresh each refresh returns a new refresh token and kills the old one; a
    stale one -> invalid_grant and is recorded in reused_refresh; with reuse_revokes_family
    the whole chain dies."""
    p = oauth2_provider
    monkeypatch.setattr(p, "rotate_refresh", True)
    email = new_email("rot")
    _access, r0 = p.issue(email, access_lifetime=100)
    body = _refresh(p, r0).json()
    r1 = body["refresh_token"]
    assert r1 != r0 and body["expires_in"] == 100
    assert p.current_refresh(email) == r1
    assert not p.is_refresh_valid(r0) and p.is_refresh_valid(r1)
    assert p.refresh_count(r0) == 1

    _assert_invalid_grant(_refresh(p, r0), "expired or revoked")
    assert p.reused_refresh[-1:] == [r0]
    r2 = _refresh(p, r1).json()["refresh_token"]
    assert p.current_refresh(email) == r2 and p.refresh_tokens_for(email) == [r0, r1, r2]

    monkeypatch.setattr(p, "reuse_revokes_family", True)
    a2 = _refresh(p, r2).json()
    r3 = a2["refresh_token"]
    _assert_invalid_grant(_refresh(p, r1))
    assert p.reused_refresh[-1:] == [r1]
    _assert_invalid_grant(_refresh(p, r3))  # the chain is revoked
    assert _tokeninfo(p, a2["access_token"]).status_code == 401
    assert p.current_refresh(email) is None


def test_revocation(oauth2_provider, new_email):
    """POST /revoke: an access token dies alone; a refresh token takes its access tokens with
    it; unknown tokens -> 200 {}; every authenticated call is recorded; bad client -> 401."""
    p = oauth2_provider
    email = new_email("rev")
    access, refresh = p.issue(email)
    second = _refresh(p, refresh, (CLIENT_ID, CLIENT_SECRET)).json()["access_token"]

    def revoke(token: str, hint: str | None = None, auth=(CLIENT_ID, CLIENT_SECRET)):
        data = {"token": token, **({"token_type_hint": hint} if hint else {})}
        return requests.post(p.revocation_url, data=data, auth=auth, timeout=10)

    r = revoke(access, "access_token")
    assert r.status_code == 200 and r.json() == {}
    assert _tokeninfo(p, access).status_code == 401
    assert _tokeninfo(p, second).status_code == 200 and p.is_refresh_valid(refresh)

    assert revoke(refresh).json() == {}
    assert _tokeninfo(p, second).status_code == 401
    _assert_invalid_grant(_refresh(p, refresh))

    assert revoke("never-issued", "refresh_token").status_code == 200
    r = revoke(refresh, auth=(CLIENT_ID, "wrong"))
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}
    assert [(v.token, v.token_type_hint, v.client_id, v.kind) for v in p.revocations[-3:]] == [
        (access, "access_token", CLIENT_ID, "access"), (refresh, None, CLIENT_ID, "refresh"),
        ("never-issued", "refresh_token", CLIENT_ID, None)]
    assert len(p.requests_to("/revoke")) >= 4


def test_revocation_of_a_code_grant_token_by_another_client(oauth2_provider, new_email):
    """A token issued to one client cannot be revoked by another."""
    p = oauth2_provider
    code, verifier = _code(p, login_hint=new_email())
    refresh = _exchange(p, code, verifier).json()["refresh_token"]
    r = requests.post(p.revocation_url, data={"token": refresh}, auth=(OTHER_CLIENT, "other-secret"),
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert p.is_refresh_valid(refresh)


def test_client_credentials(oauth2_provider, monkeypatch, new_email):
    """client_credentials with a .default scope -> an access token (no refresh token) whose
    tokeninfo names the app's mailbox; without a mailbox -> unauthorized_client; a non-.default
    scope -> invalid_scope; bad secret -> invalid_client."""
    p = oauth2_provider
    form = {"grant_type": "client_credentials", "scope": MS_APP_SCOPE}
    r = requests.post(p.token_url, data=form, auth=(APP_CLIENT, "app-secret"), timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"

    mailbox = new_email("app")
    monkeypatch.setitem(p.app_mailboxes, APP_CLIENT, mailbox)
    r = requests.post(p.token_url, timeout=10,
                      data={**form, "client_id": APP_CLIENT, "client_secret": "app-secret"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "refresh_token" not in body and body["token_type"] == "Bearer"
    assert body["expires_in"] == int(p.grant_lifetime)
    info = _tokeninfo(p, body["access_token"]).json()
    assert info["email"] == mailbox and info["scope"] == MS_APP_SCOPE
    assert p.token_requests("client_credentials")[-1].form["scope"] == MS_APP_SCOPE

    r = requests.post(p.token_url, data={**form, "scope": "IMAP.AccessAsApp"},
                      auth=(APP_CLIENT, "app-secret"), timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    r = requests.post(p.token_url, data=form, auth=(APP_CLIENT, "wrong"), timeout=10)
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}


def _assertion(provider, key, iss: str, *, sub: str | None = None, aud: str | None = None,
               iat: float | None = None, lifetime: float = 3600, scope: str | None = SCOPE,
               kid: str | None = None) -> str:
    now = int(time.time()) if iat is None else int(iat)
    claims = {"iss": iss, "aud": aud or provider.token_url, "iat": now, "exp": now + int(lifetime)}
    if scope is not None:
        claims["scope"] = scope
    if sub is not None:
        claims["sub"] = sub
    header = {"alg": "RS256", **({"kid": kid} if kid else {})}
    return jwt.encode(header, claims, key).decode()


def _jwt_grant(provider, assertion: str) -> requests.Response:
    return requests.post(provider.token_url, timeout=10,
                         data={"grant_type": JWT_BEARER, "assertion": assertion})


def test_jwt_bearer(oauth2_provider, monkeypatch, new_email):
    """A service-account assertion -> an access token for sub (or for the service account
    without sub), no refresh token; bad signature, wrong aud, expired, too long-lived, unknown
    issuer, missing scope -> invalid_grant / invalid_scope saying which; delegation not granted
    -> 401 unauthorized_client with Google's text."""
    p = oauth2_provider
    sa = f"svc-{secrets.token_hex(3)}@project.iam.gserviceaccount.com"
    pem = p.register_service_account(sa)
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    info = p.service_account_info(sa)
    assert info["client_email"] == sa and info["token_uri"] == p.token_url
    mailbox = new_email("dwd")

    r = _jwt_grant(p, _assertion(p, pem, sa, sub=mailbox, kid=info["private_key_id"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "refresh_token" not in body and body["token_type"] == "Bearer"
    assert _tokeninfo(p, body["access_token"]).json()["email"] == mailbox
    body = _jwt_grant(p, _assertion(p, pem, sa)).json()
    assert _tokeninfo(p, body["access_token"]).json()["email"] == sa

    other_pem = p.register_service_account("other-" + sa)
    r = _jwt_grant(p, _assertion(p, other_pem, sa, sub=mailbox))
    _assert_invalid_grant(r, "Invalid JWT Signature.")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, sa, kid="0" * 40)), "Signature")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, sa, aud=p.url + "/other")),
                          "audience")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, sa, iat=time.time() - 7200)),
                          "(expired)")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, sa, lifetime=3601)),
                          "(exp - iat > 3600)")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, sa, iat=time.time() + 600)),
                          "(iat in the future)")
    _assert_invalid_grant(_jwt_grant(p, _assertion(p, pem, "nobody@x.iam.gserviceaccount.com")),
                          "account not found")
    _assert_invalid_grant(_jwt_grant(p, "not.a-jwt"))
    r = _jwt_grant(p, _assertion(p, pem, sa, scope=None))
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"

    monkeypatch.setattr(p, "delegation_allowed", {"someone-else@example.com"})
    r = _jwt_grant(p, _assertion(p, pem, sa, sub=mailbox))
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized_client", "error_description": DELEGATION_DENIED}
    assert _jwt_grant(p, _assertion(p, pem, sa)).status_code == 200  # itself: no delegation
    monkeypatch.setattr(p, "delegation_allowed", {mailbox})
    assert _jwt_grant(p, _assertion(p, pem, sa, sub=mailbox)).status_code == 200
    assert len(p.token_requests(JWT_BEARER)) >= 14


def test_new_grants_log_in_to_dovecot(dovecot, oauth2_provider, monkeypatch, new_email):
    """Access tokens of the authorization_code, client_credentials and jwt-bearer grants log in
    to Dovecot with XOAUTH2 through /tokeninfo."""
    p = oauth2_provider
    code_user, app_box, dwd_box = new_email("c"), new_email("a"), new_email("d")
    code, verifier = _code(p, login_hint=code_user)
    tokens = {code_user: _exchange(p, code, verifier).json()["access_token"]}
    monkeypatch.setitem(p.app_mailboxes, APP_CLIENT, app_box)
    tokens[app_box] = requests.post(
        p.token_url, data={"grant_type": "client_credentials", "scope": MS_APP_SCOPE},
        auth=(APP_CLIENT, "app-secret"), timeout=10).json()["access_token"]
    sa = f"svc-{secrets.token_hex(3)}@project.iam.gserviceaccount.com"
    pem = p.register_service_account(sa)
    tokens[dwd_box] = _jwt_grant(p, _assertion(p, pem, sa, sub=dwd_box)).json()["access_token"]
    for email, token in tokens.items():
        conn = dovecot.imap_connect()
        try:
            conn.authenticate("XOAUTH2", xoauth2_callback(email, token))
            assert conn.select("INBOX")[0] == "OK"
        finally:
            conn.logout()
    conn = dovecot.imap_connect()
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.authenticate("XOAUTH2", xoauth2_callback(code_user, tokens[app_box]))
    finally:
        conn.shutdown()
