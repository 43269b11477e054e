"""The upstream pool against a real Dovecot: reuse, reset, what is never reused, caps, metrics.

Upstream logins are counted in Dovecot's own log (``imap-login: Login:
user=<email>``); live upstream connections with ``doveadm who``.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from .gateway_proc import Gateway, started_gateway, wait_for
from .test_imap_login import message, read_until


def upstream_logins(gw: Gateway, email: str) -> int:
    """How many times Dovecot logged this user in (any client: count around the phase under test)."""
    text = gw.dovecot.info_log_path.read_text(errors="replace")
    return text.count(f"Login: user=<{email}>, method=XOAUTH2")


def upstream_sessions(gw: Gateway, email: str) -> int:
    """Live IMAP connections Dovecot has for this user now."""
    out = gw.dovecot.doveadm("who", "-1", email, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith(email) and " imap " in f" {line} ")


def metric(gw: Gateway, name: str, **labels: str) -> float:
    return gw.metric(name, **labels)


def pool_idle(gw: Gateway) -> float:
    return metric(gw, "gateway_upstream_connections", protocol="imap", state="idle")


@pytest.fixture
def account(gateway: Gateway, new_email) -> tuple[str, str, str]:
    """A fresh OAuth2 account with one message: (ID, email, token)."""
    email = new_email("pool")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email)
    gateway.dovecot.append(email, "INBOX", message(f"pool-{account_id}"))
    return account_id, email, gateway.token(account_id)


def session(gw: Gateway, account_id: str, token: str) -> socket.socket:
    sock = gw.raw()
    sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
    answer = read_until(sock, b"a1 ")
    assert b"a1 OK" in answer, answer
    return sock


def command(sock: socket.socket, tag: bytes, line: bytes) -> bytes:
    sock.sendall(tag + b" " + line + b"\r\n")
    return read_until(sock, tag + b" ")


def logout(sock: socket.socket, tag: bytes = b"z9") -> bytes:
    sock.sendall(tag + b" LOGOUT\r\n")
    answer = read_until(sock, tag + b" ")
    sock.close()
    return answer


def settle(gw: Gateway, idle: float) -> None:
    """Wait until the pool holds ``idle`` idle IMAP connections in all (a release ends with one UNSELECT)."""
    assert wait_for(lambda: pool_idle(gw) == idle, timeout=10), pool_idle(gw)


def test_ten_sequential_sessions_cost_one_upstream_login(gateway, account):
    """Ten login / SELECT / FETCH / LOGOUT sessions in a row (imaplib) make Dovecot log in once."""
    account_id, email, token = account
    before = upstream_logins(gateway, email)
    for _ in range(10):
        conn = gateway.imap()
        assert conn.login(account_id, token)[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
        typ, data = conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and f"pool-{account_id}".encode() in data[0][1]
        assert conn.logout()[0] == "BYE"
    assert upstream_logins(gateway, email) - before == 1


def test_gateway_answers_logout_and_the_next_client_has_no_mailbox_selected(gateway, account):
    """The LOGOUT answer is the gateway's; the next client of the account starts with nothing selected."""
    account_id, email, token = account
    sock = session(gateway, account_id, token)
    assert b"s1 OK" in command(sock, b"s1", b"SELECT INBOX")
    assert logout(sock) == b"* BYE Logging out\r\nz9 OK Logout completed\r\n"
    before = upstream_logins(gateway, email)
    sock = session(gateway, account_id, token)
    assert re.search(rb"f1 BAD .*No mailbox selected", command(sock, b"f1", b"FETCH 1 (FLAGS)"))
    assert b"n1 OK" in command(sock, b"n1", b"NOOP")
    logout(sock)
    assert upstream_logins(gateway, email) == before  # that second session was the pooled one


def test_pooled_login_gives_the_same_capabilities_as_a_fresh_one(gateway, account):
    """A pooled login's tagged OK carries the upstream's post-auth capabilities, like a fresh login's."""
    account_id, email, token = account
    sock = gateway.raw()
    sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
    fresh = read_until(sock, b"a1 ")
    logout(sock)
    before = upstream_logins(gateway, email)
    sock = gateway.raw()
    sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
    pooled = read_until(sock, b"a1 ")
    logout(sock)
    assert upstream_logins(gateway, email) == before
    assert fresh == pooled and b"[CAPABILITY IMAP4rev1" in fresh and b"UNSELECT" in fresh


