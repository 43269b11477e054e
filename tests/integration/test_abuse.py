"""Abuse and faults against a gateway with short timeouts: connections that never finish TLS,
clients that send but never read."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from .gateway_proc import Gateway, started_gateway


@pytest.fixture(scope="module")
def strict(dovecot, oauth2_provider):
    """A gateway whose clients have 1 s to log in."""
    with started_gateway(dovecot, oauth2_provider, "gw-strict-",
                         imap={"preauth_timeout": 1}, smtp={"preauth_timeout": 1}) as gw:
        yield gw


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), reading whatever comes; None if still open."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - start
    return None


def test_a_bare_connect_to_the_tls_port_is_cut(strict):
    """A TCP connect that never starts TLS (on IMAP implicit TLS and SMTP implicit TLS) is closed."""
    for port in (strict.imaps_port, strict.smtps_port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            assert closed_within(sock, 10) is not None
        finally:
            sock.close()


def test_a_client_hello_that_never_ends_is_cut(strict):
    """A ClientHello dribbled one byte at a time never completes: the connection still ends."""
    sock = socket.create_connection(("127.0.0.1", strict.imaps_port), timeout=5)
    try:
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        start = time.monotonic()
        closed = False
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_within(sock, 0.5) is not None:
                closed = True
                break
        assert closed or closed_within(sock, 10) is not None
        assert time.monotonic() - start < 15
    finally:
        sock.close()


def test_silent_after_starttls_is_cut_imap_and_smtp(strict):
    """STARTTLS accepted, then no handshake: IMAP and SMTP both close the connection."""
    imap = socket.create_connection(("127.0.0.1", strict.imap_port), timeout=5)
    try:
        assert imap.recv(4096).startswith(b"* OK")
        imap.sendall(b"a STARTTLS\r\n")
        assert imap.recv(4096).startswith(b"a OK")
        assert closed_within(imap, 10) is not None
    finally:
        imap.close()
    smtp = socket.create_connection(("127.0.0.1", strict.smtp_port), timeout=5)
    try:
        assert smtp.recv(4096).startswith(b"220")
        smtp.sendall(b"EHLO x\r\n")
        time.sleep(0.2)
        smtp.recv(4096)
        smtp.sendall(b"STARTTLS\r\n")
        assert b"220" in smtp.recv(4096)
        assert closed_within(smtp, 10) is not None
    finally:
        smtp.close()


def _spam_without_reading(port: int, line: bytes, seconds: float, greet: bytes = b"") -> bool:
    """Send ``line`` over and over for ``seconds`` and never read; True when the gateway cut us."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(0.5)
    batch = line * 2000
    deadline = time.monotonic() + seconds
    try:
        if greet:
            sock.sendall(greet)
        while time.monotonic() < deadline:
            try:
                sock.sendall(batch)
            except socket.timeout:  # the gateway stopped reading us: fine, keep pushing
                continue
            except OSError:
                return True
        return False
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["imap", "smtp"])
def test_a_client_that_asks_without_reading_does_not_grow_the_gateway(gateway, kind):
    """`a CAPABILITY` (IMAP) or `EHLO x` (SMTP) sent for 6 s without reading, well inside the
    pre-auth timeout: the gateway stops reading that client, so its memory stays bounded."""
    before = gateway.rss_kb()
    if kind == "imap":
        _spam_without_reading(gateway.imap_port, b"a CAPABILITY\r\n", 6)
    else:
        _spam_without_reading(gateway.smtp_port, b"EHLO x\r\n", 6)
    grown_mb = (gateway.rss_kb() - before) / 1024
    assert grown_mb < 50, f"gateway grew by {grown_mb:.0f} MB"


def test_a_client_that_asks_without_reading_is_still_cut_by_the_preauth_timeout(strict):
    """The same client against a 1 s pre-auth timeout: cut, although it never reads the BYE."""
    assert _spam_without_reading(strict.imap_port, b"a CAPABILITY\r\n", 8)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def test_a_slow_oauth2_provider_delays_no_other_account(dovecot, oauth2_provider, new_email):
    """20 accounts whose token endpoint answers one byte a second: each gets NO [UNAVAILABLE]
    within the request deadline; meanwhile an account with a cached access token logs in at its
    normal speed, and the gateway starts no thread per refresh."""
    with started_gateway(dovecot, oauth2_provider, "gw-slowidp-", upstream={"connect_timeout": 3},
                         imap={"login_timeout": 10, "pool": {"idle_ttl": 0}}) as gw:
        _slow_provider_run(gw, oauth2_provider, new_email)


