"""Abuse limits end to end: failed-login delays, an address locked out while another logs in with
the same token, the per-address connection cap, exempt addresses (short windows configured)."""

from __future__ import annotations

import socket
import time

import pytest

from .gateway_proc import Gateway, started_gateway, wait_for
from .test_imap_login import read_until

INVALID = b"NO [AUTHENTICATIONFAILED] Invalid credentials"


@pytest.fixture(scope="module")
def limited(dovecot, oauth2_provider):
    with started_gateway(dovecot, oauth2_provider, "gw-limits-",
                         limits={"auth_failures": 3, "auth_window": 60, "auth_lockout_after": 6,
                                 "auth_lockout": 60, "max_connections_per_ip": 4,
                                 "exempt": ["127.0.0.9/32"]}) as gw:
        yield gw


def timed_login(gw: Gateway, user: str, password: str, source: str) -> tuple[float, bytes]:
    sock = gw.raw(source=source)
    try:
        started = time.monotonic()
        sock.sendall(b"a1 LOGIN " + user.encode() + b" " + password.encode() + b"\r\n")
        answer = read_until(sock, b"a1 ")
        return time.monotonic() - started, answer
    finally:
        sock.close()


def test_failures_are_delayed_then_the_address_is_locked_out_but_not_the_account(limited, new_email):
    """From 127.0.0.2: three wrong tokens answered at once, then growing delays; past six the address
    gets the bad-token answer even with the right token, while 127.0.0.3 logs in with it at once."""
    email = new_email("limits")
    account = email.split("@")[0]
    limited.add_oauth_account(account, email)
    token = limited.token(account)
    times = []
    for _ in range(7):
        seconds, answer = timed_login(limited, account, "0" * 64, "127.0.0.2")
        assert INVALID in answer
        times.append(seconds)
    assert max(times[:3]) < 0.4
    assert 0.45 <= times[3] < 2 and times[4] >= 0.95 and times[5] >= 1.9
    seconds, answer = timed_login(limited, account, token, "127.0.0.2")  # right token, locked address
    assert INVALID in answer
    assert "Login lockout: address 127.0.0.2" in limited.log_text()
    seconds, answer = timed_login(limited, account, token, "127.0.0.3")  # the account is not locked
    assert b"a1 OK" in answer and seconds < 1.5


def test_the_per_address_connection_cap(limited):
    """Four connections from 127.0.0.4 are fine; the fifth gets `* BYE Too many connections` and is
    closed; another address is not affected; a closed one frees its place."""
    held = [limited.raw(source="127.0.0.4") for _ in range(4)]
    try:
        extra = socket.create_connection(("127.0.0.1", limited.imap_port), timeout=10,
                                         source_address=("127.0.0.4", 0))
        assert extra.recv(4096) == b"* BYE Too many connections\r\n"
        assert extra.recv(4096) == b""
        extra.close()
        other = limited.raw(source="127.0.0.5")
        other.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the gateway sees the close a moment later
            again = socket.create_connection(("127.0.0.1", limited.imap_port), timeout=10,
                                             source_address=("127.0.0.4", 0))
            greeting = again.recv(4096)
            again.close()
            if greeting.startswith(b"* OK") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert greeting.startswith(b"* OK")
    finally:
        for sock in held:
            sock.close()


def test_exempt_addresses_are_never_slowed(limited, new_email):
    """127.0.0.9 is in limits.exempt: ten wrong tokens in a row, every answer at once."""
    email = new_email("exempt")
    account = email.split("@")[0]
    limited.add_oauth_account(account, email)
    for _ in range(10):
        seconds, answer = timed_login(limited, account, "1" * 64, "127.0.0.9")
        assert INVALID in answer and seconds < 0.4


def test_a_low_open_files_limit_lowers_the_connection_cap_with_a_warning(dovecot, oauth2_provider):
    """With 256 descriptors the gateway says so at start-up and refuses connections past (256-200)/2
    = 28 with `* BYE Too many connections`, instead of running out of descriptors."""
    held: list[socket.socket] = []
    with started_gateway(dovecot, oauth2_provider, "gw-nofile-", nofile=256,
                         limits={"exempt": [], "max_connections_per_ip": 0}) as gw:
        _low_limit_run(gw, held)


def _low_limit_run(gw: Gateway, held: list[socket.socket]) -> None:
    try:
        assert wait_for(lambda: "Open files limit 256 is below the 20200 that limits.max_connections=10000 needs"
                        in gw.log_text()), gw.log_tail()
        for i in range(28):
            sock = socket.create_connection(("127.0.0.1", gw.imap_port), timeout=10)
            held.append(sock)
            greeting = sock.recv(4096)
            assert greeting.startswith(b"* OK"), (i, greeting, gw.log_tail())
        extra = socket.create_connection(("127.0.0.1", gw.imap_port), timeout=10)
        held.append(extra)
        answer = extra.recv(4096)
        assert answer == b"* BYE Too many connections\r\n", (answer, gw.log_tail())
    finally:
        for sock in held:
            sock.close()


def test_wrong_bearer_tokens_on_the_api_are_limited_like_failed_logins(dovecot, oauth2_provider) -> None:
    """The admin API counts wrong bearer tokens in the same limiter as IMAP, SMTP and the dashboard:
    past limits.auth_failures its 401 is held, past auth_lockout_after the address is locked out and
    even a good token gets the 401 (as a locked-out IMAP client gets the bad-token answer)."""
    with started_gateway(dovecot, oauth2_provider, "gw-apilimits-",
                         limits={"auth_failures": 1, "auth_window": 300, "auth_lockout_after": 2,
                                 "auth_lockout": 300, "exempt": []}) as gw:
        wrong = "0" * 64
        assert gw.api("GET", "/v1/accounts", token=wrong)[0] == 401   # 1st: answered at once
        assert gw.api("GET", "/v1/accounts", token=wrong)[0] == 401   # 2nd: held 0.5 s
        assert gw.metric("gateway_auth_delayed_total", protocol="api") == 1
        assert gw.metric("gateway_auth_failures_total", protocol="api") == 2  # good tokens clear nothing
        assert gw.api("GET", "/v1/accounts", token=wrong)[0] == 401  # 3rd: past auth_lockout_after
        assert wait_for(lambda: "Login lockout: address 127.0.0.1" in gw.log_text()), gw.log_tail()
        status, body = gw.api("GET", "/v1/accounts")  # the good admin token, from the locked-out address
        assert status == 401 and body["error"] == "Unauthorized"
