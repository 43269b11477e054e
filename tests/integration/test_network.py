"""Outbound network end to end: source addresses, IP family order, retries and real proxies.

Dovecot is the judge of the source address: its login log line carries
`rip=` (the address the gateway's connection came from). Source addresses are
loopback aliases (127.0.0.2-4 and ::1). Proxies are real servers started here:
Dante (SOCKS5, with and without username/password), Twisted's SOCKS4/4a
server, tinyproxy (HTTP CONNECT, Basic auth) and stunnel in front of it
(https:// proxy).
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import smtplib
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.net.addresses import rendezvous

from .dovecot import Dovecot, _ipv6_loopback
from .gateway_proc import Gateway, wait_for
from .proxies import PROXY_PASSWORD, PROXY_USER, Dante, Socks4, Stunnel, TinyProxy, missing_binaries

POOL = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
LOGIN_LINE = re.compile(r"Login: user=<([^>]*)>.*?\brip=([0-9A-Fa-f:.]+)")
CONNECTIONS = 50
UPSTREAM_PASSWORD = "upstream-pw"

pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="needs ::1 (IPv6 loopback)")


# Fixtures -----------------------------------------------------------------

def _workdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def _cleanup(path: Path) -> None:
    if not os.environ.get("GW_KEEP_DOVECOT"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def proxies(dovecot, oauth2_provider) -> Iterator[dict[str, Any]]:
    """Dante (open and with auth), SOCKS4, tinyproxy and stunnel on free loopback ports."""
    missing = missing_binaries()
    if missing:
        pytest.fail("the network tests need " + ", ".join(missing)
                    + ": run the test command from README.md, which installs them", pytrace=False)
    root = _workdir("gw-proxies-")
    started: dict[str, Any] = {}
    try:
        started["dante"] = Dante(root / "dante").start()
        started["dante_auth"] = Dante(root / "dante-auth", auth=True).start()
        started["socks4"] = Socks4(root / "socks4").start()
        started["http"] = TinyProxy(root / "tinyproxy",
                                    connect_ports=(dovecot.imaps_port, dovecot.imap_port,
                                                   oauth2_provider.port)).start()
        started["https"] = Stunnel(root / "stunnel", started["http"].port,
                                   dovecot.cert_file, dovecot.key_file).start()
        yield started
    finally:
        for proc in started.values():
            proc.stop()
        _cleanup(root)


class IPv6OnlyDovecot(Dovecot):
    """A Dovecot listening on ::1 only (an IPv6-only upstream), with the session Dovecot's CA."""

    host = "::1"

    def _write_config(self) -> None:
        super()._write_config()
        self.listen_hosts = ["::1"]
        text = self.conf_path.read_text()
        self.conf_path.write_text(re.sub(r"(?m)^listen = .*$", "listen = ::1", text))


class PasswordUsers:
    """Upstream password users, all added at once: Dovecot re-reads its passwd-file at most
    once a second, so a user added just after a login could stay unknown for that second."""

    def __init__(self, dovecot: Dovecot, prefix: str, count: int = 24) -> None:
        self.free = [f"{prefix}{os.getpid()}-{i}@example.com" for i in range(count)]
        for email in self.free:
            dovecot.add_password_user(email, UPSTREAM_PASSWORD)

    def take(self) -> str:
        return self.free.pop()


@pytest.fixture(scope="module")
def users(dovecot) -> PasswordUsers:
    made = PasswordUsers(dovecot, "pwnet")
    time.sleep(1.1)  # past Dovecot's once-a-second passwd-file check
    return made


@pytest.fixture(scope="module")
def v6_dovecot(dovecot, oauth2_provider) -> Iterator[Dovecot]:
    workdir = _workdir("gw-dovecot6-")
    shutil.copytree(dovecot.cert_dir, workdir / "tls")
    server = IPv6OnlyDovecot(workdir, oauth2_provider, submission=False)
    server.users = PasswordUsers(server, "pwnet6", 4)  # type: ignore[attr-defined]
    try:
        server.start()
        yield server
    finally:
        server.stop()
        _cleanup(workdir)