def _slow_provider_run(gw: Gateway, oauth2_provider, new_email) -> None:
    import imaplib
    import threading

    try:
        email = new_email("cached")
        cached = email.split("@")[0]
        gw.add_oauth_account(cached, email)
        cached_token = gw.token(cached)
        conn = gw.imap()
        conn.login(cached, cached_token)  # refreshes once: the access token is cached from now on
        conn.logout()
        slow = []
        for _ in range(20):
            slow_email = new_email("slowidp")
            account = slow_email.split("@")[0]
            oauth2_provider.dribble.add(gw.add_oauth_account(account, slow_email))
            slow.append((account, gw.token(account)))
        threads_before = _threads(gw.proc.pid)
        answers: dict[str, tuple[float, str]] = {}

        def slow_login(account: str, token: str) -> None:
            started = time.monotonic()
            c = gw.imap()
            try:
                c.login(account, token)
                answers[account] = (time.monotonic() - started, "OK")
            except imaplib.IMAP4.error as e:
                answers[account] = (time.monotonic() - started, str(e))
            finally:
                c.shutdown()

        workers = [threading.Thread(target=slow_login, args=pair) for pair in slow]
        for t in workers:
            t.start()
        time.sleep(1)  # all 20 refreshes are now being dribbled
        threads_during = _threads(gw.proc.pid)
        started = time.monotonic()
        conn = gw.imap()
        conn.login(cached, cached_token)
        conn.select("INBOX")
        conn.logout()
        cached_seconds = time.monotonic() - started
        for t in workers:
            t.join(30)
        assert cached_seconds < 1.5, cached_seconds
        assert threads_during <= threads_before + 1, (threads_before, threads_during)
        assert len(answers) == 20
        for seconds, answer in answers.values():
            assert "[UNAVAILABLE] OAuth2 token refresh failed: no complete answer from 127.0.0.1:" in answer
            assert " within 3 s" in answer
            assert seconds < 6
    finally:
        oauth2_provider.dribble.clear()


def test_a_provider_error_page_reaches_the_client_as_text(gateway, oauth2_provider, new_email):
    """A refresh answered with HTTP 503 and an HTML page: the login's NO says so, with the page's text."""
    import imaplib

    email = new_email("idp503")
    account = email.split("@")[0]
    refresh = gateway.add_oauth_account(account, email)
    oauth2_provider.fail_with[refresh] = (503, "text/html", b"<html><body>Service\r\nUnavailable</body></html>")
    try:
        conn = gateway.imap()
        with pytest.raises(imaplib.IMAP4.error) as refused:
            conn.login(account, gateway.token(account))
        conn.shutdown()
        assert str(refused.value) == ("b'[UNAVAILABLE] OAuth2 token refresh failed: HTTP 503: "
                                      "<html><body>Service Unavailable</body></html>'")
    finally:
        oauth2_provider.fail_with.pop(refresh, None)


def test_a_failed_tls_handshake_is_one_log_line_with_the_reason(gateway):
    """A client that does not trust the gateway's CA aborts the handshake: the log says who and why."""
    sock = socket.create_connection(("127.0.0.1", gateway.imaps_port), timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")  # system CAs only
    sock.close()
    plain = socket.create_connection(("127.0.0.1", gateway.imaps_port), timeout=10)
    plain.sendall(b"a1 CAPABILITY\r\n")  # plaintext to a TLS port
    plain.settimeout(5)
    try:
        plain.recv(4096)
    except OSError:
        pass
    plain.close()
    from .gateway_proc import wait_for

    assert wait_for(lambda: "IMAP TLS handshake from 127.0.0.1 failed: tlsv1 alert unknown ca" in gateway.log_text())
    assert wait_for(lambda: "IMAP TLS handshake from 127.0.0.1 failed: " in
                    gateway.log_text().split("alert unknown ca", 1)[-1])
