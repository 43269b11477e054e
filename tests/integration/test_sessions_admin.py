"""Live-session control: DELETE /v1/connections/{id} and DELETE /v1/token/...?disconnect=true."""

from __future__ import annotations

import smtplib
import socket

from .gateway_proc import Gateway, read_to_close, wait_for
from .test_imap_login import read_until


def _logged_in(gw: Gateway, account: str, token: str) -> socket.socket:
    sock = gw.raw()
    sock.sendall(b"a1 LOGIN " + account.encode() + b" " + token.encode() + b"\r\n")
    assert b"a1 OK" in read_until(sock, b"a1 ")
    return sock


def _session_ids(gw: Gateway, account: str) -> list[int]:
    return [c["id"] for c in gw.api("GET", "/v1/connections")[1]["connections"] if c["account"] == account]


def test_delete_a_connection_ends_that_imap_session_only(gateway, new_email):
    """The ended client reads `* BYE Session ended by administrator` and the end of the connection;
    the account's other session goes on; a second DELETE is a 404."""
    email = new_email("kill")
    account = email.split("@")[0]
    gateway.add_oauth_account(account, email)
    token = gateway.token(account)
    first = _logged_in(gateway, account, token)
    second = _logged_in(gateway, account, token)
    assert wait_for(lambda: len(_session_ids(gateway, account)) == 2)
    victim = _session_ids(gateway, account)[0]
    assert gateway.api("DELETE", f"/v1/connections/{victim}") == (200, {"deleted": True})
    assert read_to_close(first) == b"* BYE Session ended by administrator\r\n"
    second.sendall(b"n1 NOOP\r\n")
    assert b"n1 OK" in read_until(second, b"n1 ")
    assert gateway.api("DELETE", f"/v1/connections/{victim}")[0] == 404
    assert gateway.api("DELETE", "/v1/connections/not-a-number")[0] == 404
    second.close()


def test_delete_an_smtp_connection_gives_421(gateway, new_email, smtp_sink):
    email = new_email("killsmtp")
    account = email.split("@")[0]
    gateway.add_oauth_account(account, email)
    conn = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30)
    conn.starttls(context=gateway.client_context())
    conn.login(account, gateway.token(account, scopes=["smtp"]))
    assert wait_for(lambda: len(_session_ids(gateway, account)) == 1)
    assert gateway.api("DELETE", f"/v1/connections/{_session_ids(gateway, account)[0]}")[0] == 200
    assert read_to_close(conn.sock) == b"421 4.3.2 Session ended by administrator\r\n"
    conn.close()


def test_revoking_a_token_with_disconnect_ends_its_sessions_only(gateway, new_email):
    """?disconnect=true ends the sessions that logged in with that token; another token's stay."""
    email = new_email("revoke")
    account = email.split("@")[0]
    gateway.add_oauth_account(account, email)
    doomed, kept = gateway.token(account), gateway.token(account)
    a, b = _logged_in(gateway, account, doomed), _logged_in(gateway, account, doomed)
    c = _logged_in(gateway, account, kept)
    status, body = gateway.api("DELETE", f"/v1/token/{doomed}?disconnect=true")
    assert (status, body) == (200, {"deleted": True, "disconnected": 2})
    assert read_to_close(a) == read_to_close(b) == b"* BYE Session ended by administrator\r\n"
    c.sendall(b"n1 NOOP\r\n")
    assert b"n1 OK" in read_until(c, b"n1 ")
    assert gateway.api("DELETE", f"/v1/token/{kept}?disconnect=maybe")[0] == 400
    c.close()