def _gateway(dovecot, provider, prefix: str, **network: Any) -> Iterator[Gateway]:
    workdir = _workdir(prefix)
    # Pooling off: these tests count one upstream connection (and source address) per login.
    gw = Gateway(workdir, dovecot, provider, network=network, imap={"pool": {"idle_ttl": 0}})
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        _cleanup(workdir)


@pytest.fixture(scope="module")
def gw(dovecot, oauth2_provider) -> Iterator[Gateway]:
    """Static strategy over 127.0.0.2-4 and ::1; localhost pinned to both 127.0.0.1 and ::1."""
    yield from _gateway(dovecot, oauth2_provider, "gw-net-", local_addresses=POOL + ["::1"],
                        address_strategy="static", ip_strategy="ipv4_then_ipv6",
                        hosts={"localhost": ["127.0.0.1", "::1"]},
                        ehlo_names={address: f"out{address.rsplit('.', 1)[1]}.gw.test" for address in POOL})


@pytest.fixture(scope="module")
def gw_retry(dovecot, oauth2_provider) -> Iterator[Gateway]:
    """IPv4 on the first attempt, IPv6 on the next (the expression form)."""
    yield from _gateway(dovecot, oauth2_provider, "gw-net-retry-", local_addresses=["127.0.0.2", "::1"],
                        address_strategy="static",
                        ip_strategy=[{"if": "retry_num == 0", "then": "ipv4_only"}, {"else": "ipv6_only"}],
                        connect_attempts=2, hosts={"localhost": ["127.0.0.1", "::1"]})


@pytest.fixture(scope="module")
def gw_proxied(dovecot, oauth2_provider, proxies) -> Iterator[Gateway]:
    """A global HTTP CONNECT proxy (with Basic auth) that `localhost` bypasses via no_proxy."""
    http = proxies["http"]
    yield from _gateway(dovecot, oauth2_provider, "gw-net-proxy-",
                        proxy=http.url(user=http.user, password=http.password), no_proxy=["localhost"])


# Helpers ------------------------------------------------------------------

def rips(dovecot: Dovecot, email: str) -> list[str]:
    """Source addresses of every login of ``email`` in Dovecot's log, oldest first."""
    try:
        text = dovecot.info_log_path.read_text(errors="replace")
    except OSError:
        return []
    return [rip for user, rip in LOGIN_LINE.findall(text) if user == email]


def wait_rips(dovecot: Dovecot, email: str, count: int) -> list[str]:
    assert wait_for(lambda: len(rips(dovecot, email)) >= count, timeout=15), (
        f"{len(rips(dovecot, email))} of {count} logins of {email} in Dovecot's log")
    return rips(dovecot, email)


def login(gw: Gateway, account: str, token: str) -> None:
    conn = gw.imap()
    try:
        typ, data = conn.login(account, token)
        assert typ == "OK", data
    finally:
        try:
            conn.logout()
        except Exception:
            pass


def login_many(gw: Gateway, account: str, token: str, count: int) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda _: login(gw, account, token), range(count)))


def login_answer(gw: Gateway, account: str, token: str) -> str:
    """The text of a failed login (imaplib raises on NO)."""
    conn = gw.imap()
    try:
        with pytest.raises(imaplib.IMAP4.error) as info:
            conn.login(account, token)
        return str(info.value)
    finally:
        conn.shutdown()


def oauth_account(gw: Gateway, new_email, prefix: str, domain: str | None = None,
                  **extra: Any) -> tuple[str, str, str]:
    """(account ID, email, token) for a fresh OAuth2 account."""
    email = new_email(prefix)
    if domain:
        email = email.split("@")[0] + "@" + domain
    account = email.split("@")[0]
    gw.add_oauth_account(account, email, **extra)
    return account, email, gw.token(account)


