"""Self-tests of the integration harness, talking straight to Dovecot (no gateway)."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl

import pytest
import requests

from .dovecot import xoauth2_callback

CLIENT_ID = "harness-client"
CLIENT_SECRET = "harness-secret"


@pytest.fixture(scope="module", autouse=True)
def _client(oauth2_provider):
    oauth2_provider.register_client(CLIENT_ID, CLIENT_SECRET)


def _xoauth2(dovecot, email: str, token: str) -> imaplib.IMAP4_SSL:
    conn = dovecot.imap_connect()
    try:
        conn.authenticate("XOAUTH2", xoauth2_callback(email, token))
    except BaseException:
        conn.shutdown()
        raise
    return conn


def _assert_refused(dovecot, email: str, token: str) -> None:
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        _xoauth2(dovecot, email, token)


def test_xoauth2_login_with_issued_token(dovecot, oauth2_provider, new_email):
    """A provider-issued access token logs in via AUTHENTICATE XOAUTH2 over
    verified implicit TLS, Dovecot validated it against /tokeninfo, and SELECT
    INBOX works (userdb / mail store permissions are right)."""
    email = new_email()
    access, _refresh = oauth2_provider.issue(email)
    oauth2_provider.clear_requests()
    conn = _xoauth2(dovecot, email, access)
    try:
        typ, data = conn.select("INBOX")
        assert typ == "OK", data
        assert data == [b"0"]
    finally:
        conn.logout()
    infos = oauth2_provider.requests_to("/tokeninfo")
    assert [r.query.get("access_token") for r in infos] == [access]


def test_made_up_token_refused(dovecot, oauth2_provider, new_email):
    """A token the provider never issued is rejected by Dovecot."""
    _assert_refused(dovecot, new_email(), "not-a-real-token")


def test_token_for_other_user_refused(dovecot, oauth2_provider, new_email):
    """A valid token only authenticates the account it was issued for
    (username_attribute=email is enforced)."""
    access, _ = oauth2_provider.issue(new_email())
    _assert_refused(dovecot, new_email(), access)


def test_expired_access_token_refused(dovecot, oauth2_provider, new_email):
    """An access token that worked is refused once the provider expires it
    (no auth caching in Dovecot)."""
    email = new_email()
    access, _ = oauth2_provider.issue(email)
    _xoauth2(dovecot, email, access).logout()
    oauth2_provider.expire_access(access)
    _assert_refused(dovecot, email, access)


def test_refresh_token_flow(dovecot, oauth2_provider, new_email):
    """POST /token with a refresh token (client_secret_post and HTTP Basic)
    mints new access tokens Dovecot accepts; bad client -> 401 invalid_client;
    a revoked refresh token -> 400 invalid_grant."""
    email = new_email()
    _access, refresh = oauth2_provider.issue(email, access_lifetime=120)
    form = {"grant_type": "refresh_token", "refresh_token": refresh}

    r = requests.post(oauth2_provider.token_url, timeout=10,
                      data={**form, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 120
    assert body["scope"]
    _xoauth2(dovecot, email, body["access_token"]).logout()

    oauth2_provider.set_lifetime(refresh, 60)
    r = requests.post(oauth2_provider.token_url, data=form, timeout=10,
                      auth=(CLIENT_ID, CLIENT_SECRET))
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 60
    assert r.json()["access_token"] != body["access_token"]
    _xoauth2(dovecot, email, r.json()["access_token"]).logout()
    assert oauth2_provider.refresh_count(refresh) == 2

    r = requests.post(oauth2_provider.token_url, data=form, timeout=10,
                      auth=(CLIENT_ID, "wrong"))
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}

    oauth2_provider.revoke_refresh(refresh)
    r = requests.post(oauth2_provider.token_url, data=form, timeout=10,
                      auth=(CLIENT_ID, CLIENT_SECRET))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert oauth2_provider.refresh_count(refresh) == 2


def test_append_fetch_all_byte_exact(dovecot, new_email):
    """append() + fetch_all() round-trip messages byte for byte (8-bit, long
    lines, trailing blanks, dot/From lines, no final CRLF), in a created
    folder and in INBOX, in append order."""
    email = new_email()
    m1 = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: =?utf-8?q?h=C3=A9?=\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
          b"\r\nh\xc3\xa9llo  \t\r\n.\r\n..dot\r\nFrom the start\r\n" + b"x" * 2000 + b"\r\n")
    m2 = b"Subject: second\r\n\r\nno final newline"
    dovecot.append(email, "Archive/2024", m1)
    dovecot.append(email, "Archive/2024", m2)
    dovecot.append(email, "INBOX", m2)
    assert dovecot.fetch_all(email, "Archive/2024") == [m1, m2]
    assert dovecot.fetch_all(email, "INBOX") == [m2]
    assert dovecot.fetch_all(new_email(), "INBOX") == []


def test_password_user_login(dovecot, new_email):
    """A passwd-file account logs in with LOGIN over imaps; a wrong password
    is refused."""
    email = new_email("pw")
    dovecot.add_password_user(email, "s3cret pass")
    conn = dovecot.imap_connect()
    try:
        assert conn.login(email, "s3cret pass")[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
    finally:
        conn.logout()
    conn = dovecot.imap_connect()
    try:
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(email, "wrong")
    finally:
        conn.shutdown()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_tls_endpoints_verify_with_test_ca(dovecot, address):
    """The server cert verifies against ca_file for localhost/127.0.0.1/::1,
    on imaps and via STARTTLS on the plain port, and the submission listener
    (if configured) answers."""
    if address == "::1" and "::1" not in dovecot.listen_hosts:
        pytest.skip("no IPv6 loopback")
    ctx = dovecot.ssl_context()
    for name in ("localhost", address):
        with socket.create_connection((address, dovecot.imaps_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(100).startswith(b"* OK")
    conn = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    try:
        assert "STARTTLS" in conn.capabilities
        conn.starttls(ssl_context=ctx)  # hostname 127.0.0.1 (IP SAN)
        assert "AUTH=XOAUTH2" in conn.capabilities
    finally:
        conn.logout()
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((address, dovecot.imaps_port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    if dovecot.submission_port:
        with smtplib.SMTP(dovecot.host, dovecot.submission_port, timeout=10) as smtp:
            smtp.starttls(context=ctx)
            smtp.ehlo()
            assert "XOAUTH2" in smtp.esmtp_features.get("auth", "").upper()
