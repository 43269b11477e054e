"""End-to-end SMTP through the gateway to Dovecot submission (XOAUTH2) and on to a sink."""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from .dovecot import free_port
from .gateway_proc import Gateway, wait_for


def message(tag: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: " + tag.encode()
            + b"\r\nMessage-ID: <" + tag.encode() + b"@example.com>\r\n\r\n" + body)


@pytest.fixture
def account(gateway: Gateway, new_email, smtp_sink) -> tuple[str, str, str]:
    """A fresh OAuth2 account (ID, email, smtp token)."""
    email = new_email("smtp")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email)
    return account_id, email, gateway.token(account_id, scopes=["smtp"])


def smtp(gateway: Gateway, source: str | None = None) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30,
                        source_address=(source, 0) if source else None)
    conn.ehlo("client.example")
    conn.starttls(context=gateway.client_context())
    conn.ehlo("client.example")
    return conn


def arrived(sink, mail_from: str, timeout: float = 15.0):
    """The sink's messages from ``mail_from`` (waits until at least one arrived)."""
    def mine():
        return [m for m in list(sink.messages) if m.mail_from == mail_from.encode()]
    wait_for(lambda: bool(mine()), timeout)
    return mine()


def test_ehlo_offers_auth_only_after_starttls(gateway):
    """Before STARTTLS: STARTTLS and no AUTH; after: AUTH PLAIN LOGIN and the relayable extensions."""
    conn = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30)
    conn.ehlo("client.example")
    assert conn.has_extn("starttls") and not conn.has_extn("auth")
    conn.starttls(context=gateway.client_context())
    conn.ehlo("client.example")
    assert conn.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    for ext in ("pipelining", "8bitmime", "size", "enhancedstatuscodes", "smtputf8"):
        assert conn.has_extn(ext), ext
    assert not conn.has_extn("starttls")
    code, _ = conn.docmd("AUTH", "XOAUTH2")
    assert code == 504
    conn.quit()


def test_smtplib_starttls_plain_delivers_byte_exact(gateway, account, smtp_sink):
    """AUTH PLAIN over STARTTLS; the sink gets the exact bytes, the sender and every recipient."""
    account_id, email, token = account
    body = message("plain", b"Line one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n")
    conn = smtp(gateway)
    conn.login(account_id, token)  # smtplib picks PLAIN from "AUTH PLAIN LOGIN"
    refused = conn.sendmail(email, ["a@example.com", "b@example.com", "c@example.com"], body)
    assert refused == {}
    conn.quit()
    got = arrived(smtp_sink, email)[0]
    assert got.rcpts == [b"a@example.com", b"b@example.com", b"c@example.com"]
    assert got.original == body


