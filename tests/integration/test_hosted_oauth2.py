"""Hosted OAuth2 authorization end to end, driven like a browser with `requests`: the form's
one-time link, the tests' OAuth2 provider's consent and redirect, the gateway's callback; then
imaplib and smtplib log in on the account it made. Also: tampered, reused and expired states, a
refused consent, a wrong PKCE verifier, a reused code, a revoked grant (answered at once until
re-authorized), a rotated refresh token, an unreachable provider, organization grants, and no
secret in clear in the SQLite file."""

from __future__ import annotations

import imaplib
import smtplib
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import requests

from .gateway_proc import CLIENT_ID, CLIENT_SECRET, Gateway, started_gateway, wait_for
from .oauth2_provider import MS_APP_SCOPE, OAuth2Provider, s256

SCOPES = ["https://mail.google.com/", "openid", "email"]


def make_app(gw: Gateway, provider: OAuth2Provider, **fields: Any) -> str:
    """A generic OAuth2 app on the tests' provider with every URL (what the presets fill in)."""
    body = {"name": "hosted", "provider": "generic", "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
            "authorizationUrl": provider.authorize_url, "tokenUrl": provider.token_url,
            "jwksUrl": provider.jwks_url, "userinfoUrl": provider.userinfo_url,
            "revocationUrl": provider.revocation_url, "issuer": provider.issuer, "scopes": SCOPES,
            "imap": {"host": "localhost", "port": gw.dovecot.imaps_port, "secure": True},
            "smtp": {"host": "localhost", "port": gw.dovecot.submission_port, "secure": False}, **fields}
    status, reply = gw.api("POST", "/v1/oauth2", {k: v for k, v in body.items() if v is not None})
    assert status == 200, reply
    return str(reply["id"])


def form(gw: Gateway, **fields: Any) -> str:
    status, reply = gw.api("POST", "/v1/authentication/form", fields)
    assert status == 200, reply
    return str(reply["url"])


def to_provider(link: str) -> str:
    """Open the link: the gateway redirects to the provider's authorization URL."""
    answer = requests.get(link, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def consent(authorize: str) -> str:
    """The provider's consent (approve or deny, as set): its redirect to the gateway's callback."""
    answer = requests.get(authorize, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def callback(url: str) -> requests.Response:
    return requests.get(url, allow_redirects=False, timeout=30)


def authorize(gw: Gateway, **fields: Any) -> requests.Response:
    return callback(consent(to_provider(form(gw, **fields))))


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}


def imap_login(gw: Gateway, account: str, token: str | None = None) -> imaplib.IMAP4_SSL:
    conn = gw.imap()
    conn.login(account, token or gw.token(account))
    return conn


def refused_login(gw: Gateway, account: str) -> str:
    conn = gw.imap()
    with pytest.raises(imaplib.IMAP4.error) as refused:
        conn.login(account, gw.token(account))
    conn.shutdown()
    return str(refused.value)


@pytest.fixture
def hosted(gateway: Gateway, oauth2_provider: OAuth2Provider) -> tuple[Gateway, OAuth2Provider, str]:
    return gateway, oauth2_provider, make_app(gateway, oauth2_provider)


def test_hosted_flow_creates_the_account_and_imap_and_smtp_work(hosted, new_email, smtp_sink) -> None:
    gw, provider, app = hosted
    email = new_email("hosted")
    account = email.split("@")[0]
    link = form(gw, account=account, email=email, oauth2App=app, name="Hosted User")
    assert link.startswith(f"http://127.0.0.1:{gw.api_port}/oauth/authorize/")
    authorize_url = to_provider(link)
    asked = query_of(authorize_url)
    assert authorize_url.startswith(provider.authorize_url + "?")
    assert asked["client_id"] == CLIENT_ID and asked["response_type"] == "code"
    assert asked["redirect_uri"] == f"http://127.0.0.1:{gw.api_port}/oauth/callback"
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert asked["login_hint"] == email and asked["scope"].split() == SCOPES
    assert "." in asked["state"]

    page = callback(consent(authorize_url))
    assert page.status_code == 200, page.text
    assert "Account connected" in page.text and email in page.text
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    exchange = provider.token_requests("authorization_code")[-1]
    assert s256(exchange.form["code_verifier"]) == asked["code_challenge"]  # the gateway's PKCE binding

    status, view = gw.api("GET", f"/v1/account/{account}")
    assert status == 200 and view["email"] == email and view["name"] == "Hosted User"
    assert view["oauth2"]["hasRefreshToken"] and view["state"] == "connecting"
    conn = imap_login(gw, account)
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()
    assert gw.api("GET", f"/v1/account/{account}")[1]["state"] == "connected"

    smtp = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30)
    smtp.starttls(context=gw.client_context())
    smtp.login(account, gw.token(account, scopes=["smtp"]))
    assert smtp.sendmail(email, ["to@example.com"], b"Subject: hosted\r\n\r\nhello\r\n") == {}
    smtp.quit()
    assert wait_for(lambda: any(m.mail_from == email.encode() for m in list(smtp_sink.messages)))