def password_account(gw: Gateway, dovecot: Dovecot, users: PasswordUsers, prefix: str, *,
                     port: int | None = None, secure: bool = True, host: str = "localhost",
                     **extra: Any) -> tuple[str, str, str]:
    """(account ID, email, token) for an account that logs in to ``dovecot`` with a password."""
    email = users.take()
    account = prefix + "-" + email.split("@")[0]
    status, body = gw.api("POST", "/v1/account", {
        "account": account, "email": email,
        "imap": {"host": host, "port": port or (dovecot.imaps_port if secure else dovecot.imap_port),
                 "secure": secure, "auth": {"user": email, "pass": UPSTREAM_PASSWORD}},
        **extra})
    assert status == 200, body
    return account, email, gw.token(account)


def set_network(gw: Gateway, **body: Any) -> dict[str, Any]:
    status, view = gw.api("PUT", "/v1/settings/network", body)
    assert status == 200, view
    return view


# Source-address strategies ------------------------------------------------

def test_static_strategy_sticks_and_removal_moves_only_the_removed_addresses_accounts(gw, new_email):
    """static over 50 connections: each account always leaves from its rendezvous address;
    removing one address from the pool moves only the accounts that had it."""
    set_network(gw, addressStrategy=None, localAddresses=None)
    accounts = []
    for _ in range(40):  # until every pool address has an account (P(40 are not enough) < 1e-6)
        accounts.append(oauth_account(gw, new_email, "static"))
        if len({rendezvous(a, POOL) for a, _e, _t in accounts}) == len(POOL) and len(accounts) >= 5:
            break
    per_account = CONNECTIONS // len(accounts) + 1
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda item: [login(gw, item[0], item[2]) for _ in range(per_account)], accounts))
    before = {}
    for account, email, _token in accounts:
        seen = set(wait_rips(gw.dovecot, email, per_account))
        assert seen == {rendezvous(account, POOL)}, (account, seen)
        before[account] = seen.pop()
    assert len(accounts) * per_account >= CONNECTIONS
    assert set(before.values()) == set(POOL)

    status, shown = gw.api("GET", f"/v1/account/{accounts[0][0]}")
    assert shown["network"]["localAddress"] == before[accounts[0][0]]
    assert shown["network"]["poolLevel"] == "default" and shown["network"]["addressStrategy"] == "static"

    removed = POOL[0]
    set_network(gw, localAddresses=POOL[1:] + ["::1"])
    try:
        for account, email, token in accounts:
            login(gw, account, token)
        for account, email, _token in accounts:
            now = wait_rips(gw.dovecot, email, per_account + 1)[-1]
            if before[account] == removed:
                assert now in POOL[1:], (account, now)
            else:
                assert now == before[account], (account, before[account], now)
    finally:
        set_network(gw, localAddresses=None)


def test_random_strategy_spreads_over_the_pool(gw, new_email):
    """random over 50 connections of one account: every address of the pool is used."""
    set_network(gw, addressStrategy="random")
    try:
        account, email, token = oauth_account(gw, new_email, "random")
        login_many(gw, account, token, CONNECTIONS)
        seen = wait_rips(gw.dovecot, email, CONNECTIONS)
        assert set(seen) == set(POOL), sorted(set(seen))
        assert max(seen.count(a) for a in POOL) < CONNECTIONS * 0.8
    finally:
        set_network(gw, addressStrategy=None)


def test_default_strategy_lets_the_os_choose(gw, new_email):
    """default over 50 connections: no bind, so every connection to 127.0.0.1 comes from 127.0.0.1."""
    set_network(gw, addressStrategy="default")
    try:
        account, email, token = oauth_account(gw, new_email, "default")
        login_many(gw, account, token, CONNECTIONS)
        assert set(wait_rips(gw.dovecot, email, CONNECTIONS)) == {"127.0.0.1"}
    finally:
        set_network(gw, addressStrategy=None)


