"""The dashboard's security, driven with a plain HTTP client (requests) against a real gateway: no
session -> the sign-in page; forms without or with a wrong CSRF token refused with 403 and nothing
changed; hostile names escaped; the cookie's flags; the policy headers; a session that dies with its
token; sign-out; a wrong token at sign-in throttled by the same limiter as a bad IMAP login."""

from __future__ import annotations

import imaplib
import re
import socket

import pytest
import requests

from .dashboard_client import base, csrf_of, page, post, sign_in
from .gateway_proc import Gateway, read_to_close, started_gateway, wait_for
from .test_imap_login import read_until

HOSTILE = "<script>alert(1)</script>"


def _account(gw: Gateway, new_email, prefix: str) -> str:
    email = new_email(prefix)
    account = email.split("@")[0]
    gw.add_oauth_account(account, email)
    return account


def _token_ids(gw: Gateway) -> set[str]:
    return {t["id"] for t in gw.api("GET", "/v1/tokens")[1]["tokens"]}


def _is_signin(answer: requests.Response) -> bool:
    return 'action="/dashboard/signin"' in answer.text and 'name="token"' in answer.text


def test_without_a_session_every_page_is_the_sign_in_page(gateway: Gateway, new_email) -> None:
    """No cookie (or a made-up one): `/` and every page answer the sign-in form and show no data."""
    account = _account(gateway, new_email, "nocookie")
    for path in ("/", "/dashboard/", "/dashboard/tokens", "/dashboard/sessions", "/dashboard/network"):
        for cookies in ({}, {"gateway_session": "made-up"}):
            answer = requests.get(base(gateway) + path, cookies=cookies, timeout=10)
            assert answer.status_code == 200 and _is_signin(answer), (path, answer.text[:500])
            assert account not in answer.text and "Sign out" not in answer.text


def test_forms_without_or_with_a_wrong_csrf_token_are_refused_and_change_nothing(gateway: Gateway,
                                                                                 new_email) -> None:
    """Every change is a POST with the session's CSRF token: without it, with a wrong one, or without a
    session at all, the answer is 403 and the token, the account and the live sessions stay."""
    account = _account(gateway, new_email, "csrf")
    victim = gateway.token(account)
    victim_id = [t["id"] for t in gateway.api("GET", f"/v1/tokens/account/{account}")[1]["tokens"]][0]
    session = sign_in(gateway)
    anonymous = requests.Session()
    forms = [("/dashboard/tokens/create", {"account": account, "scopes": ["imap-proxy"], "description": "forged"}),
             ("/dashboard/tokens/revoke", {"token": victim_id, "disconnect": "true"}),
             ("/dashboard/accounts/delete", {"account": account}),
             ("/dashboard/accounts/authorize", {"account": "forged", "oauth2App": gateway.app_id}),
             ("/dashboard/sessions/end", {"id": "1"}),
             ("/dashboard/signout", {})]
    before = _token_ids(gateway)
    for path, data in forms:
        for client, csrf in ((session, None), (session, "0" * 43), (session, ""), (anonymous, None)):
            answer = post(client, gateway, path, data, csrf=csrf)
            assert answer.status_code == 403, (path, csrf, answer.status_code, answer.text[:300])
            assert "nothing was changed" in answer.text
    assert _token_ids(gateway) == before
    assert gateway.api("GET", f"/v1/account/{account}")[0] == 200
    conn = gateway.imap()
    assert conn.login(account, victim)[0] == "OK"  # the token still works
    conn.logout()
    assert page(session, gateway, "/").status_code == 200  # and the session was not signed out
    # The same form with the right token goes through (the test above is not vacuous).
    answer = post(session, gateway, "/dashboard/tokens/revoke", {"token": victim_id})
    assert answer.status_code == 303 and victim_id not in _token_ids(gateway)


def test_revoking_with_disconnect_ends_that_tokens_live_sessions(gateway: Gateway, new_email) -> None:
    """The revoke form's "also end the live sessions" box is the API's ?disconnect=true: the session that
    logged in with the token reads the BYE, another token's session goes on."""
    account = _account(gateway, new_email, "dashdisconnect")
    doomed, kept = gateway.token(account), gateway.token(account)
    doomed_id = [t["id"] for t in gateway.api("GET", f"/v1/tokens/account/{account}")[1]["tokens"]][0]
    ended, other = _logged_in(gateway, account, doomed), _logged_in(gateway, account, kept)
    try:
        session = sign_in(gateway)
        answer = post(session, gateway, "/dashboard/tokens/revoke", {"token": doomed_id, "disconnect": "true"})
        assert answer.status_code == 303 and answer.headers["Location"] == "/dashboard/tokens"
        assert read_to_close(ended) == b"* BYE Session ended by administrator\r\n"
        assert f"Token {doomed_id} revoked; 1 live session ended." in page(session, gateway, "/dashboard/tokens").text
        other.sendall(b"n1 NOOP\r\n")
        assert b"n1 OK" in read_until(other, b"n1 ")
    finally:
        ended.close()
        other.close()