def test_the_address_comes_from_the_id_token_or_userinfo(gateway, oauth2_provider, new_email,
                                                         monkeypatch) -> None:
    """Without an e-mail in the form: the ID token (checked with the provider's keys) names the
    mailbox; an app without a key set asks userinfo."""
    for fields in ({}, {"jwksUrl": None}):
        app = make_app(gateway, oauth2_provider, **fields)
        email = new_email("idtoken")
        monkeypatch.setattr(oauth2_provider, "consent_email", email)
        before = len(oauth2_provider.requests_to("/userinfo"))
        account = email.split("@")[0]
        assert authorize(gateway, account=account, oauth2App=app).status_code == 200
        assert gateway.api("GET", f"/v1/account/{account}")[1]["email"] == email
        asked_userinfo = len(oauth2_provider.requests_to("/userinfo")) > before
        assert asked_userinfo == ("jwksUrl" in fields)
        imap_login(gateway, account).logout()


def test_redirect_url_gets_the_account_and_success(hosted, new_email) -> None:
    gw, provider, app = hosted
    email = new_email("redir")
    account = email.split("@")[0]
    answer = authorize(gw, account=account, email=email, oauth2App=app,
                       redirectUrl="https://app.example.com/done?from=gw")
    assert answer.status_code == 302
    assert answer.headers["Location"] == f"https://app.example.com/done?from=gw&account={account}&state=success"


def _nothing_made(gw: Gateway, account: str) -> bool:
    return gw.api("GET", f"/v1/account/{account}")[0] == 404


def test_tampered_reused_and_opened_twice_are_refused(hosted, new_email) -> None:
    gw, provider, app = hosted
    email = new_email("tamper")
    account = email.split("@")[0]
    link = form(gw, account=account, email=email, oauth2App=app)
    back = consent(to_provider(link))
    again = requests.get(link, allow_redirects=False, timeout=10)
    assert again.status_code == 400 and "used already" in again.text

    state = query_of(back)["state"]
    request_id, _, signature = state.partition(".")
    forged = back.replace(urllib.parse.quote(state, safe=""), request_id + "." + "A" * len(signature))
    if forged == back:
        forged = back.replace(state, request_id + "." + "A" * len(signature))
    answer = callback(forged)
    assert answer.status_code == 400 and "altered" in answer.text
    assert "<script" not in answer.text and answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert _nothing_made(gw, account)

    assert callback(back).status_code == 200  # the real one still works once...
    reused = callback(back)
    assert reused.status_code == 400 and "used already" in reused.text  # ...and only once


def test_expired_state_is_refused(dovecot, oauth2_provider, new_email) -> None:
    with started_gateway(dovecot, oauth2_provider, "gw-oauth-ttl-", oauth2={"state_ttl": 1}) as gw:
        app = make_app(gw, oauth2_provider)
        email = new_email("expired")
        account = email.split("@")[0]
        back = consent(to_provider(form(gw, account=account, email=email, oauth2App=app)))
        time.sleep(1.5)  # past the state's 1 s lifetime: expiry is what is tested
        answer = callback(back)
        assert answer.status_code == 400 and "expired" in answer.text
        assert _nothing_made(gw, account)


def test_refused_consent_changes_nothing(hosted, new_email, monkeypatch) -> None:
    gw, provider, app = hosted
    monkeypatch.setattr(provider, "consent", "deny")
    email = new_email("deny")
    account = email.split("@")[0]
    answer = authorize(gw, account=account, email=email, oauth2App=app)
    assert answer.status_code == 400
    assert "access_denied" in answer.text and "Nothing was changed" in answer.text
    assert _nothing_made(gw, account)


