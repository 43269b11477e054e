"""Random bytes over the wire, before and after login, IMAP and SMTP: the gateway answers or closes,
and its log holds no traceback (checked by the autouse fixture of conftest.py). Bounded: a fixed
seed, a fixed number of connections and chunks, socket timeouts."""

from __future__ import annotations

import random
import socket
import ssl

import pytest

from .gateway_proc import Gateway
from .test_imap_login import read_until

TOKENS = [b"a", b"b1", b"*", b"+", b"LOGIN", b"AUTHENTICATE", b"PLAIN", b"SELECT", b"INBOX", b"IDLE",
          b"DONE", b"COMPRESS", b"DEFLATE", b"ENABLE", b"LOGOUT", b"STARTTLS", b"{5}", b"{3+}", b"{99999}",
          b"{0}", b"~{4}", b'"', b"\\", b"(", b")", b"[", b"]", b"\r\n", b"\n", b"\r", b" ", b"\x00",
          b"EHLO", b"HELO", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA", b".", b"\r\n.\r\n", b"RSET",
          b"QUIT", b"BDAT", b"SMTPUTF8", b"BODY=8BITMIME", b"SIZE=99999999999", b"\xc3\xa9", b"\xff\xfe"]


def garbage(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.2:
            parts.append(rng.randbytes(rng.randint(1, 30)))
        else:
            parts.append(rng.choice(TOKENS))
        if rng.random() < 0.3:
            parts.append(b" ")
    return b"".join(parts)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except (socket.timeout, OSError, ssl.SSLError):
        pass


def _blast(sock: socket.socket, rng: random.Random) -> None:
    sock.settimeout(0.05)
    try:
        for _ in range(rng.randint(1, 8)):
            sock.sendall(garbage(rng))
            drain(sock)
    except (OSError, ssl.SSLError):
        pass  # the gateway may close: that is an answer too
    finally:
        sock.close()


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_before_login(gateway: Gateway, seed: int):
    """IMAP (implicit TLS and plaintext) and SMTP (plaintext) before login."""
    rng = random.Random(seed)
    for _ in range(15):
        kind = rng.choice(["imaps", "imap", "smtp"])
        if kind == "imaps":
            sock = gateway.raw()
        else:
            port = gateway.imap_port if kind == "imap" else gateway.smtp_port
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.recv(4096)
        _blast(sock, rng)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_after_login(gateway: Gateway, new_email, seed: int):
    """After an IMAP login (bytes relayed to Dovecot, followed by the tracker) and an SMTP login
    (bytes through the relay filter)."""
    import smtplib

    rng = random.Random(100 + seed)
    email = new_email("fuzz")
    account = email.split("@")[0]
    gateway.add_oauth_account(account, email)
    imap_token = gateway.token(account)
    smtp_token = gateway.token(account, scopes=["smtp"])
    for _ in range(6):
        sock = gateway.raw()
        sock.sendall(b"a1 LOGIN " + account.encode() + b" " + imap_token.encode() + b"\r\n")
        assert b"a1 OK" in read_until(sock, b"a1 ")
        _blast(sock, rng)
        conn = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=10)
        conn.starttls(context=gateway.client_context())
        conn.login(account, smtp_token)
        _blast(conn.sock, rng)
    # The gateway still serves a normal login afterwards.
    sock = gateway.raw()
    sock.sendall(b"a1 LOGIN " + account.encode() + b" " + imap_token.encode() + b"\r\n")
    assert b"a1 OK" in read_until(sock, b"a1 ")
    sock.close()