def test_account_domain_and_default_pools_most_specific_wins(gw, new_email):
    """An account pool beats a domain pool beats the default pool; localAddress beats them all."""
    set_network(gw, domainPools={"pool.example": ["127.0.0.4"]})
    try:
        in_domain, email_d, token_d = oauth_account(gw, new_email, "dom", domain="pool.example")
        own_pool, email_a, token_a = oauth_account(gw, new_email, "acct", domain="pool.example")
        pinned, email_p, token_p = oauth_account(gw, new_email, "pin", domain="pool.example",
                                                 localAddress="127.0.0.2")
        set_network(gw, accountPools={own_pool: ["127.0.0.3"]})
        for account, token in ((in_domain, token_d), (own_pool, token_a), (pinned, token_p)):
            login_many(gw, account, token, 3)
        assert set(wait_rips(gw.dovecot, email_d, 3)) == {"127.0.0.4"}
        assert set(wait_rips(gw.dovecot, email_a, 3)) == {"127.0.0.3"}
        assert set(wait_rips(gw.dovecot, email_p, 3)) == {"127.0.0.2"}
        _, view = gw.api("GET", f"/v1/account/{own_pool}")
        assert view["network"]["pool"] == ["127.0.0.3"] and view["network"]["poolLevel"] == "account"
        _, view = gw.api("GET", f"/v1/account/{in_domain}")
        assert view["network"]["pool"] == ["127.0.0.4"] and view["network"]["poolLevel"] == "domain"
        _, view = gw.api("GET", f"/v1/account/{pinned}")
        assert view["network"]["localAddress"] == "127.0.0.2"
    finally:
        set_network(gw, domainPools=None, accountPools=None)


def test_api_refuses_an_address_that_is_not_on_this_machine(gw):
    """PUT /v1/settings/network with 192.0.2.99 (TEST-NET) is a 400 naming the address."""
    status, body = gw.api("PUT", "/v1/settings/network", {"localAddresses": ["192.0.2.99"]})
    assert status == 400 and "192.0.2.99 is not configured on this machine" in body["message"]


def test_start_up_refuses_an_address_that_is_not_on_this_machine(dovecot, oauth2_provider):
    """A pool address the machine does not have stops start-up with one line naming the key."""
    workdir = _workdir("gw-net-bad-")
    gw = Gateway(workdir, dovecot, oauth2_provider, network={"local_addresses": ["127.0.0.2", "192.0.2.99"]})
    try:
        with pytest.raises(RuntimeError) as info:
            gw.start(timeout=15)
        assert ("config key network.local_addresses: 192.0.2.99 is not configured on this machine"
                in str(info.value))
    finally:
        gw.stop()
        _cleanup(workdir)


# IP families --------------------------------------------------------------

def test_ipv6_only_upstream_with_ipv4_then_ipv6_falls_back_to_ipv6(gw, v6_dovecot):
    """localhost is 127.0.0.1 and ::1; the upstream listens on ::1 only: the IPv4 attempt is
    refused, IPv6 follows within the connect timeout, from the pool's IPv6 address."""
    account, email, token = password_account(gw, v6_dovecot, v6_dovecot.users, "v6only")
    login(gw, account, token)
    assert wait_rips(v6_dovecot, email, 1) == ["::1"]
    assert "source=::1" in gw.log_text()


