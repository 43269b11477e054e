"""PROXY-protocol listeners (`haproxy:ssl:`, `haproxy:tcp:`) behind a real HAProxy.

One gateway whose four client listeners all expect a PROXY header, and one
HAProxy with a `send-proxy` (v1) and a `send-proxy-v2` frontend for each.
Clients bind their socket to 127.0.0.2 or 127.0.0.3 and connect to HAProxy,
which reaches the gateway from 127.0.0.1: only the PROXY header carries the
client's address, so a token restricted to 127.0.0.2/32 passing from
127.0.0.2 and failing from 127.0.0.3 proves the gateway uses it.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import tempfile
from pathlib import Path

import pytest

from .dovecot import free_port
from .gateway_proc import Gateway, wait_for
from .haproxy import HAProxy
from .test_imap_login import DENIED, read_until

ALLOWED, OTHER = "127.0.0.2", "127.0.0.3"
VERSIONS = [pytest.param(1, id="v1"), pytest.param(2, id="v2")]
SMTP_DENIED = b"5.7.1 Access denied, traffic not accepted from this IP"


class Setup:
    """The gateway's PROXY-protocol ports and HAProxy's frontend ports in front of them."""

    def __init__(self, gw: Gateway, haproxy: HAProxy, frontends: dict[tuple[str, int], int]) -> None:
        self.gw, self.haproxy, self.frontends = gw, haproxy, frontends

    def port(self, listener: str, version: int) -> int:
        return self.frontends[(listener, version)]


@pytest.fixture(scope="module")
def behind(dovecot, oauth2_provider):
    """A gateway listening only with `haproxy:` endpoints, and HAProxy (v1 and v2) in front."""
    if shutil.which("haproxy") is None:
        pytest.fail("HAProxy is not installed: run scripts/test.sh, which installs it "
                    "(apt-get install -y haproxy).", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="gw-haproxy-"))
    ports = {name: free_port() for name in ("imaps", "imap", "smtp", "smtps")}
    gw = Gateway(workdir / "gateway", dovecot, oauth2_provider,
                 imap={"listen": [f"haproxy:ssl:{ports['imaps']}:interface=127.0.0.1"],
                       "starttls_listen": [f"haproxy:tcp:{ports['imap']}:interface=127.0.0.1"]},
                 smtp={"listen": [f"haproxy:tcp:{ports['smtp']}:interface=127.0.0.1"],
                       "implicit_tls_listen": [f"haproxy:ssl:{ports['smtps']}:interface=127.0.0.1"]},
                 trusted_proxies=["127.0.0.1/32"])  # HAProxy connects from 127.0.0.1 only
    gw.imaps_port, gw.imap_port, gw.smtp_port, gw.smtps_port = (
        ports["imaps"], ports["imap"], ports["smtp"], ports["smtps"])
    haproxy = HAProxy(workdir / "haproxy")
    frontends = {(name, version): haproxy.forward(port, version)
                 for name, port in ports.items() for version in (1, 2)}
    try:
        gw.start()
        haproxy.start()
        yield Setup(gw, haproxy, frontends)
    finally:
        haproxy.stop()
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def account(behind, new_email) -> str:
    """A fresh OAuth2 account on the gateway behind HAProxy."""
    email = new_email("haproxy")
    account_id = email.split("@")[0]
    behind.gw.add_oauth_account(account_id, email)
    return account_id


def connect(port: int, source: str) -> socket.socket:
    """A TCP connection to HAProxy on ``port`` from the loopback address ``source``."""
    return socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))


def imap_open(setup: Setup, listener: str, version: int, source: str) -> socket.socket:
    """An IMAP connection through HAProxy, TLS up (implicit or by STARTTLS), greeting read."""
    sock = connect(setup.port(listener, version), source)
    context = setup.gw.client_context()
    if listener == "imaps":
        sock = context.wrap_socket(sock, server_hostname="localhost")
        assert read_until(sock, b"* OK").startswith(b"* OK")
        return sock
    assert read_until(sock, b"* OK").startswith(b"* OK")
    sock.sendall(b"s1 STARTTLS\r\n")
    assert b"s1 OK" in read_until(sock, b"s1 ")
    return context.wrap_socket(sock, server_hostname="localhost")


def imap_login(setup: Setup, listener: str, version: int, source: str, account: str, token: str) -> bytes:
    """LOGIN through HAProxy from ``source``; returns the tagged answer line(s)."""
    sock = imap_open(setup, listener, version, source)
    try:
        sock.sendall(b'a1 LOGIN "' + account.encode() + b'" "' + token.encode() + b'"\r\n')
        return read_until(sock, b"a1 ")
    finally:
        sock.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("listener", ["imaps", "imap"])
def test_imap_cidr_is_checked_against_the_proxied_client(behind, account, listener, version):
    """IMAP behind HAProxy (implicit TLS on `haproxy:ssl:`, STARTTLS on `haproxy:tcp:`, PROXY v1
    and v2): a token for 127.0.0.2/32 logs in from 127.0.0.2 and gets the design's denial from
    127.0.0.3, although every connection reaches the gateway from HAProxy's 127.0.0.1; the login
    log lines name the real clients."""
    token = behind.gw.token(account, cidrs=[f"{ALLOWED}/32"])
    denied = imap_login(behind, listener, version, OTHER, account, token)
    assert denied.rstrip().endswith(b"a1 " + DENIED), denied
    assert b"a1 OK [CAPABILITY " in imap_login(behind, listener, version, ALLOWED, account, token)
    assert wait_for(lambda: f"IMAP login account={account} client={ALLOWED} " in behind.gw.log_text())
    lines = [line for line in behind.gw.log_text().splitlines() if f"account={account} " in line]
    assert any(f"client={OTHER} upstream=- result=fail reason=cidr" in line for line in lines), lines
    assert any(f"client={ALLOWED} " in line and "result=ok" in line for line in lines), lines
    assert not any("client=127.0.0.1 " in line for line in lines), lines


@pytest.mark.parametrize("version", VERSIONS)
def test_connections_list_the_real_client(behind, account, version):
    """While a session through HAProxy is open, GET /v1/connections shows 127.0.0.2, the client
    behind the PROXY header, not HAProxy's 127.0.0.1."""
    token = behind.gw.token(account, cidrs=[f"{ALLOWED}/32"])
    sock = imap_open(behind, "imaps", version, ALLOWED)
    try:
        sock.sendall(b'a1 LOGIN "' + account.encode() + b'" "' + token.encode() + b'"\r\n')
        assert b"a1 OK [CAPABILITY " in read_until(sock, b"a1 ")
        status, body = behind.gw.api("GET", "/v1/connections")
        assert status == 200
        mine = [c for c in body["connections"] if c["account"] == account]
        assert [c["client"] for c in mine] == [ALLOWED], body
    finally:
        sock.close()