def _used_idle(sock: socket.socket) -> None:
    sock.sendall(b"i1 IDLE\r\n")
    assert read_until(sock, b"+").startswith(b"+")
    sock.sendall(b"DONE\r\n")
    assert b"i1 OK" in read_until(sock, b"i1 ")


def _used_enable(sock: socket.socket) -> None:
    assert b"e1 OK" in command(sock, b"e1", b"ENABLE CONDSTORE")


def _used_compress(sock: socket.socket) -> None:
    assert b"c1 OK" in command(sock, b"c1", b"COMPRESS DEFLATE")
    # From here the stream is deflate: LOGOUT compressed, the answer decompressed.
    deflate = zlib.compressobj(wbits=-15)
    sock.sendall(deflate.compress(b"z9 LOGOUT\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
    inflate, out = zlib.decompressobj(wbits=-15), b""
    while b"z9 OK" not in out:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += inflate.decompress(chunk)
    assert b"* BYE" in out and b"z9 OK" in out  # Dovecot's own answer: the gateway did not intercept


def _dropped_mid_command(sock: socket.socket) -> None:
    sock.sendall(b"x1 SEARCH SUBJE")


def _dropped_mid_literal(sock: socket.socket) -> None:
    sock.sendall(b"x1 APPEND INBOX {100+}\r\nFrom: a@example.com\r\n")


def _dropped_with_command_in_flight(sock: socket.socket) -> None:
    sock.sendall(b"x1 SELECT INBOX\r\nx2 FETCH 1:* (BODY.PEEK[])\r\n")


@pytest.mark.parametrize("use", [_used_idle, _used_enable, _used_compress, _dropped_mid_command,
                                 _dropped_mid_literal, _dropped_with_command_in_flight],
                         ids=["idle", "enable", "compress", "mid-command", "mid-literal", "in-flight"])
def test_sessions_in_unknown_or_changed_state_are_not_reused(gateway, account, use):
    """After IDLE, ENABLE, COMPRESS, or a drop inside a command or literal, the next login is a new upstream."""
    account_id, email, token = account
    sock = session(gateway, account_id, token)
    before = upstream_logins(gateway, email)
    assert upstream_sessions(gateway, email) == 1
    use(sock)
    sock.close()  # abruptly: a clean boundary would be reusable, if nothing had changed the session
    # The upstream connection is closed, not kept: Dovecot sees it go.
    assert wait_for(lambda: upstream_sessions(gateway, email) == 0, timeout=10)
    sock = session(gateway, account_id, token)
    assert upstream_logins(gateway, email) == before + 1
    logout(sock)


def test_a_client_that_drops_between_commands_leaves_a_reusable_connection(gateway, account):
    """No LOGOUT, but nothing in flight and nothing changed: the connection is kept (reset with UNSELECT)."""
    account_id, email, token = account
    sock = session(gateway, account_id, token)
    assert b"s1 OK" in command(sock, b"s1", b"SELECT INBOX")
    sock.close()
    assert wait_for(lambda: pool_idle(gateway) >= 1)
    before = upstream_logins(gateway, email)
    sock = session(gateway, account_id, token)
    assert re.search(rb"f1 BAD .*No mailbox selected", command(sock, b"f1", b"FETCH 1 (FLAGS)"))
    logout(sock)
    assert upstream_logins(gateway, email) == before


def test_a_kicked_pooled_connection_is_replaced_without_the_client_noticing(gateway, account):
    """Dovecot drops the idle pooled connection (doveadm kick): the next login still works, on a new upstream."""
    account_id, email, token = account
    logout(session(gateway, account_id, token))
    assert wait_for(lambda: upstream_sessions(gateway, email) == 1)
    gateway.dovecot.doveadm("kick", email)
    assert wait_for(lambda: upstream_sessions(gateway, email) == 0)
    before = upstream_logins(gateway, email)
    sock = session(gateway, account_id, token)
    assert b"s1 OK" in command(sock, b"s1", b"SELECT INBOX")
    logout(sock)
    assert upstream_logins(gateway, email) == before + 1


def test_account_change_empties_its_pool(gateway, account):
    """PUT /v1/account/{id} closes the account's idle upstream connections; the next login is fresh."""
    account_id, email, token = account
    logout(session(gateway, account_id, token))
    assert wait_for(lambda: upstream_sessions(gateway, email) == 1)
    status, _ = gateway.api("PUT", f"/v1/account/{account_id}", {"name": "renamed"})
    assert status == 200
    assert wait_for(lambda: upstream_sessions(gateway, email) == 0)
    before = upstream_logins(gateway, email)
    logout(session(gateway, account_id, token))
    assert upstream_logins(gateway, email) == before + 1


def test_connections_and_metrics_say_pooled(gateway, account):
    """/v1/connections marks a reused upstream "pooled": true; the pool counters count hits and misses."""
    account_id, email, token = account
    hits = metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="hit")
    misses = metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="miss")
    first = session(gateway, account_id, token)
    second = session(gateway, account_id, token)  # the first holds its upstream: a new one
    logout(first)
    assert wait_for(lambda: upstream_sessions(gateway, email) == 2)
    third = session(gateway, account_id, token)   # takes the first's
    _, body = gateway.api("GET", "/v1/connections")
    mine = sorted(c["pooled"] for c in body["connections"] if c["account"] == account_id)
    assert mine == [False, True]
    assert metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="hit") == hits + 1
    assert metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="miss") == misses + 2
    logout(second)
    logout(third)