def _logged_in(gw: Gateway, account: str, token: str) -> socket.socket:
    sock = gw.raw()
    sock.sendall(b"a1 LOGIN " + account.encode() + b" " + token.encode() + b"\r\n")
    assert b"a1 OK" in read_until(sock, b"a1 ")
    return sock


def test_the_sign_in_form_has_its_own_csrf_token(gateway: Gateway) -> None:
    """Signing in without the form's CSRF token (or with another browser's) is refused even with a
    right token, and no session cookie is set."""
    other = requests.Session()
    stolen = csrf_of(other.get(base(gateway) + "/", timeout=10).text)
    for data in ({"token": gateway.admin_token}, {"token": gateway.admin_token, "csrf": stolen}):
        answer = requests.post(base(gateway) + "/dashboard/signin", data=data, allow_redirects=False, timeout=10)
        assert answer.status_code == 403 and "gateway_session" not in answer.headers.get("Set-Cookie", "")


def test_a_hostile_account_name_and_description_are_shown_escaped(gateway: Gateway, new_email) -> None:
    """An account named <script>alert(1)</script> and a token description that tries to leave its
    attribute come back as text, escaped, on the accounts and tokens pages."""
    status, reply = gateway.api("POST", "/v1/account", {
        "account": HOSTILE, "email": new_email("hostile"),
        "imap": {"host": "localhost", "port": gateway.dovecot.imaps_port, "secure": True,
                 "auth": {"user": "x", "pass": "y"}}})
    assert status == 200, reply
    try:
        gateway.api("POST", "/v1/token", {"account": HOSTILE, "scopes": ["imap-proxy"],
                                          "description": '"><img src=x onerror=alert(2)>'})
        session = sign_in(gateway)
        for path in ("/", "/dashboard/tokens"):
            html = page(session, gateway, path).text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
            assert HOSTILE not in html and "<img" not in html
            assert re.findall(r"<script[^>]*>", html) == [re.search(r'<script src="[^"]+" defer="defer">',
                                                                    html).group(0)]
        assert "&gt;&lt;img src=x onerror=alert(2)&gt;" in page(session, gateway, "/dashboard/tokens").text
    finally:
        gateway.api("DELETE", "/v1/account/%3Cscript%3Ealert(1)%3C%2Fscript%3E")


def test_cookie_flags_and_security_headers(gateway: Gateway) -> None:
    """The session cookie is HttpOnly, SameSite=Strict, for / and expires (Max-Age = api.dashboard_session_ttl,
    default 8 h); not Secure on an http:// public URL. Pages carry a strict Content-Security-Policy
    (no inline script or style), are not cached and cannot be framed."""
    session = requests.Session()
    first = session.get(base(gateway) + "/", timeout=10)
    answer = session.post(base(gateway) + "/dashboard/signin", allow_redirects=False, timeout=10,
                          data={"csrf": csrf_of(first.text), "token": gateway.admin_token})
    assert answer.status_code == 303 and answer.headers["Location"] == "/"
    cookie = [c for c in answer.raw.headers.getlist("Set-Cookie") if c.startswith("gateway_session=")][0]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert flags["httponly"] and flags["samesite"].lower() == "samesite=strict" and flags["path"] == "Path=/"
    assert flags["max-age"] == "Max-Age=28800" and "secure" not in flags
    home = session.get(base(gateway) + "/", timeout=10)
    policy = home.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy and "form-action 'self'" in policy
    assert home.headers["Cache-Control"] == "no-store" and home.headers["X-Frame-Options"] == "DENY"
    assert ' style="' not in home.text and "onclick" not in home.text
    css = session.get(base(gateway) + re.search(r'href="(/dashboard/static/dashboard\.css\?v=\w+)"', home.text)
                      .group(1), timeout=10)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "immutable" in css.headers["Cache-Control"]


def test_the_session_dies_when_its_token_is_revoked(gateway: Gateway) -> None:
    """Signed in with a second admin token: revoking that token through the API ends the dashboard
    session at its next request (the sign-in page says why); the first token's session goes on."""
    status, reply = gateway.api("POST", "/v1/token", {"scopes": ["api"], "description": "short-lived"})
    assert status == 200
    doomed, kept = sign_in(gateway, reply["token"]), sign_in(gateway)
    assert "Sign out" in page(doomed, gateway, "/dashboard/tokens").text
    assert gateway.api("DELETE", f"/v1/token/{reply['token']}")[0] == 200
    answer = page(doomed, gateway, "/dashboard/tokens")
    assert _is_signin(answer) and "its token was revoked" in answer.text
    assert "Sign out" in page(kept, gateway, "/dashboard/tokens").text