def smtp_login(setup: Setup, listener: str, version: int, source: str, account: str,
               token: str) -> tuple[int, bytes]:
    """AUTH PLAIN through HAProxy from ``source`` (STARTTLS or implicit TLS); (code, text)."""
    port = setup.port(listener, version)
    context = setup.gw.client_context()
    conn: smtplib.SMTP
    if listener == "smtps":
        conn = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30,
                                source_address=(source, 0))
    else:
        conn = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
        conn.ehlo("client.example")
        conn.starttls(context=context)
    try:
        conn.ehlo("client.example")
        try:
            return conn.login(account, token)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error
    finally:
        conn.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("listener", ["smtp", "smtps"])
def test_smtp_cidr_is_checked_against_the_proxied_client(behind, account, smtp_sink, listener, version):
    """SMTP behind HAProxy (STARTTLS on `haproxy:tcp:`, implicit TLS on `haproxy:ssl:`, PROXY v1
    and v2): the 127.0.0.2/32 token gets 235 from 127.0.0.2 and `535 5.7.1` from 127.0.0.3."""
    token = behind.gw.token(account, scopes=["smtp"], cidrs=[f"{ALLOWED}/32"])
    assert smtp_login(behind, listener, version, OTHER, account, token) == (535, SMTP_DENIED)
    code, _text = smtp_login(behind, listener, version, ALLOWED, account, token)
    assert code == 235
    assert wait_for(lambda: f"SMTP login account={account} client={ALLOWED} " in behind.gw.log_text())
    assert f"SMTP login account={account} client={OTHER} upstream=- result=fail reason=cidr" \
        in behind.gw.log_text()


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("listener", ["imaps", "imap"])
def test_connection_without_proxy_header_is_closed(behind, listener):
    """A `haproxy:` listener reached directly, without a PROXY header, closes the connection at
    the client's first bytes: a TLS handshake fails, a plaintext command gets no answer (only the
    greeting, which the gateway sends on connect), so nobody can bypass HAProxy's address check."""
    port = behind.gw.imaps_port if listener == "imaps" else behind.gw.imap_port
    # From 127.0.0.1, which is in this gateway's trusted_proxies (as HAProxy is): allowed to
    # connect, but its first bytes are not a PROXY header.
    sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=("127.0.0.1", 0))
    try:
        if listener == "imaps":
            with pytest.raises((ssl.SSLError, ConnectionError)):
                behind.gw.client_context().wrap_socket(sock, server_hostname="localhost")
        else:
            try:
                sock.sendall(b"a1 CAPABILITY\r\n")
                received = read_to_end(sock)
            except ConnectionResetError:
                received = b""
            assert b"a1 " not in received and b"* CAPABILITY" not in received, received
    finally:
        sock.close()


def test_a_proxy_header_from_an_untrusted_address_is_refused(behind):
    """A client at 127.0.0.2 (not in trusted_proxies) connecting straight to a `haproxy:` listener
    and claiming another address in its own PROXY header is closed without an answer."""
    import socket

    gw = behind.gw
    for port in (gw.imap_port, gw.smtp_port):
        try:  # the gateway aborts at once: even the connect may meet the reset
            sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        except ConnectionResetError:
            continue
        try:
            sock.settimeout(5)
            try:  # the gateway closes at once: the send itself may meet the reset
                sock.sendall(b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 143\r\n")
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b""
        finally:
            sock.close()
    assert "connection from 127.0.0.2 closed: not in trusted_proxies" in gw.log_text()