@pytest.fixture(scope="module")
def capped(dovecot, oauth2_provider):
    """A gateway whose accounts may have 10 upstream IMAP connections and 2 SMTP ones, waiting 2 s for one."""
    with started_gateway(dovecot, oauth2_provider, "gw-capped-",
                         imap={"max_connections_per_account": 10, "limit_wait": 2,
                               "pool": {"idle_ttl": 60, "max_idle_per_account": 10}},
                         smtp={"max_connections_per_account": 2, "limit_wait": 1}) as gw:
        yield gw


def _parallel(count: int, work) -> list:
    results: list = [None] * count
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait(10)
        try:
            results[i] = work(i)
        except Exception as e:  # reported through the results
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_thirty_parallel_logins_never_exceed_the_cap(capped, new_email):
    """30 clients at once, cap 10: at most 10 upstream connections ever; those that wait get a freed one."""
    email = new_email("cap")
    account_id = email.split("@")[0]
    capped.add_oauth_account(account_id, email)
    token = capped.token(account_id)
    before = upstream_logins(capped, email)
    peak = [0]
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            peak[0] = max(peak[0], upstream_sessions(capped, email))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()

    def work(i: int) -> bytes:
        sock = session(capped, account_id, token)
        assert b"s OK" in command(sock, b"s", b"SELECT INBOX")
        time.sleep(0.3)
        return logout(sock)

    try:
        results = _parallel(30, work)
    finally:
        watching.set()
        watcher.join()
    assert all(r == b"* BYE Logging out\r\nz9 OK Logout completed\r\n" for r in results), results
    assert upstream_logins(capped, email) - before <= 10   # idle ones are kept (max idle 10): no re-login
    assert 1 <= peak[0] <= 10


def test_over_the_cap_after_the_wait_gets_the_design_answer(capped, new_email):
    """Ten sessions hold every slot; two more wait limit_wait and get NO [UNAVAILABLE] Too many connections."""
    email = new_email("full")
    account_id = email.split("@")[0]
    capped.add_oauth_account(account_id, email)
    token = capped.token(account_id)
    held = [session(capped, account_id, token) for _ in range(10)]
    try:
        assert upstream_sessions(capped, email) == 10

        def late(i: int) -> tuple[float, bytes]:
            started = time.monotonic()
            sock = capped.raw()
            sock.sendall(b"a1 LOGIN " + account_id.encode() + b" " + token.encode() + b"\r\n")
            answer = read_until(sock, b"a1 ")
            sock.close()
            return time.monotonic() - started, answer

        for waited, answer in _parallel(2, late):
            assert answer.endswith(b"a1 NO [UNAVAILABLE] Too many connections for this account\r\n"), answer
            assert waited >= 1.9  # it waited limit_wait (2 s) for a slot first
        assert upstream_sessions(capped, email) == 10
    finally:
        for sock in held:
            logout(sock)
    # A slot freed: logins work again, on a pooled connection.
    logout(session(capped, account_id, token))