def test_retry_expression_chooses_the_family_per_attempt(gw_retry, dovecot, v6_dovecot, users):
    """[{if: retry_num == 0, then: ipv4_only}, {else: ipv6_only}]: a dual-stack upstream is
    reached over IPv4 at once; an IPv6-only one on the second attempt, over IPv6."""
    account, email, token = password_account(gw_retry, dovecot, users, "retry4")
    login(gw_retry, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.2"]

    account6, email6, token6 = password_account(gw_retry, v6_dovecot, v6_dovecot.users, "retry6")
    login(gw_retry, account6, token6)
    assert wait_rips(v6_dovecot, email6, 1) == ["::1"]
    assert wait_for(lambda: re.search(rf"retry_num=0 to localhost:{v6_dovecot.imaps_port} \(ipv4_only\) "
                                      rf"for account {re.escape(account6)} failed",
                                      gw_retry.log_text()) is not None), gw_retry.log_tail()


# Proxies ------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_socks5_without_auth_carries_the_session(gw, dovecot, proxies, users, scheme):
    """socks5:// (local DNS) and socks5h:// (the proxy resolves): login works through Dante; the
    gateway reaches Dante from its pool address; Dovecot sees Dante's address."""
    dante = proxies["dante"]
    account, email, token = password_account(gw, dovecot, users, scheme, proxy=dante.url(scheme))
    login(gw, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.1"]
    source = rendezvous(account, POOL)
    assert wait_for(lambda: f"{source}." in dante.log_text()), dante.tail()
    assert f"proxy={scheme}://127.0.0.1:{dante.port}" in gw.log_text()


def test_socks5_with_username_password(gw, dovecot, proxies, users):
    """socks5://user:pass@: RFC 1929 authentication accepted by Dante; the password is never logged."""
    dante = proxies["dante_auth"]
    account, email, token = password_account(gw, dovecot, users, "s5auth",
                                             proxy=dante.url("socks5", PROXY_USER, PROXY_PASSWORD))
    login(gw, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.1"]
    _, view = gw.api("GET", f"/v1/account/{account}")
    assert view["network"]["proxy"] == f"socks5://{PROXY_USER}:***@127.0.0.1:{dante.port}"
    assert PROXY_PASSWORD not in gw.log_text()


def test_socks5_proxy_refuses_auth(gw, dovecot, proxies, users):
    """Wrong SOCKS5 password: NO [UNAVAILABLE] proxy: SOCKS5 authentication refused, and a log line."""
    dante = proxies["dante_auth"]
    account, _email, token = password_account(gw, dovecot, users, "s5bad",
                                              proxy=dante.url("socks5", PROXY_USER, "wrong-pass-XYZ"))
    answer = login_answer(gw, account, token)
    assert "[UNAVAILABLE] proxy: SOCKS5 authentication refused" in answer
    assert wait_for(lambda: "SOCKS5 authentication refused" in gw.log_text())
    assert "wrong-pass-XYZ" not in gw.log_text()

    account2, _email2, token2 = password_account(gw, dovecot, users, "s5none", proxy=dante.url())
    assert "[UNAVAILABLE] proxy: SOCKS5 proxy requires authentication" in login_answer(gw, account2, token2)


@pytest.mark.parametrize("scheme", ["socks4", "socks4a"])
def test_socks4_and_socks4a(gw, dovecot, proxies, users, scheme):
    """socks4:// (IPv4 resolved here) and socks4a:// (host name sent; the server resolves it, then
    logs the address) through Twisted's SOCKSv4 server."""
    socks4 = proxies["socks4"]
    seen = len(socks4.log_text())
    account, email, token = password_account(gw, dovecot, users, scheme, proxy=socks4.url(scheme, user="gw"))
    login(gw, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.1"]
    source = rendezvous(account, POOL)
    line = rf"code 1 connection to 127\.0\.0\.1:{dovecot.imaps_port} \(user b'gw'\) authorized"
    if scheme == "socks4":  # (for 4a the server logs from its resolver callback, without the peer)
        line = rf"\[SOCKSv4,\d+,{re.escape(source)}\] " + line
    assert wait_for(lambda: re.search(line, socks4.log_text()[seen:]) is not None), socks4.tail()
    assert f"source={source} proxy={scheme}://gw@127.0.0.1:{socks4.port} " in gw.log_text()


def test_starttls_upstream_through_a_socks_tunnel(gw, dovecot, proxies, users):
    """secure: false (STARTTLS) through Dante: the tunnelled transport still upgrades to TLS."""
    account, email, token = password_account(gw, dovecot, users, "s5tls", secure=False,
                                             proxy=proxies["dante"].url())
    login(gw, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.1"]
    text = dovecot.info_log_path.read_text(errors="replace")
    line = [ln for ln in text.splitlines() if f"user=<{email}>" in ln and "Login:" in ln][-1]
    assert "TLS" in line, line


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_connect_with_basic_auth(gw, dovecot, proxies, users, scheme):
    """http:// and https:// (TLS to the proxy first) CONNECT proxies with Basic auth."""
    http = proxies["http"]
    port = proxies["https"].port if scheme == "https" else http.port
    account, email, token = password_account(gw, dovecot, users, scheme,
                                             proxy=http.url(scheme, http.user, http.password, port=port))
    login(gw, account, token)
    assert wait_rips(dovecot, email, 1) == ["127.0.0.1"]
    assert wait_for(lambda: f"CONNECT localhost:{dovecot.imaps_port}" in http.log_text()), http.tail()
    assert http.password not in gw.log_text()


def test_http_connect_refusals_reach_the_client(gw, dovecot, proxies, users):
    """Wrong Basic password and a CONNECT to a port the proxy forbids (403) are reported as
    NO [UNAVAILABLE] proxy: ... with the proxy's status line."""
    http = proxies["http"]
    account, _e, token = password_account(gw, dovecot, users, "httpbad",
                                          proxy=http.url("http", http.user, "nope-nope"))
    answer = login_answer(gw, account, token)
    assert "[UNAVAILABLE] proxy: HTTP CONNECT authentication refused: 401" in answer, answer

    account2, _e2, token2 = password_account(gw, dovecot, users, "http403",
                                             port=dovecot.submission_port,
                                             proxy=http.url("http", http.user, http.password))
    answer = login_answer(gw, account2, token2)
    assert "[UNAVAILABLE] proxy: HTTP CONNECT refused: 403" in answer, answer


def test_proxy_down(gw, dovecot, users):
    """Nothing listens at the proxy's address: proxy: cannot connect to proxy ...: Connection refused."""
    from .dovecot import free_port

    port = free_port()
    account, _e, token = password_account(gw, dovecot, users, "down",
                                          proxy=f"socks5://u:secret-down@127.0.0.1:{port}")
    answer = login_answer(gw, account, token)
    assert f"[UNAVAILABLE] proxy: cannot connect to proxy 127.0.0.1:{port}: Connection refused" in answer
    assert "secret-down" not in gw.log_text()


def test_connections_show_source_and_masked_proxy(gw, dovecot, proxies, users):
    """/v1/connections lists the live session's source address and its proxy without the password."""
    dante = proxies["dante_auth"]
    account, _email, token = password_account(gw, dovecot, users, "live",
                                              proxy=dante.url("socks5", PROXY_USER, PROXY_PASSWORD))
    conn = gw.imap()
    try:
        conn.login(account, token)
        _, body = gw.api("GET", "/v1/connections")
        mine = [c for c in body["connections"] if c["account"] == account]
        assert mine and mine[0]["localAddress"] == rendezvous(account, POOL)
        assert mine[0]["proxy"] == f"socks5://{PROXY_USER}:***@127.0.0.1:{dante.port}"
    finally:
        conn.logout()


def test_global_proxy_no_proxy_bypass_and_oauth2_through_the_proxy(gw_proxied, dovecot, proxies, new_email,
                                                                    users):
    """network.proxy applies to the IMAP connection and to the OAuth2 token request (a CONNECT
    tunnel, like every connection through an HTTP proxy); a host in no_proxy (localhost) is
    reached directly."""
    http = proxies["http"]
    seen = len(http.log_text())
    bypass, email_b, token_b = oauth_account(gw_proxied, new_email, "bypass")
    login(gw_proxied, bypass, token_b)
    provider = gw_proxied.provider
    assert wait_for(lambda: f"CONNECT {provider.host}:{provider.port}" in http.log_text()[seen:]), http.tail()
    assert f":{dovecot.imaps_port}" not in http.log_text()[seen:]
    assert wait_rips(dovecot, email_b, 1) == ["127.0.0.1"]
    assert re.search(rf"account={bypass} .*proxy=- ", gw_proxied.log_text())

    via, email_v, token_v = password_account(gw_proxied, dovecot, users, "via", host="127.0.0.1")
    login(gw_proxied, via, token_v)
    assert wait_for(lambda: f"CONNECT 127.0.0.1:{dovecot.imaps_port}" in http.log_text()[seen:]), http.tail()
    assert re.search(rf"account={via} .*proxy=http://{http.user}:\*\*\*@127\.0\.0\.1:{http.port} ",
                     gw_proxied.log_text())
    assert http.password not in gw_proxied.log_text()


# SMTP ---------------------------------------------------------------------

class EhloRecorder:
    """A plaintext SMTP server that records (peer address, EHLO line) and then says 421."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.sendall(b"220 recorder ESMTP\r\n")
                    line = conn.recv(1024).split(b"\r\n")[0]
                    self.seen.append((peer[0], line))
                    conn.sendall(b"421 4.3.2 recorded, bye\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def smtp_login_error(gw: Gateway, account: str, token: str) -> smtplib.SMTPAuthenticationError:
    conn = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30)
    try:
        conn.ehlo("client.example")
        conn.starttls(context=gw.client_context())
        conn.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            conn.login(account, token)
        return info.value
    finally:
        conn.close()


def fresh_access_account(gw: Gateway, new_email, prefix: str, **extra: Any) -> tuple[str, str, str]:
    """An OAuth2 account that already holds a valid access token (no refresh before connecting)."""
    email = new_email(prefix)
    account = email.split("@")[0]
    access, refresh = gw.provider.issue(email, access_lifetime=3600)
    status, body = gw.api("POST", "/v1/account", {
        "account": account, "email": email,
        "oauth2": {"provider": gw.app_id, "auth": {"user": email}, "refreshToken": refresh,
                   "accessToken": access, "expires": time.time() + 3600}, **extra})
    assert status == 200, body
    return account, email, gw.token(account, scopes=["smtp"])


def test_smtp_ehlo_name_follows_the_source_address(gw, new_email):
    """network.ehlo_names: the upstream SMTP server sees EHLO <name of the source address>, from
    that address (the account's static pick)."""
    recorder = EhloRecorder()
    try:
        account, _email, token = fresh_access_account(
            gw, new_email, "ehlo", smtp={"host": "127.0.0.1", "port": recorder.port, "secure": False})
        error = smtp_login_error(gw, account, token)
        assert error.smtp_code == 454
        source = rendezvous(account, POOL)
        assert wait_for(lambda: bool(recorder.seen))
        assert recorder.seen[0] == (source, f"EHLO out{source.rsplit('.', 1)[1]}.gw.test".encode())
    finally:
        recorder.close()


def test_smtp_through_socks5_and_proxy_refusal_gives_454(gw, dovecot, proxies, new_email, smtp_sink):
    """SMTP submission goes through the account's proxy too; a refusing proxy is 454 4.7.0 proxy: ..."""
    dante = proxies["dante_auth"]
    account, email, token = fresh_access_account(
        gw, new_email, "smtps5", proxy=dante.url("socks5", PROXY_USER, PROXY_PASSWORD))
    conn = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30)
    try:
        conn.ehlo("client.example")
        conn.starttls(context=gw.client_context())
        conn.ehlo("client.example")
        code, _text = conn.login(account, token)
        assert code == 235
    finally:
        conn.close()
    assert wait_for(lambda: re.search(rf"SMTP login account={re.escape(account)} .*proxy=socks5://"
                                      rf"{PROXY_USER}:\*\*\*@127\.0\.0\.1:{dante.port} result=ok",
                                      gw.log_text()) is not None), gw.log_tail()

    bad, _email2, token2 = fresh_access_account(
        gw, new_email, "smtpbad", proxy=dante.url("socks5", PROXY_USER, "wrong-smtp-pass"))
    error = smtp_login_error(gw, bad, token2)
    assert error.smtp_code == 454
    assert error.smtp_error.startswith(b"4.7.0 proxy: SOCKS5 authentication refused"), error.smtp_error
    assert "wrong-smtp-pass" not in gw.log_text()