def test_wrong_verifier_and_reused_code_are_refused_by_the_provider(hosted, new_email) -> None:
    """A code sent back with another authorization's state is exchanged with that one's verifier:
    PKCE fails and nothing changes. A code already exchanged is refused when replayed."""
    gw, provider, app = hosted
    email = new_email("pkce")
    account = email.split("@")[0]
    back_a = consent(to_provider(form(gw, account=account, email=email, oauth2App=app)))
    back_b = consent(to_provider(form(gw, account=account, email=email, oauth2App=app)))
    code_a = query_of(back_a)["code"]
    mixed = back_b.replace(query_of(back_b)["code"], code_a)
    answer = callback(mixed)
    assert answer.status_code == 400 and "PKCE verification failed" in answer.text
    assert _nothing_made(gw, account)

    assert callback(back_a).status_code == 200  # a failed exchange does not use the code up
    back_c = consent(to_provider(form(gw, account=account, email=email, oauth2App=app)))
    replay = callback(back_c.replace(query_of(back_c)["code"], code_a))
    assert replay.status_code == 400 and "already been used" in replay.text


def test_revoked_grant_is_answered_at_once_until_reauthorized(dovecot, oauth2_provider, new_email) -> None:
    """The provider revokes the grant: the next login that needs a token fails with its reason,
    the account shows authenticationError, later logins are refused without asking the provider;
    re-authorizing through the form fixes it without a restart."""
    with started_gateway(dovecot, oauth2_provider, "gw-oauth-revoke-", imap={"pool": {"idle_ttl": 0}}) as gw:
        app = make_app(gw, oauth2_provider)
        email = new_email("revoked")
        account = email.split("@")[0]
        assert authorize(gw, account=account, email=email, oauth2App=app).status_code == 200
        imap_login(gw, account).logout()
        refresh = oauth2_provider.current_refresh(email)
        assert refresh is not None
        oauth2_provider.revoke_refresh(refresh)
        for access in oauth2_provider.access_tokens_for(refresh):
            oauth2_provider.expire_access(access)

        first = refused_login(gw, account)
        assert "[UNAVAILABLE] OAuth2 token refresh failed: invalid_grant: Token has been expired or revoked." \
            in first
        view = gw.api("GET", f"/v1/account/{account}")[1]
        assert view["state"] == "authenticationError"
        assert view["lastError"]["error"] == "invalid_grant"
        assert view["lastError"]["description"] == "Token has been expired or revoked."
        asked = len(oauth2_provider.token_requests("refresh_token"))
        second = refused_login(gw, account)
        assert "[UNAVAILABLE] OAuth2 authorization for this account was revoked or expired; re-authorize it" \
            in second
        assert len(oauth2_provider.token_requests("refresh_token")) == asked  # the provider was not asked

        assert authorize(gw, account=account, oauth2App=app).status_code == 200
        assert gw.api("GET", f"/v1/account/{account}")[1]["state"] == "connecting"
        imap_login(gw, account).logout()
        view = gw.api("GET", f"/v1/account/{account}")[1]
        assert view["state"] == "connected" and view["lastError"] is None


def test_a_rotated_refresh_token_is_stored_and_used(dovecot, oauth2_provider, new_email, monkeypatch) -> None:
    monkeypatch.setattr(oauth2_provider, "rotate_refresh", True)
    with started_gateway(dovecot, oauth2_provider, "gw-oauth-rotate-", imap={"pool": {"idle_ttl": 0}}) as gw:
        app = make_app(gw, oauth2_provider)
        email = new_email("rotate")
        account = email.split("@")[0]
        assert authorize(gw, account=account, email=email, oauth2App=app).status_code == 200
        seen = []
        for _ in range(3):
            refresh = oauth2_provider.current_refresh(email)
            seen.append(refresh)
            for access in oauth2_provider.access_tokens_for(refresh):
                oauth2_provider.expire_access(access)
            imap_login(gw, account).logout()  # refreshes with the newest refresh token
        assert len(set(seen)) == 3  # each refresh rotated it
        assert oauth2_provider.reused_refresh == []  # never an old one presented
        assert oauth2_provider.current_refresh(email) not in seen


def test_unreachable_provider_is_named_with_host_and_cause(hosted, new_email) -> None:
    from .dovecot import free_port

    gw, provider, _app = hosted
    port = free_port()
    app = make_app(gw, provider, tokenUrl=f"http://127.0.0.1:{port}/token")
    email = new_email("noidp")
    account = email.split("@")[0]
    _access, refresh = provider.issue(email)
    status, reply = gw.api("POST", "/v1/account", {"account": account, "email": email,
                                                     "oauth2": {"provider": app, "refreshToken": refresh}})
    assert status == 200, reply
    answer = refused_login(gw, account)
    assert f"[UNAVAILABLE] OAuth2 token refresh failed: cannot connect to 127.0.0.1:{port}: connection refused" \
        in answer
    view = gw.api("GET", f"/v1/account/{account}")[1]
    assert view["state"] == "connectError" and view["lastError"]["error"] == "oauth2"
    assert f"127.0.0.1:{port}" in view["lastError"]["description"]


