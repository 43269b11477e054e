"""End-to-end SMTP through the gateway to upstreams Dovecot cannot play.

Dovecot 2.3 submission has no SMTPUTF8 and always offers PIPELINING, 8BITMIME
and SIZE, so the relay filter's translations and the XOAUTH2 error challenge
are shown here against :class:`~tests.integration.smtp_sink.SMTPSink` in its
authenticated-upstream mode (``smtp_upstream`` fixture): implicit TLS or
STARTTLS with the test CA's certificate, AUTH XOAUTH2 checked against the test
provider's tokeninfo (or AUTH PLAIN/LOGIN with a password table), and an EHLO
that advertises only what a test chooses.  The first tests check the sink
itself, so that "no violation recorded" below means something.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import smtplib
import socket
from typing import Any

import pytest

from .dovecot import xoauth2_string
from .gateway_proc import Gateway
from .smtp_sink import DEFAULT_EXTENSIONS, XOAUTH2_ERROR, SMTPSink

PASSWORD = "s3cret pass\u00e9"


def without(*names: str) -> list[str]:
    """The sink's default EHLO keywords minus ``names``."""
    return [e for e in DEFAULT_EXTENSIONS if e not in names]


def message(tag: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: " + tag.encode()
            + b"\r\nMessage-ID: <" + tag.encode() + b"@example.com>\r\n\r\n" + body)


def client(gateway: Gateway) -> smtplib.SMTP:
    """smtplib on the gateway's STARTTLS listener, TLS up, EHLO done."""
    conn = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30)
    conn.ehlo("client.example")
    conn.starttls(context=gateway.client_context())
    conn.ehlo("client.example")
    return conn


def oauth_account(gateway: Gateway, new_email: Any, sink: SMTPSink, *, secure: bool = True,
                  user: str | None = None) -> tuple[str, str, str]:
    """An OAuth2 account submitting to ``sink``: (account ID, email, smtp token).
    ``user`` overrides ``oauth2.auth.user`` (the XOAUTH2 ``user=``)."""
    email = new_email("up")
    account_id = email.split("@")[0]
    _access, refresh = gateway.provider.issue(email)
    status, body = gateway.api("POST", "/v1/account", {
        "account": account_id, "name": account_id, "email": email,
        "oauth2": {"provider": gateway.app_id, "auth": {"user": user or email},
                   "refreshToken": refresh},
        "smtp": {"host": "localhost", "port": sink.port, "secure": secure}})
    assert status == 200, body
    return account_id, email, gateway.token(account_id, scopes=["smtp"])


def logged_in(gateway: Gateway, account: tuple[str, str, str]) -> smtplib.SMTP:
    conn = client(gateway)
    conn.login(account[0], account[2])
    return conn


def login_once(conn: smtplib.SMTP, account: tuple[str, str, str]) -> None:
    """One AUTH PLAIN (smtplib's ``login`` would retry a refused login with LOGIN)."""
    conn.user, conn.password = account[0], account[2]
    conn.auth("PLAIN", conn.auth_plain)


