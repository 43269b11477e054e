"""End-to-end IMAP logins through the gateway to a real Dovecot, judged by Dovecot and the provider."""

from __future__ import annotations

import base64
import imaplib
import threading
import time

import pytest

from .gateway_proc import Gateway, wait_for

INVALID = b"NO [AUTHENTICATIONFAILED] Invalid credentials"
DENIED = b"NO [AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP"


def message(subject: str, body: bytes = b"Hello there.\r\n") -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + subject.encode() + b"@example.com>\r\n\r\n" + body)


def raw_login(gw: Gateway, user: str, password: str, source: str | None = None) -> bytes:
    """LOGIN over a raw TLS socket; returns the tagged response line."""
    sock = gw.raw(source=source)
    try:
        sock.sendall(b'a1 LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n')
        return read_until(sock, b"a1 ")
    finally:
        sock.close()


def read_until(sock, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read until a line starting with ``marker`` has arrived completely; returns everything read."""
    chunks: list[bytes] = []
    tail = b"\r\n"  # as if a line had just ended, so a marker at the very start counts
    total = 0
    while total < limit:
        window = tail
        start = window.find(b"\r\n" + marker)
        if start >= 0 and window.find(b"\r\n", start + 2) >= 0:
            return b"".join(chunks)
        chunk = sock.recv(262144)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        # keep enough of the end to see a marker line that spans chunks (lines here are short)
        tail = (tail + chunk)[-(len(marker) + 4096):] if len(tail) + len(chunk) > 8192 else tail + chunk
    return b"".join(chunks)


@pytest.fixture
def account(gateway: Gateway, new_email) -> tuple[str, str]:
    """A fresh OAuth2 account (ID, email) with one message in INBOX upstream."""
    email = new_email("acct")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email)
    gateway.dovecot.append(email, "INBOX", message(f"hello-{account_id}"))
    return account_id, email


def test_imaplib_login_fetches_upstream_bytes_exactly(gateway, account):
    """LOGIN with account ID + token gives the real mailbox; FETCH bytes equal what Dovecot stores."""
    account_id, email = account
    token = gateway.token(account_id)
    conn = gateway.imap()
    typ, data = conn.login(account_id, token)
    assert typ == "OK"
    assert data[0].endswith(f"{account_id} authenticated".encode())
    assert data[0].startswith(b"[CAPABILITY IMAP4rev1 ")
    caps = data[0].split(b"]")[0].split()
    assert b"IDLE" in caps and not any(c.startswith(b"AUTH=") for c in caps), caps
    conn.select("INBOX", readonly=True)
    typ, data = conn.fetch("1", "(BODY.PEEK[])")
    assert data[0][1] == gateway.dovecot.fetch_all(email)[0]
    conn.logout()


def test_authenticate_plain_without_and_with_sasl_ir(gateway, account):
    """AUTHENTICATE PLAIN works both as a continuation (imaplib) and with SASL-IR (raw)."""
    account_id, _ = account
    token = gateway.token(account_id)
    conn = gateway.imap()
    typ, _ = conn.authenticate("PLAIN", lambda _: f"\0{account_id}\0{token}".encode())
    assert typ == "OK"
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()
    sock = gateway.raw()
    ir = base64.b64encode(f"\0{account_id}\0{token}".encode())
    sock.sendall(b"p1 AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert b"p1 OK [CAPABILITY " in read_until(sock, b"p1 ")
    sock.close()


def test_login_with_literals(gateway, account):
    """LOGIN with a synchronizing {n} literal and a non-synchronizing {n+} literal."""
    account_id, _ = account
    token = gateway.token(account_id).encode()
    sock = gateway.raw()
    sock.sendall(b"L1 LOGIN {%d}\r\n" % len(account_id))
    assert read_until(sock, b"+").startswith(b"+")
    sock.sendall(account_id.encode() + b" {%d+}\r\n" % len(token) + token + b"\r\n")
    assert b"L1 OK [CAPABILITY " in read_until(sock, b"L1 ")
    sock.close()


def test_imapclient_lists_and_fetches(gateway, account):
    """imapclient logs in through the gateway and sees the upstream folders and message."""
    imapclient = pytest.importorskip("imapclient")
    account_id, email = account
    client = imapclient.IMAPClient("127.0.0.1", port=gateway.imaps_port, ssl=True,
                                   ssl_context=gateway.client_context(), timeout=30)
    client.login(account_id, gateway.token(account_id))
    assert any(name == "INBOX" for _flags, _delim, name in client.list_folders())
    client.select_folder("INBOX", readonly=True)
    uids = client.search("ALL")
    body = client.fetch(uids, ["BODY.PEEK[]"])[uids[0]][b"BODY[]"]
    assert body == gateway.dovecot.fetch_all(email)[0]
    client.logout()


@pytest.mark.parametrize("case", ["wrong-token", "revoked", "wrong-scope", "unknown-account",
                                  "other-account"])
def test_bad_credentials_are_refused_with_the_design_text(gateway, account, case):
    """Every kind of bad credential gets exactly `NO [AUTHENTICATIONFAILED] Invalid credentials`."""
    account_id, _ = account
    user = account_id
    if case == "wrong-token":
        password = "0" * 64
    elif case == "revoked":
        password = gateway.token(account_id)
        status, body = gateway.api("DELETE", f"/v1/token/{password}")
        assert status == 200 and body == {"deleted": True}
    elif case == "wrong-scope":
        password = gateway.token(account_id, scopes=["smtp"])
    elif case == "unknown-account":
        password = gateway.token(account_id)
        user = "no-such-account"
    else:
        other = account_id + "-other"
        gateway.add_oauth_account(other, "other-" + account[1])
        password = gateway.token(other)
    line = raw_login(gateway, user, password)
    assert line.rstrip().endswith(b"a1 " + INVALID), line


def test_cidr_restriction(gateway, account):
    """A token limited to 127.0.0.2/32 works from 127.0.0.2 and is denied from 127.0.0.3."""
    account_id, _ = account
    token = gateway.token(account_id, cidrs=["127.0.0.2/32"])
    assert raw_login(gateway, account_id, token, source="127.0.0.3").rstrip().endswith(b"a1 " + DENIED)
    assert b"a1 OK [CAPABILITY " in raw_login(gateway, account_id, token, source="127.0.0.2")


def test_upstream_down_gives_unavailable(gateway, new_email):
    """An account whose IMAP server refuses connections gets NO [UNAVAILABLE] with a reason."""
    from .dovecot import free_port

    email = new_email("down")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email,
                              imap={"host": "127.0.0.1", "port": free_port(), "secure": True})
    line = raw_login(gateway, account_id, gateway.token(account_id))
    assert b"a1 NO [UNAVAILABLE] cannot connect to 127.0.0.1:" in line, line
    assert "result=fail reason=upstream cannot connect to 127.0.0.1:" in gateway.log_text()


def test_revoked_refresh_token_gives_unavailable(gateway, new_email, oauth2_provider):
    """When the provider has revoked the refresh token, login says so instead of hanging."""
    email = new_email("revoked")
    account_id = email.split("@")[0]
    refresh = gateway.add_oauth_account(account_id, email)
    oauth2_provider.revoke_refresh(refresh)
    line = raw_login(gateway, account_id, gateway.token(account_id))
    assert b"a1 NO [UNAVAILABLE] OAuth2 token refresh failed: invalid_grant" in line, line


def test_expiring_access_token_is_refreshed(gateway, new_email, oauth2_provider):
    """An access token that expires between two logins is refreshed; both logins work.

    The first session stays open, so the second login needs a new upstream
    connection (a pooled one would need no token at all)."""
    email = new_email("expiring")
    account_id = email.split("@")[0]
    refresh = gateway.add_oauth_account(account_id, email)
    oauth2_provider.set_lifetime(refresh, 2.5)
    token = gateway.token(account_id)
    conns = []
    for _ in range(2):
        conn = gateway.imap()
        conns.append(conn)
        assert conn.login(account_id, token)[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
        time.sleep(2.6)
    for conn in conns:
        conn.logout()
    assert oauth2_provider.refresh_count(refresh) == 2
    # The stored access token is the provider's newest one, and Dovecot accepted it.
    assert oauth2_provider.access_tokens_for(refresh)


def test_one_refresh_in_flight_for_many_logins(gateway, new_email, oauth2_provider):
    """Eight clients logging in at once while a slow refresh runs cause exactly one refresh."""
    email = new_email("flight")
    account_id = email.split("@")[0]
    refresh = gateway.add_oauth_account(account_id, email)
    token = gateway.token(account_id)
    oauth2_provider.token_delay = 1.0
    results: list[bytes] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(raw_login(gateway, account_id, token)))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        oauth2_provider.token_delay = 0.0
    assert len(results) == 8 and all(b"a1 OK [CAPABILITY " in r for r in results), results
    assert oauth2_provider.refresh_count(refresh) == 1


def test_login_log_line_has_no_secret(gateway, new_email):
    """The login log line names account and client, never the token, access or refresh token."""
    email = new_email("logs")
    account_id = email.split("@")[0]
    refresh = gateway.add_oauth_account(account_id, email)
    token = gateway.token(account_id)
    assert b"a1 OK" in raw_login(gateway, account_id, token)
    assert wait_for(lambda: f"account={account_id} client=127.0.0.1" in gateway.log_text())
    text = gateway.log_text()
    assert token not in text and refresh not in text
    accesses = gateway.provider.access_tokens_for(refresh)
    assert accesses and not any(access in text for access in accesses)


def test_password_account_uses_login_upstream(gateway, new_email):
    """A non-OAuth account logs in upstream with its stored password (LOGIN)."""
    email = new_email("pw")
    account_id = email.split("@")[0]
    gateway.dovecot.add_password_user(email, "s3cret pass")
    status, body = gateway.api("POST", "/v1/account", {
        "account": account_id, "email": email,
        "imap": {"host": "localhost", "port": gateway.dovecot.imaps_port, "secure": True,
                 "auth": {"user": email, "pass": "s3cret pass"}}})
    assert status == 200, body
    conn = gateway.imap()
    assert conn.login(account_id, gateway.token(account_id))[0] == "OK"
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()


def test_starttls_upstream(gateway, new_email):
    """An account whose server is configured for STARTTLS (secure: false) is reached over STARTTLS."""
    email = new_email("stls")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email,
                              imap={"host": "localhost", "port": gateway.dovecot.imap_port, "secure": False})
    conn = gateway.imap()
    assert conn.login(account_id, gateway.token(account_id))[0] == "OK"
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()


def test_id_before_login_is_answered_by_the_gateway(gateway):
    """Apple Mail's pre-auth ID gets the gateway's own ID answer."""
    sock = gateway.raw()
    sock.sendall(b'i1 ID ("name" "Mail" "version" "16.0")\r\n')
    data = read_until(sock, b"i1 ")
    assert b'* ID ("name" "gateway"' in data and b"i1 OK" in data
    sock.close()


def test_revoked_access_token_is_refreshed_once_and_retried(gateway, new_email, oauth2_provider):
    """The provider revokes the cached access token early: the upstream refuses it, the gateway
    refreshes once and the login still works."""
    email = new_email("early")
    account_id = email.split("@")[0]
    refresh = gateway.add_oauth_account(account_id, email)
    token = gateway.token(account_id)
    first = gateway.raw()  # held open, so the second login needs a new upstream connection
    first.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
    assert b"a1 OK" in read_until(first, b"a1 ")
    assert oauth2_provider.refresh_count(refresh) == 1
    for access in oauth2_provider.access_tokens_for(refresh):
        oauth2_provider.revoke_access(access)
    assert b"a1 OK" in raw_login(gateway, account_id, token)
    assert oauth2_provider.refresh_count(refresh) == 2
    first.close()


def test_upstream_refusal_reports_the_providers_error(gateway, new_email, oauth2_provider):
    """XOAUTH2 `user=` is the account's oauth2.auth.user: when it does not match the token's
    mailbox Dovecot refuses, and the client gets NO [UNAVAILABLE] with the upstream's answer."""
    email = new_email("mismatch")
    account_id = email.split("@")[0]
    _access, refresh = oauth2_provider.issue(email)
    status, body = gateway.api("POST", "/v1/account", {
        "account": account_id, "email": email,
        "oauth2": {"provider": gateway.app_id, "auth": {"user": "someone-else@example.com"},
                   "refreshToken": refresh}})
    assert status == 200, body
    line = raw_login(gateway, account_id, gateway.token(account_id))
    assert b"a1 NO [UNAVAILABLE] upstream login failed: [AUTHENTICATIONFAILED]" in line, line
    assert b"status=401 schemes=bearer" in line  # the decoded JSON of Dovecot's failure challenge
    assert oauth2_provider.refresh_count(refresh) == 2  # the first token, then one forced refresh


def test_upstream_certificate_is_verified(dovecot, oauth2_provider, new_email, tmp_path):
    """A gateway that does not trust the upstream's CA refuses to log in there: NO [UNAVAILABLE]."""
    gw = Gateway(tmp_path / "untrusting", dovecot, oauth2_provider, upstream={"ca_file": None})
    try:
        gw.start()
        email = new_email("tls")
        account_id = email.split("@")[0]
        gw.add_oauth_account(account_id, email)
        line = raw_login(gw, account_id, gw.token(account_id))
        assert b"a1 NO [UNAVAILABLE] upstream TLS error: certificate verify failed" in line, line
    finally:
        gw.stop()


def test_connections_and_metrics_show_a_live_session(gateway, account):
    """While a session is open, /v1/connections lists it; /metrics counts the login."""
    import urllib.request

    account_id, _ = account
    conn = gateway.imap()
    conn.login(account_id, gateway.token(account_id))
    status, body = gateway.api("GET", "/v1/connections")
    assert status == 200
    mine = [c for c in body["connections"] if c["account"] == account_id]
    assert mine and mine[0]["protocol"] == "imap" and mine[0]["client"] == "127.0.0.1"
    assert mine[0]["upstream"] == f"localhost:{gateway.dovecot.imaps_port}"
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.api_port}/metrics",
                                 headers={"Authorization": f"Bearer {gateway.admin_token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert 'gateway_logins_total{protocol="imap",reason="",result="ok"}' in text
    assert 'gateway_sessions_active{protocol="imap"}' in text
    conn.logout()
    assert wait_for(lambda: not [c for c in gateway.api("GET", "/v1/connections")[1]["connections"]
                                 if c["account"] == account_id])