def test_service_account_and_client_credentials_need_no_consent(hosted, new_email, monkeypatch) -> None:
    """Organization grants: a Google-style service account (JWT bearer grant, sub = mailbox) and
    Microsoft-365-style application access (client credentials); creating the account is enough."""
    gw, provider, _app = hosted
    service = "gateway-sa@project.iam.gserviceaccount.com"
    key = provider.register_service_account(service)
    sa_app = make_app(gw, provider, authorizationUrl=None, grant="serviceAccount", clientId=None,
                      clientSecret=None, serviceClientEmail=service, serviceKey=key,
                      scopes=["https://mail.google.com/"])
    status, app_view = gw.api("GET", f"/v1/oauth2/{sa_app}")
    assert status == 200 and "serviceKey" not in app_view and "clientSecret" not in app_view
    email = new_email("delegated")
    account = email.split("@")[0]
    assert gw.api("POST", "/v1/account", {"account": account, "email": email,
                                          "oauth2": {"provider": sa_app}})[0] == 200
    imap_login(gw, account).logout()
    bearer = provider.token_requests("urn:ietf:params:oauth:grant-type:jwt-bearer")[-1]
    assert "client_secret" not in bearer.form

    refused = new_email("nodelegation")
    refused_id = refused.split("@")[0]
    monkeypatch.setattr(provider, "delegation_allowed", {email})
    assert gw.api("POST", "/v1/account", {"account": refused_id, "email": refused,
                                          "oauth2": {"provider": sa_app}})[0] == 200
    assert "unauthorized_client: Client is unauthorized" in refused_login(gw, refused_id)

    app_email = new_email("appaccess")
    app_account = app_email.split("@")[0]
    client_id = "m365-app-" + app_account
    provider.register_client(client_id, "app-secret")
    monkeypatch.setitem(provider.app_mailboxes, client_id, app_email)
    cc_app = make_app(gw, provider, authorizationUrl=None, grant="clientCredentials", clientId=client_id,
                      clientSecret="app-secret", scopes=[MS_APP_SCOPE])
    assert gw.api("POST", "/v1/account", {"account": app_account, "email": app_email,
                                          "oauth2": {"provider": cc_app}})[0] == 200
    imap_login(gw, app_account).logout()
    assert provider.token_requests("client_credentials")[-1].form["scope"] == MS_APP_SCOPE
    assert gw.api("POST", "/v1/authentication/form", {"account": "x", "oauth2App": cc_app})[0] == 400


def test_no_secret_in_clear_in_the_sqlite_file(hosted, new_email) -> None:
    gw, provider, app = hosted
    email = new_email("clear")
    account = email.split("@")[0]
    assert authorize(gw, account=account, email=email, oauth2App=app).status_code == 200
    imap_login(gw, account).logout()
    refresh = provider.current_refresh(email)
    secrets = [refresh, *provider.access_tokens_for(refresh), CLIENT_SECRET,
               provider.token_requests("authorization_code")[-1].form["code_verifier"]]
    raw = b"".join(path.read_bytes() for path in Path(gw.workdir).glob("gateway.db*"))
    for secret in secrets:
        assert secret and secret.encode() not in raw


def test_deleting_the_account_revokes_its_grant_at_the_provider(hosted, new_email) -> None:
    gw, provider, app = hosted
    email = new_email("revokeme")
    account = email.split("@")[0]
    assert authorize(gw, account=account, email=email, oauth2App=app).status_code == 200
    refresh = provider.current_refresh(email)
    assert gw.api("DELETE", f"/v1/account/{account}") == (200, {"account": account, "deleted": True})
    assert [r.kind for r in provider.revocations if r.token == refresh] == ["refresh"]
    assert not provider.is_refresh_valid(refresh)


def test_an_id_token_from_another_issuer_is_not_believed(gateway, oauth2_provider, new_email, monkeypatch) -> None:
    """The ID token is checked (signature, audience, issuer): an app expecting another issuer refuses to
    take the mailbox address from it, and nothing is created."""
    app = make_app(gateway, oauth2_provider, issuer="https://accounts.example.net")
    email = new_email("wrongiss")
    monkeypatch.setattr(oauth2_provider, "consent_email", email)
    account = email.split("@")[0]
    answer = authorize(gateway, account=account, oauth2App=app)
    assert answer.status_code == 400 and "the ID token did not check out" in answer.text
    assert _nothing_made(gateway, account)