def read_reply(f: Any) -> list[bytes]:
    """One (multi-line) reply from a socket file."""
    lines = [f.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(f.readline())
    return lines


# ----------------------------------------------------------------- the sink itself
def test_sink_xoauth2_both_forms_and_gmail_error_challenge(dovecot, oauth2_provider, smtp_upstream):
    """The sink in implicit TLS: AUTH XOAUTH2 only (no STARTTLS), MAIL refused before AUTH,
    initial-response and two-step forms accepted with a provider token, and a token of another
    user answered Gmail-style: 334 <base64 JSON>, empty line, 535 5.7.8."""
    sink = smtp_upstream()
    email = "sinkself@example.com"
    token, _ = oauth2_provider.issue(email)

    def connect() -> smtplib.SMTP:
        conn = smtplib.SMTP_SSL("localhost", sink.port, timeout=10, context=dovecot.ssl_context())
        conn.ehlo("c.example")
        return conn

    conn = connect()
    assert conn.esmtp_features["auth"].split() == ["XOAUTH2"]
    assert not conn.has_extn("starttls") and conn.has_extn("smtputf8")
    assert conn.mail(email) == (530, b"5.7.0 Authentication required")
    assert conn.auth("XOAUTH2", lambda c=None: xoauth2_string(email, token).decode(),
                     initial_response_ok=True)[0] == 235
    conn.sendmail(email, ["r@example.com"], message("self"))
    conn.quit()
    conn = connect()
    assert conn.auth("XOAUTH2", lambda c=None: xoauth2_string(email, token).decode(),
                     initial_response_ok=False)[0] == 235
    conn.quit()

    challenges: list[bytes] = []

    def wrong_user(challenge: bytes | None = None) -> str:
        if challenge:
            challenges.append(challenge)
            return ""
        return xoauth2_string("other@example.com", token).decode()

    conn = connect()
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        conn.auth("XOAUTH2", wrong_user, initial_response_ok=False)
    assert (err.value.smtp_code, err.value.smtp_error) == (
        535, b"5.7.8 Username and Password not accepted")
    assert [json.loads(c) for c in challenges] == [XOAUTH2_ERROR]
    conn.close()
    [m] = sink.wait_for(1)
    assert (m.auth_user, m.tls) == (email, True)
    assert [(a.user, a.ok, a.initial_response) for a in sink.auth] == [
        (email, True, True), (email, True, False), ("other@example.com", False, False)]
    assert sink.violations == []


def test_sink_starttls_passwords_and_violation_detectors(dovecot, smtp_upstream):
    """The sink with STARTTLS, passwords and neither PIPELINING nor 8BITMIME detects what the
    gateway must never do: bytes pipelined behind STARTTLS, a pipelined command, 8-bit data
    without 8BITMIME; it refuses BODY= and offers AUTH only after TLS."""
    sink = smtp_upstream(tls="starttls", xoauth2=False, passwords={"u": PASSWORD},
                         extensions=without("PIPELINING", "8BITMIME"))
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO c.example\r\n")
        assert [line[4:].strip() for line in read_reply(f)] == [
            b"sink.test", b"SIZE 52428800", b"ENHANCEDSTATUSCODES", b"SMTPUTF8", b"DSN", b"STARTTLS"]
        raw.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0u\0" + PASSWORD.encode()) + b"\r\n")
        assert f.readline().startswith(b"530 5.7.0")
        raw.sendall(b"STARTTLS\r\nEHLO injected\r\n")
        assert f.readline().startswith(b"220 ")
        tls = dovecot.ssl_context().wrap_socket(raw, server_hostname="localhost")
        f = tls.makefile("rb")
        tls.sendall(b"EHLO c.example\r\n")
        assert read_reply(f)[-1] == b"250 AUTH PLAIN LOGIN\r\n"  # the injected EHLO was dropped
        tls.sendall(b"AUTH LOGIN\r\n")
        assert f.readline() == b"334 VXNlcm5hbWU6\r\n"
        tls.sendall(base64.b64encode(b"u") + b"\r\n")
        assert f.readline() == b"334 UGFzc3dvcmQ6\r\n"
        tls.sendall(base64.b64encode(PASSWORD.encode()) + b"\r\n")
        assert f.readline().startswith(b"235 ")
        tls.sendall(b"MAIL FROM:<a@x> BODY=8BITMIME\r\n")
        assert f.readline() == b"555 5.5.4 Unsupported parameter BODY\r\n"
        tls.sendall(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")  # pipelined: a violation
        assert [f.readline()[:3] for _ in range(2)] == [b"250", b"250"]
        tls.sendall(b"DATA\r\n")
        assert f.readline().startswith(b"354 ")
        tls.sendall("Grüße\r\n.\r\n".encode())
        assert f.readline().startswith(b"250 ")
        tls.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221 ")
        tls.close()
    assert [(v.kind, v.detail) for v in sink.violations] == [
        ("pipelining", "b'EHLO injected' arrived before the reply to b'STARTTLS'"),
        ("starttls-injection", "b'EHLO injected\\r\\n' pipelined behind STARTTLS"),
        ("pipelining", "b'RCPT TO:<b@x>' arrived before the reply to b'MAIL FROM:<a@x>'"),
        ("8bit", "8-bit message data, 8BITMIME not advertised")]
    [m] = sink.wait_for(1)
    assert (m.auth_user, m.tls, m.data) == ("u", True, "Grüße\r\n".encode())


# ------------------------------------------------------------ through the gateway
def test_smtputf8_transaction_arrives_byte_exact(gateway, new_email, smtp_upstream):
    """With an upstream that has SMTPUTF8, a UTF-8 sender and recipient with the SMTPUTF8
    parameter and UTF-8 headers pass the gateway unchanged: envelope and message byte-exact."""
    sink = smtp_upstream()
    account = oauth_account(gateway, new_email, sink)
    sender = f"jörg.{account[0]}@bücher.example"
    rcpt = "用户@例子.example"
    body = (f"From: Jörg <{sender}>\r\nTo: 用户 <{rcpt}>\r\nSubject: Grüße – 日本語\r\n"
            "Message-ID: <utf8@bücher.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Grüße aus Köln ✓\r\n").encode()
    conn = logged_in(gateway, account)
    assert conn.sendmail(sender, [rcpt], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    conn.quit()
    [m] = sink.wait_for(1, timeout=15)
    assert (m.mail_from, m.rcpts, m.data) == (sender.encode(), [rcpt.encode()], body)
    assert b"SMTPUTF8" in m.mail_params and b"BODY=8BITMIME" in m.mail_params
    assert (m.auth_user, m.tls) == (account[1], True)
    assert sink.violations == []


def test_upstream_without_pipelining_gets_one_command_at_a_time(gateway, new_email, smtp_upstream):
    """Upstream (over STARTTLS) without PIPELINING: a client pipelining MAIL, RCPT, RCPT, DATA and
    then body + QUIT gets every reply in order, and the upstream never sees a command before its
    previous reply went out (the gateway serialises; the sink's detector is live, see above)."""
    sink = smtp_upstream(tls="starttls", extensions=without("PIPELINING"))
    account = oauth_account(gateway, new_email, sink, secure=False)
    conn = logged_in(gateway, account)
    sock, f = conn.sock, conn.sock.makefile("rb")
    sock.sendall(f"MAIL FROM:<{account[1]}>\r\nRCPT TO:<p1@example.com>\r\n"
                 "RCPT TO:<reject-p2@example.com>\r\nDATA\r\n".encode())
    replies = [f.readline() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"354"], replies
    sock.sendall(message("serial") + b".\r\nQUIT\r\n")
    assert f.readline().startswith(b"250 2.0.0 Ok: queued as ")
    assert f.readline().startswith(b"221 ")
    conn.close()
    [m] = sink.wait_for(1, timeout=15)
    assert m.rcpts == [b"p1@example.com"] and m.data == message("serial") and m.tls
    cmds = sink.commands_of(m.session)
    start = cmds.index(f"MAIL FROM:<{account[1]}>".encode())
    assert cmds[start:start + 4] == [f"MAIL FROM:<{account[1]}>".encode(), b"RCPT TO:<p1@example.com>",
                                     b"RCPT TO:<reject-p2@example.com>", b"DATA"]
    sink.wait_closed(m.session, timeout=10)
    assert sink.violations == []


def test_upstream_without_8bitmime(gateway, new_email, smtp_upstream):
    """Upstream without 8BITMIME: BODY=8BITMIME is refused by the gateway with 555 5.5.4 (never
    sent upstream), BODY=7BIT is dropped, and 7-bit mail still goes through."""
    sink = smtp_upstream(extensions=without("8BITMIME"))
    account = oauth_account(gateway, new_email, sink)
    conn = logged_in(gateway, account)
    assert conn.mail(account[1], ["BODY=8BITMIME"]) == (
        555, b"5.5.4 BODY=8BITMIME not supported by the upstream server")
    assert conn.sendmail(account[1], ["seven@example.com"], message("seven"),
                         mail_options=["BODY=7BIT"]) == {}
    conn.quit()
    [m] = sink.wait_for(1, timeout=15)
    assert m.data == message("seven")
    assert not [p for p in m.mail_params if p.upper().startswith(b"BODY=")]
    assert not [c for c in sink.commands_of(m.session) if b"BODY=" in c.upper()]
    assert sink.violations == []


def test_upstream_without_size(gateway, new_email, smtp_upstream):
    """Upstream without SIZE: the client's SIZE= (smtplib adds it, the gateway advertises SIZE)
    is stripped from MAIL and the mail arrives."""
    sink = smtp_upstream(extensions=without("SIZE"))
    account = oauth_account(gateway, new_email, sink)
    conn = logged_in(gateway, account)
    assert conn.has_extn("size")
    assert conn.sendmail(account[1], ["sized@example.com"], message("sized"),
                         mail_options=["BODY=8BITMIME"]) == {}
    conn.quit()
    [m] = sink.wait_for(1, timeout=15)
    assert m.data == message("sized") and m.mail_params == [b"BODY=8BITMIME"]
    mails = [c for c in sink.commands_of(m.session) if c[:4].upper() == b"MAIL"]
    assert mails == [f"mail FROM:<{account[1]}> BODY=8BITMIME".encode()]
    assert sink.violations == []


def test_upstream_without_enhancedstatuscodes(gateway, new_email, smtp_upstream):
    """Upstream without ENHANCEDSTATUSCODES: its replies reach the client unchanged."""
    sink = smtp_upstream(extensions=without("ENHANCEDSTATUSCODES"))
    account = oauth_account(gateway, new_email, sink)
    conn = logged_in(gateway, account)
    assert conn.mail(account[1]) == (250, b"Ok")
    assert conn.rcpt("reject-me@example.com") == (
        550, b"<reject-me@example.com>: Recipient address rejected: User unknown")
    assert conn.rcpt("tempfail-me@example.com") == (
        450, b"<tempfail-me@example.com>: Recipient address rejected: Mailbox temporarily unavailable")
    assert conn.rcpt("ok@example.com") == (250, b"Ok")
    code, text = conn.data(message("plain-codes"))
    assert code == 250 and re.fullmatch(rb"Ok: queued as SINK\d{6}", text), text
    assert conn.noop() == (250, b"Ok")
    assert conn.verify("x@example.com") == (252, b"Cannot VRFY user, but will accept message")
    conn.quit()
    assert sink.wait_for(1)[0].rcpts == [b"ok@example.com"]


def test_xoauth2_refused_by_upstream_reports_decoded_error(gateway, new_email, smtp_upstream):
    """The upstream refuses XOAUTH2 (oauth2.auth.user is not the token's email): it answers
    334 <base64 JSON>, the gateway sends the empty line, and the client gets 454 4.7.0 with the
    upstream's 535 text and the decoded status=401."""
    sink = smtp_upstream()
    account = oauth_account(gateway, new_email, sink, user="someone-else@example.com")
    conn = client(gateway)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        login_once(conn, account)
    conn.close()
    assert err.value.smtp_code == 454
    text = err.value.smtp_error
    assert text.startswith(b"4.7.0 upstream login failed: 535 5.7.8 Username and Password not accepted")
    assert b"status=401" in text and b"schemes=bearer" in text, text
    # refused twice: the cached token, then (README) once more after a forced refresh
    assert [(a.mechanism, a.user, a.ok, a.initial_response) for a in sink.auth] == [
        ("XOAUTH2", "someone-else@example.com", False, False)] * 2
    assert sink.violations == []  # the error challenge was answered with an empty line
    assert not [c for _, c in sink.commands if c[:4].upper() == b"MAIL"]


def test_microsoft_sized_token_uses_two_step_xoauth2(gateway, new_email, smtp_upstream,
                                                     oauth2_provider, monkeypatch):
    """A Microsoft-sized access token (~2.5 KB) on an upstream with RFC 5321's 512-byte command
    line: the gateway sends `AUTH XOAUTH2` alone, then the long token line (RFC 4954 allows 12288),
    and the mail goes through."""
    mint = oauth2_provider._mint_access
    minted: list[str] = []

    def long_token(refresh_token: str) -> str:  # same grant, a JWT-sized token
        short = mint(refresh_token)
        with oauth2_provider._lock:
            token = "EwB" + secrets.token_urlsafe(1900)
            oauth2_provider._access[token] = oauth2_provider._access.pop(short)
        minted.append(token)
        return token

    monkeypatch.setattr(oauth2_provider, "_mint_access", long_token)
    sink = smtp_upstream(max_line=510)  # + CRLF = 512
    account = oauth_account(gateway, new_email, sink)
    conn = logged_in(gateway, account)
    conn.sendmail(account[1], ["ms@example.com"], message("ms"))
    conn.quit()
    [m] = sink.wait_for(1, timeout=15)
    cmds = sink.commands_of(m.session)
    i = cmds.index(b"AUTH XOAUTH2")
    decoded = base64.b64decode(cmds[i + 1])
    assert decoded.startswith(f"user={account[1]}\x01auth=Bearer EwB".encode())
    assert len(decoded) > 2500 and decoded.endswith(b"\x01\x01")
    [attempt] = sink.auth
    assert (attempt.ok, attempt.initial_response) == (True, False) and attempt.response_length > 3000
    assert m.auth_user == account[1] and sink.violations == []
    assert minted and not [t for t in minted if t[:40] in gateway.log_text()]  # never logged


def password_account(gateway: Gateway, new_email: Any, sink: SMTPSink, smtp_pass: str) -> tuple[str, str, str]:
    """A password account (no oauth2) submitting to ``sink`` over STARTTLS as ``sink-user``."""
    email = new_email("pw")
    account_id = email.split("@")[0]
    status, body = gateway.api("POST", "/v1/account", {
        "account": account_id, "name": account_id, "email": email,
        "imap": {"host": "localhost", "port": gateway.dovecot.imaps_port, "secure": True,
                 "auth": {"user": email, "pass": "not used by SMTP"}},
        "smtp": {"host": "localhost", "port": sink.port, "secure": False,
                 "auth": {"user": "sink-user", "pass": smtp_pass}}})
    assert status == 200, body
    return account_id, email, gateway.token(account_id, scopes=["smtp"])


@pytest.mark.parametrize("mechanisms", [["PLAIN", "LOGIN"], ["LOGIN"]], ids=["plain", "login"])
def test_password_account_logs_in_with_plain_or_login(gateway, new_email, smtp_upstream, mechanisms):
    """A password account: the gateway logs in to a STARTTLS upstream with AUTH PLAIN when it is
    offered, else AUTH LOGIN, with the stored user and (non-ASCII) password; mail arrives."""
    sink = smtp_upstream(tls="starttls", xoauth2=False, passwords={"sink-user": PASSWORD},
                         auth_mechanisms=mechanisms)
    account = password_account(gateway, new_email, sink, PASSWORD)
    conn = logged_in(gateway, account)
    conn.sendmail(account[1], ["pw@example.com"], message("pw"))
    conn.quit()
    [m] = sink.wait_for(1, timeout=15)
    assert (m.auth_user, m.tls, m.data) == ("sink-user", True, message("pw"))
    assert [(a.mechanism, a.ok) for a in sink.auth] == [(mechanisms[0], True)]
    assert sink.violations == []


def test_password_refused_by_upstream_gives_454(gateway, new_email, smtp_upstream):
    """A stored password the upstream refuses: 454 4.7.0 upstream login failed: 535 ..."""
    sink = smtp_upstream(tls="starttls", xoauth2=False, passwords={"sink-user": PASSWORD})
    account = password_account(gateway, new_email, sink, "wrong password")
    conn = client(gateway)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        login_once(conn, account)
    conn.close()
    assert (err.value.smtp_code, err.value.smtp_error) == (
        454, b"4.7.0 upstream login failed: 535 5.7.8 Authentication credentials invalid")
    assert [(a.mechanism, a.ok) for a in sink.auth] == [("PLAIN", False)]  # no retry for passwords
