"""SIGTERM: listeners close, every client is told (IMAP `* BYE Server shutting down`, SMTP
`421 4.3.2 Server shutting down`) and closed, and the process exits with status 0."""

from __future__ import annotations

import signal
import socket
import time

from .gateway_proc import read_to_close, started_gateway
from .test_imap_login import read_until


def test_sigterm_says_bye_to_idle_and_unauthenticated_clients_and_exits_0(dovecot, oauth2_provider, new_email):
    with started_gateway(dovecot, oauth2_provider, "gw-term-", shutdown_grace=5) as gw:
        email = new_email("term")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        idle = gw.raw()
        idle.sendall(b"a1 LOGIN " + account.encode() + b" " + gw.token(account).encode() + b"\r\n")
        assert b"a1 OK" in read_until(idle, b"a1 ")
        idle.sendall(b"s1 SELECT INBOX\r\n")
        read_until(idle, b"s1 ")
        idle.sendall(b"i1 IDLE\r\n")
        assert read_until(idle, b"+").startswith(b"+")
        waiting = gw.raw()  # connected, never logged in
        smtp = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
        assert smtp.recv(4096).startswith(b"220")
        started = time.monotonic()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        assert read_to_close(idle, 8).endswith(b"* BYE Server shutting down\r\n")
        assert read_to_close(waiting, 8) == b"* BYE Server shutting down\r\n"
        assert read_to_close(smtp, 8) == b"421 4.3.2 Server shutting down\r\n"
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - started < 8  # IDLE is not waited for
        assert "Shutting down: 3 client connections to close" in gw.log_text()
        for sock in (idle, waiting, smtp):
            sock.close()