def test_sign_out_ends_the_session(gateway: Gateway) -> None:
    session = sign_in(gateway)
    cookie = session.cookies.get("gateway_session")
    answer = post(session, gateway, "/dashboard/signout", {})
    assert answer.status_code == 303
    assert _is_signin(session.get(base(gateway) + "/", timeout=10))
    again = requests.get(base(gateway) + "/dashboard/tokens", cookies={"gateway_session": cookie}, timeout=10)
    assert _is_signin(again)  # the old cookie value is dead on the server, not only in the browser


def test_an_account_bound_api_token_sees_and_changes_its_own_account_only(gateway: Gateway, new_email) -> None:
    """The dashboard goes through the API's permission checks: a token with scope api bound to one account
    lists that account and its tokens only, and cannot revoke another account's token."""
    mine, other = _account(gateway, new_email, "boundmine"), _account(gateway, new_email, "boundother")
    gateway.token(other)
    other_id = gateway.api("GET", f"/v1/tokens/account/{other}")[1]["tokens"][0]["id"]
    session = sign_in(gateway, gateway.token(mine, scopes=["api"]))
    accounts, tokens = page(session, gateway, "/").text, page(session, gateway, "/dashboard/tokens").text
    assert mine in accounts and other not in accounts and "Add an account" not in accounts
    assert other not in tokens and other_id not in tokens
    answer = post(session, gateway, "/dashboard/tokens/revoke", {"token": other_id})
    assert answer.status_code == 404 and other_id in _token_ids(gateway)


@pytest.fixture(scope="module")
def throttled(dovecot, oauth2_provider):
    """A gateway that does not exempt loopback from the login limits: delays after 1 failure, lockout
    after 3."""
    with started_gateway(dovecot, oauth2_provider, "gw-dash-limits-",
                         limits={"auth_failures": 1, "auth_window": 300, "auth_lockout_after": 3,
                                 "auth_lockout": 300, "exempt": []}) as gw:
        yield gw


def test_a_wrong_token_at_sign_in_is_throttled_like_a_bad_login(throttled: Gateway, new_email) -> None:
    """The same AuthLimiter as IMAP: a bad IMAP login and a wrong dashboard token from 127.0.0.1 count
    together; past limits.auth_failures the sign-in answer is held (0.5 s, then 1 s: the limiter's
    metric and the sign-in log line say so); past auth_lockout_after the address is locked out and
    even the right token is refused."""
    gw = throttled
    account = _account(gw, new_email, "throttle")
    conn = gw.imap()
    with pytest.raises(imaplib.IMAP4.error):
        conn.login(account, "0" * 64)  # failure 1, IMAP
    conn.shutdown()

    def wrong_sign_in() -> requests.Response:
        session = requests.Session()
        csrf = csrf_of(session.get(base(gw) + "/", timeout=10).text)
        return session.post(base(gw) + "/dashboard/signin", data={"csrf": csrf, "token": "1" * 64},
                            allow_redirects=False, timeout=30)

    answer = wrong_sign_in()  # failure 2: held 0.5 s
    assert answer.status_code == 401 and "Invalid token" in answer.text and _is_signin(answer)
    assert gw.metric("gateway_auth_failures_total", protocol="dashboard") == 1
    assert gw.metric("gateway_auth_delayed_total", protocol="dashboard") == 1
    assert wait_for(lambda: "Dashboard sign-in client=127.0.0.1 result=fail reason=bad-token (answer held 0.5 s)"
                    in gw.log_text()), gw.log_tail()
    assert wrong_sign_in().status_code == 401  # failure 3: held 1 s
    assert "(answer held 1.0 s)" in gw.log_text()
    assert wrong_sign_in().status_code == 401  # failure 4: past auth_lockout_after, locked out
    assert "Login lockout: address 127.0.0.1" in gw.log_text()
    # (no metric read from here on: the locked-out address gets the API's 401 too, even for the admin token)
    session = requests.Session()
    csrf = csrf_of(session.get(base(gw) + "/", timeout=10).text)
    right = session.post(base(gw) + "/dashboard/signin", data={"csrf": csrf, "token": gw.admin_token},
                         allow_redirects=False, timeout=30)
    assert right.status_code == 401 and "gateway_session" not in session.cookies
    assert wait_for(lambda: "result=fail reason=locked-out (answer held 5.0 s)" in gw.log_text())
