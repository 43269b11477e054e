"""After login: the relay (IDLE, big literals, flow control, pipelining), STARTTLS rules, offlineimap."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .gateway_proc import Gateway
from .test_imap_login import message, read_until


@pytest.fixture
def account(gateway: Gateway, new_email) -> tuple[str, str, str]:
    """A fresh OAuth2 account: (ID, email, gateway token)."""
    email = new_email("relay")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email)
    return account_id, email, gateway.token(account_id)


def logged_in(gateway: Gateway, account_id: str, token: str) -> socket.socket:
    sock = gateway.raw()
    sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
    assert b"a1 OK" in read_until(sock, b"a1 ")
    return sock


def big_message(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?\r\n"
    body = line * (size // len(line) + 1)
    return message("big", body[:size])


def test_idle_is_relayed(gateway, account):
    """IDLE through the gateway: a message appended upstream shows up as EXISTS, DONE ends it."""
    account_id, email, token = account
    sock = logged_in(gateway, account_id, token)
    sock.sendall(b"s1 SELECT INBOX\r\n")
    read_until(sock, b"s1 ")
    sock.sendall(b"i1 IDLE\r\n")
    assert read_until(sock, b"+").startswith(b"+")
    gateway.dovecot.append(email, "INBOX", message("during-idle"))
    assert b"* 1 EXISTS" in read_until(sock, b"* 1 EXISTS")
    sock.sendall(b"DONE\r\n")
    assert b"i1 OK" in read_until(sock, b"i1 ")
    sock.close()


def test_10mb_message_fetched_byte_exact(gateway, account):
    """A 10 MB message comes through the gateway byte for byte as Dovecot stores it."""
    account_id, email, token = account
    gateway.dovecot.append(email, "INBOX", big_message(10 * 1024 * 1024))
    conn = gateway.imap()
    conn.login(account_id, token)
    conn.select("INBOX", readonly=True)
    typ, data = conn.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == gateway.dovecot.fetch_all(email)[0]
    conn.logout()


def test_client_that_stops_reading_keeps_gateway_memory_bounded(gateway, account):
    """A client that asks for 30 MB and stops reading: the gateway holds far less than 30 MB."""
    account_id, email, token = account
    size = 30 * 1024 * 1024
    gateway.dovecot.append(email, "INBOX", big_message(size))
    sock = logged_in(gateway, account_id, token)
    sock.sendall(b"s1 SELECT INBOX\r\n")
    read_until(sock, b"s1 ")
    before = gateway.rss_kb()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(b"f1 FETCH 1 (BODY.PEEK[])\r\n")
    time.sleep(3)  # the upstream sends as fast as it can; the client reads nothing
    grown = gateway.rss_kb() - before
    assert grown < 8 * 1024, f"gateway grew by {grown} KB while the client did not read"
    received = len(read_until(sock, b"f1 ", limit=size + 1024 * 1024))
    assert received > size
    sock.close()


def test_commands_pipelined_behind_login_are_relayed_in_order(gateway, account):
    """LOGIN, SELECT and LOGOUT sent in one write: each gets its answer, in order."""
    account_id, _, token = account
    sock = gateway.raw()
    sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n"
                 b"a2 SELECT INBOX\r\na3 LOGOUT\r\n")
    data = read_until(sock, b"a3 ")
    tagged = [line.split(b" ", 2)[:2] for line in data.split(b"\r\n") if line[:1] == b"a"]
    assert tagged == [[b"a1", b"OK"], [b"a2", b"OK"], [b"a3", b"OK"]], data
    sock.close()


def test_starttls_listener_rules(gateway, account):
    """Plain listener: LOGINDISABLED and refusal before STARTTLS, login after it works."""
    account_id, _, token = account
    conn = gateway.imap_plain()
    assert "STARTTLS" in conn.capabilities and "LOGINDISABLED" in conn.capabilities
    typ, data = conn._simple_command("LOGIN", account_id, token)
    assert typ == "NO" and b"[PRIVACYREQUIRED]" in data[0]
    conn.starttls(ssl_context=gateway.client_context())
    assert "LOGINDISABLED" not in conn.capabilities and "STARTTLS" not in conn.capabilities
    assert conn.login(account_id, token)[0] == "OK"
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()


def test_plaintext_pipelined_behind_starttls_is_discarded(gateway, account):
    """Bytes a client (or an attacker) pipelines after STARTTLS in plaintext are never executed."""
    account_id, _, token = account
    sock = socket.create_connection(("127.0.0.1", gateway.imap_port), timeout=15)
    sock.recv(4096)
    sock.sendall(b"t1 STARTTLS\r\nt2 CAPABILITY\r\n")
    assert b"t1 OK" in read_until(sock, b"t1 ")
    tls = gateway.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"t3 NOOP\r\n")
    data = read_until(tls, b"t3 ")
    assert b"t2" not in data and b"t3 OK" in data
    tls.sendall(b"t4 STARTTLS\r\n")
    assert b"t4 BAD" in read_until(tls, b"t4 ")
    tls.close()


def test_starttls_after_login_is_not_the_gateways(gateway, account):
    """After login STARTTLS goes to the upstream, which refuses it in the authenticated state."""
    account_id, _, token = account
    sock = logged_in(gateway, account_id, token)
    sock.sendall(b"t1 STARTTLS\r\n")
    answer = read_until(sock, b"t1 ")
    assert b"t1 BAD" in answer or b"t1 NO" in answer, answer
    sock.sendall(b"t2 NOOP\r\n")
    assert b"t2 OK" in read_until(sock, b"t2 ")
    sock.close()


@pytest.mark.skipif(shutil.which("offlineimap") is None, reason="offlineimap not installed")
def test_offlineimap_syncs_folder_byte_exact(gateway, account):
    """offlineimap syncs a folder through the gateway to a local Maildir; bytes equal upstream's.

    offlineimap stores Maildir files with LF line ends (it converts CRLF on the
    way in), so the comparison applies that one conversion to Dovecot's bytes.
    """
    account_id, email, token = account
    msgs = [message(f"sync-{i}", b"Body %d\r\n" % i) for i in range(5)]
    for m in msgs:
        gateway.dovecot.append(email, "Reports", m)
    home = Path(tempfile.mkdtemp(prefix="gw-offlineimap-"))
    try:
        rc = home / "offlineimaprc"
        rc.write_text(f"""[general]
accounts = gw
metadata = {home}/meta

[Account gw]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {home}/mail

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {gateway.imaps_port}
ssl = yes
sslcacertfile = {gateway.ca_file}
remoteuser = {account_id}
remotepass = {token}
folderfilter = lambda f: f == 'Reports'
readonly = True
""")
        out = subprocess.run(["offlineimap", "-c", str(rc), "-o", "-u", "basic"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
        assert out.returncode == 0, out.stdout + out.stderr
        files = sorted((home / "mail" / "Reports" / "cur").iterdir()) + \
            sorted((home / "mail" / "Reports" / "new").iterdir())
        local = sorted(f.read_bytes() for f in files)
        upstream = sorted(m.replace(b"\r\n", b"\n") for m in gateway.dovecot.fetch_all(email, "Reports"))
        assert local == upstream and len(local) == 5
    finally:
        shutil.rmtree(home, ignore_errors=True)