def test_smtplib_implicit_tls_login_mechanism(gateway, account, smtp_sink):
    """AUTH LOGIN over the implicit-TLS listener works the same."""
    account_id, email, token = account
    conn = smtplib.SMTP_SSL("127.0.0.1", gateway.smtps_port, timeout=30, context=gateway.client_context())
    conn.ehlo("client.example")
    conn.user, conn.password = account_id, token
    code, _ = conn.auth("LOGIN", conn.auth_login, initial_response_ok=False)
    assert code == 235
    conn.sendmail(email, ["x@example.com"], message("implicit"))
    conn.quit()
    assert arrived(smtp_sink, email)[0].original == message("implicit")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_sends_through_the_gateway(gateway, account, smtp_sink):
    """swaks (STARTTLS, AUTH PLAIN) sends a message that arrives at the sink."""
    account_id, email, token = account
    out = subprocess.run(
        ["swaks", "--server", "localhost", "--port", str(gateway.smtp_port), "--tls",
         "--tls-verify", "--tls-ca-path", str(gateway.ca_file),
         "--auth", "PLAIN", "--auth-user", account_id, "--auth-password", token,
         "--from", email, "--to", "swaks@example.com", "--header", "Subject: swaks test",
         "--body", "sent by swaks"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    got = arrived(smtp_sink, email)[0]
    assert got.rcpts == [b"swaks@example.com"] and b"sent by swaks" in got.data


def test_rejected_recipient_gets_the_upstreams_code(gateway, account, smtp_sink):
    """A recipient the final server refuses is reported with its 550; the others still get it."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    refused = conn.sendmail(email, ["ok@example.com", "reject-me@example.com"], message("partial"))
    assert refused["reject-me@example.com"][0] == 550
    conn.quit()
    assert arrived(smtp_sink, email)[0].rcpts == [b"ok@example.com"]


@pytest.mark.parametrize("case", ["wrong-token", "revoked", "imap-scope", "cidr"])
def test_bad_tokens_are_refused(gateway, account, case):
    """Wrong, revoked or wrongly scoped tokens get 535 5.7.8; an address outside the CIDRs 535 5.7.1."""
    account_id, _, token = account
    expected = b"5.7.8"
    if case == "wrong-token":
        token = "f" * 64
    elif case == "revoked":
        assert gateway.api("DELETE", f"/v1/token/{token}")[0] == 200
    elif case == "imap-scope":
        token = gateway.token(account_id, scopes=["imap-proxy"])
    else:
        token = gateway.token(account_id, scopes=["smtp"], cidrs=["127.0.0.2/32"])
        expected = b"5.7.1"
    conn = smtp(gateway, source="127.0.0.3")
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        conn.login(account_id, token)
    assert err.value.smtp_code == 535 and err.value.smtp_error.startswith(expected)
    conn.close()


def test_upstream_down_gives_454(gateway, new_email):
    """An account whose submission server refuses connections: 454 4.7.0 with the reason."""
    email = new_email("smtpdown")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email, smtp={"host": "127.0.0.1", "port": free_port(), "secure": True})
    conn = smtp(gateway)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        conn.login(account_id, gateway.token(account_id, scopes=["smtp"]))
    assert err.value.smtp_code == 454 and err.value.smtp_error.startswith(b"4.7.0 cannot connect to")
    conn.close()


def test_hundred_messages_in_one_session(gateway, account, smtp_sink):
    """100 messages of 50 KB in one session all arrive, in order, byte-exact."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    bodies = [message(f"bulk-{i}", (b"x" * 998 + b"\r\n") * 50) for i in range(100)]
    for body in bodies:
        conn.sendmail(email, ["bulk@example.com"], body)
    conn.quit()
    assert wait_for(lambda: len(arrived(smtp_sink, email, 0)) == 100, 30)
    got = arrived(smtp_sink, email)
    assert [m.original for m in got] == bodies


def test_25mb_message_byte_exact(gateway, account, smtp_sink):
    """A 25 MB message arrives byte for byte."""
    account_id, email, token = account
    line = b"0123456789" * 7 + b".\r\n"
    body = message("big", line * (25 * 1024 * 1024 // len(line)))
    conn = smtp(gateway)
    conn.login(account_id, token)
    conn.sendmail(email, ["big@example.com"], body)
    conn.quit()
    assert arrived(smtp_sink, email, 60)[0].original == body


def test_pipelined_transaction_replies_in_order(gateway, account, smtp_sink):
    """MAIL, two RCPTs and DATA in one write (PIPELINING): four replies in order, then the body."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    sock = conn.sock
    sock.sendall(f"MAIL FROM:<{email}>\r\nRCPT TO:<p1@example.com>\r\nRCPT TO:<reject-x@example.com>\r\n"
                 "DATA\r\n".encode())
    replies = b""
    while replies.count(b"\r\n") < 4:
        replies += sock.recv(4096)
    codes = [line[:3] for line in replies.split(b"\r\n")[:4]]
    assert codes == [b"250", b"250", b"550", b"354"], replies
    sock.sendall(message("pipelined") + b".\r\nQUIT\r\n")
    tail = b""
    while b"221" not in tail:
        chunk = sock.recv(4096)
        if not chunk:
            break
        tail += chunk
    assert tail.startswith(b"250")
    assert arrived(smtp_sink, email)[0].rcpts == [b"p1@example.com"]


def test_8bitmime_passes(gateway, account, smtp_sink):
    """BODY=8BITMIME with 8-bit bytes arrives intact (Dovecot and the sink both have 8BITMIME)."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    body = message("eight", "Grüße aus Köln\r\n".encode())
    conn.sendmail(email, ["utf@example.com"], body, mail_options=["BODY=8BITMIME"])
    conn.quit()
    got = arrived(smtp_sink, email)[0]
    assert got.original == body and b"BODY=8BITMIME" in got.mail_params


def test_smtputf8_degrades_when_the_upstream_lacks_it(gateway, account, smtp_sink):
    """Dovecot 2.3 submission has no SMTPUTF8, which the gateway advertised: an ASCII envelope with
    SMTPUTF8 is relayed without the parameter and delivered; a non-ASCII mailbox gets 553 5.6.7."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    assert conn.mail(email, ["SMTPUTF8"])[0] == 250
    assert conn.rcpt("rcpt@example.com")[0] == 250
    assert conn.data(message("utf8-degraded"))[0] == 250
    assert arrived(smtp_sink, email) is not None
    conn.rset()
    assert conn.mail(email)[0] == 250
    conn.sock.sendall(b"RCPT TO:<j\xc3\xb6rg@example.com>\r\n")  # smtplib would not send it
    code, text = conn.getreply()
    assert (code, text) == (553, b"5.6.7 Non-ASCII mailbox not supported by the upstream server")
    conn.quit()


def test_disconnect_mid_data_leaves_nothing(gateway, account, smtp_sink):
    """A client that vanishes in the middle of DATA: no half message reaches the sink."""
    account_id, email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    conn.mail(email)
    conn.rcpt("half@example.com")
    conn.putcmd("DATA")
    assert conn.getreply()[0] == 354
    conn.sock.sendall(message("half", b"part of a body\r\n" * 1000))
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.sock.close()
    time.sleep(1.5)
    assert not [m for m in smtp_sink.messages if m.mail_from == email.encode()]


def test_quit_after_login_closes_the_connection(gateway, account):
    """RFC 5321: after the 221 the server closes; the client sees the end of the connection at once
    (well before the gateway's 2 s close grace)."""
    account_id, _email, token = account
    conn = smtp(gateway)
    conn.login(account_id, token)
    sock = conn.sock
    sock.sendall(b"QUIT\r\n")
    sock.settimeout(5)
    started = time.monotonic()
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"221")
    assert time.monotonic() - started < 1.5
    sock.close()