def test_smtp_over_the_cap_gets_454(capped, new_email, smtp_sink):
    """SMTP: two authenticated sessions hold the account's two upstream slots; a third gets 454 4.7.0."""
    import smtplib

    email = new_email("smtpcap")
    account_id = email.split("@")[0]
    capped.add_oauth_account(account_id, email)
    token = capped.token(account_id, scopes=["smtp"])

    def logged_in() -> smtplib.SMTP:
        conn = smtplib.SMTP("127.0.0.1", capped.smtp_port, timeout=30)
        conn.starttls(context=capped.client_context())
        conn.login(account_id, token)
        return conn

    held = [logged_in(), logged_in()]
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            logged_in()
        assert refused.value.smtp_code == 454
        assert refused.value.smtp_error == b"4.7.0 Too many connections for this account"
    finally:
        for conn in held:
            conn.quit()
    assert wait_for(lambda: _smtp_login_works(logged_in))


def _smtp_login_works(connect) -> bool:
    try:
        connect().quit()
        return True
    except Exception:
        return False


def test_pooling_off_opens_a_connection_per_login(dovecot, oauth2_provider, new_email):
    """imap.pool.idle_ttl: 0 turns pooling off: LOGOUT goes upstream, every login is an upstream login."""
    with started_gateway(dovecot, oauth2_provider, "gw-nopool-", imap={"pool": {"idle_ttl": 0}}) as gw:
        email = new_email("nopool")
        account_id = email.split("@")[0]
        gw.add_oauth_account(account_id, email)
        token = gw.token(account_id)
        before = upstream_logins(gw, email)
        for _ in range(3):
            answer = logout(session(gw, account_id, token))
            assert answer.startswith(b"* BYE Logging out\r\nz9 OK Logout completed (")  # Dovecot's own
        assert upstream_logins(gw, email) - before == 3


def test_upstream_tls_sessions_are_resumed(oauth2_provider, new_email):
    """Against a Dovecot whose imap-login keeps one process (service_count = 0), so its ticket keys
    persist, the gateway's second upstream handshake resumes the first's TLS session."""
    from .dovecot import Dovecot

    root = Path(tempfile.mkdtemp(prefix="gw-resume-"))
    root.chmod(0o755)
    (root / "dovecot").mkdir()
    (root / "dovecot").chmod(0o755)
    performance = Dovecot(root / "dovecot", oauth2_provider, submission=False, extra_config="""
service imap-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
}
""")
    gw = Gateway(root / "gateway", performance, oauth2_provider, imap={"pool": {"idle_ttl": 0}})
    try:
        performance.start()
        gw.start()
        email = new_email("resume")
        account_id = email.split("@")[0]
        gw.add_oauth_account(account_id, email)
        token = gw.token(account_id)
        for _ in range(3):
            logout(session(gw, account_id, token))
        resumed = metric(gw, "gateway_upstream_tls_handshakes_total", protocol="imap", resumed="yes")
        full = metric(gw, "gateway_upstream_tls_handshakes_total", protocol="imap", resumed="no")
        assert (full, resumed) == (1, 2)
    finally:
        gw.stop()
        performance.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_pooled_connection_that_stopped_answering_fails_its_resync_and_is_replaced(gateway, account):
    """The idle connection's Dovecot process is frozen (SIGSTOP): the NOOP before reuse gets no answer,
    the connection is discarded after the resync timeout, and the login goes on with a new one."""
    import os
    import signal

    account_id, email, token = account
    logout(session(gateway, account_id, token))
    assert wait_for(lambda: pool_idle(gateway) >= 1)
    who = gateway.dovecot.doveadm("who", "-1", email).stdout.split()
    pid = int(who[who.index("imap") + 1])
    discarded = metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="discarded")
    before = upstream_logins(gateway, email)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        sock = session(gateway, account_id, token)
        waited = time.monotonic() - started
        assert b"s1 OK" in command(sock, b"s1", b"SELECT INBOX")
        logout(sock)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited >= 4.5  # the resync timeout (5 s) passed first
    assert upstream_logins(gateway, email) == before + 1
    assert metric(gateway, "gateway_upstream_pool_total", protocol="imap", result="discarded") == discarded + 1
