"""Abuse and faults against a gateway with short timeouts: connections that never finish TLS,
clients that send but never read."""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path

import pytest

from .gateway_proc import Gateway


@pytest.fixture(scope="module")
def strict(dovecot, oauth2_provider):
    """A gateway whose clients have 1 s to log in."""
    workdir = Path(tempfile.mkdtemp(prefix="gw-strict-"))
    gw = Gateway(workdir, dovecot, oauth2_provider,
                 imap={"preauth_timeout": 1}, smtp={"preauth_timeout": 1})
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


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
