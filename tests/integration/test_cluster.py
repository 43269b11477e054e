"""More than one gateway: two gateway processes on one real redis-server, behind a real HAProxy with
the PROXY protocol, in front of the suite's Dovecot.

A token made on A logs in through B and a revocation on B holds on A at once; 40 parallel logins
of one account over both never exceed the cap upstream; an access token refresh asked for by both
at once reaches the provider once; A killed: its clients reconnect through HAProxy to B with the
same token; redis-server restarted: both recover by themselves; `gateway store copy` SQLite ->
Redis -> SQLite leaves identical data."""

from __future__ import annotations

import imaplib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from .dovecot import free_port
from .gateway_proc import Gateway, _SourcedIMAP4_SSL, wait_for
from .haproxy import HAProxy
from .redis_server import RedisServer
from .test_imap_pool import upstream_sessions


class Cluster:
    def __init__(self, a: Gateway, b: Gateway, haproxy: HAProxy, fronts: list[int], redis: RedisServer) -> None:
        self.a, self.b, self.haproxy, self.fronts, self.redis = a, b, haproxy, fronts, redis
        self.front = fronts[0]  # HAProxy's port balancing over both

    def via_haproxy(self) -> imaplib.IMAP4_SSL:
        return _SourcedIMAP4_SSL("127.0.0.1", self.front, ssl_context=self.a.client_context(), source=None,
                                 timeout=30)


@contextmanager
def cluster(dovecot, oauth2_provider, redis: RedisServer, db: int = 1, fronts: tuple[tuple[int, ...], ...] = ((0, 1),),
            root: Path | None = None, **overrides: Any) -> Iterator[Cluster]:
    """Gateways A and B on ``redis``'s database ``db`` (flushed), sharing the secret key and the TLS
    certificate (what a cluster shares), each with a direct listener and a haproxy:ssl: one; HAProxy
    with one frontend per entry of ``fronts`` (which gateways it balances over: 0 is A, 1 is B)."""
    redis.flush(db)
    root = root or Path(tempfile.mkdtemp(prefix="gw-cluster-"))
    shared = root / "shared"
    shared.mkdir(parents=True)
    gateways = []
    haproxy = HAProxy(root / "haproxy")
    behind = []
    try:
        for name in ("a", "b"):
            gw = Gateway(root / name, dovecot, oauth2_provider, store=redis.url(db), **overrides)
            gw.config["secret_key_file"] = str(shared / "secret.key")
            gw.config["tls"] = {"cert": str(shared / "gw.pem"), "key": str(shared / "gw.key")}
            proxied = free_port()
            gw.config["imap"]["listen"] = gw.config["imap"]["listen"] + [f"haproxy:ssl:{proxied}:interface=127.0.0.1"]
            behind.append(proxied)
            gateways.append(gw)
        a, b = gateways
        a.start()
        (root / "b").mkdir(exist_ok=True)
        for ca in ("gateway-ca.pem",):  # B's clients trust the same CA (the certificate is shared)
            shutil.copy(shared / ca, root / "b" / ca)
            shutil.copy(shared / ca, root / "a" / ca)
        b.start()
        ports = [haproxy.balance([behind[i] for i in which]) for which in fronts]
        haproxy.start()
        yield Cluster(a, b, haproxy, ports, redis)
    finally:
        haproxy.stop()
        for gw in gateways:
            gw.stop()
        shutil.rmtree(root, ignore_errors=True)


def login(gw_or_cluster: Any, account: str, token: str) -> imaplib.IMAP4_SSL:
    conn = gw_or_cluster.via_haproxy() if isinstance(gw_or_cluster, Cluster) else gw_or_cluster.imap()
    conn.login(account, token)
    return conn


def refused(gw: Gateway, account: str, token: str) -> str | None:
    """The NO text of a login, or None when it worked."""
    conn = gw.imap()
    try:
        conn.login(account, token)
    except imaplib.IMAP4.error as e:
        return str(e)
    finally:
        try:
            conn.shutdown()
        except OSError:
            pass
    return None


@pytest.fixture(scope="module")
def two(dovecot, oauth2_provider, redis_server) -> Iterator[Cluster]:
    with cluster(dovecot, oauth2_provider, redis_server, db=15,
                 imap={"max_connections_per_account": 3, "limit_wait": 2}) as c:
        yield c


def test_a_token_made_on_a_logs_in_on_b_and_a_revocation_on_b_holds_on_a(two: Cluster, new_email) -> None:
    email = new_email("clustertok")
    account = email.split("@")[0]
    two.a.add_oauth_account(account, email)
    token = two.a.token(account)
    conn = login(two.b, account, token)
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()
    token_id = next(t["id"] for t in two.b.api("GET", f"/v1/tokens/account/{account}")[1]["tokens"])
    assert two.b.api("DELETE", f"/v1/token/{token_id}")[0] == 200
    started = time.monotonic()
    assert wait_for(lambda: refused(two.a, account, token) is not None, timeout=1.0)
    assert "Invalid credentials" in (refused(two.a, account, token) or "")
    assert time.monotonic() - started < 5  # generous: the assertion above already bounded it to 1 s


def test_the_cap_holds_across_both_gateways(two: Cluster, new_email) -> None:
    """40 logins of one account at once, 20 on each gateway, cap 3: Dovecot never sees more than 3
    sessions of the user; the others wait for a slot or get the cap's answer."""
    email = new_email("clustercap")
    account = email.split("@")[0]
    two.a.add_oauth_account(account, email)
    token = two.a.token(account)
    login(two.a, account, token).logout()  # token refreshed once before the crowd
    peak = [0]
    results: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            peak[0] = max(peak[0], upstream_sessions(two.a, email))
            time.sleep(0.05)

    def one(gw: Gateway) -> None:
        try:
            conn = login(gw, account, token)
            conn.select("INBOX")
            time.sleep(0.3)  # hold the session a little so the crowd overlaps
            conn.logout()
            results.append("ok")
        except imaplib.IMAP4.error as e:
            results.append(str(e))
        except OSError as e:
            results.append(f"error {e}")

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=one, args=(two.a if i % 2 else two.b,)) for i in range(40)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    stop.set()
    sampler.join(10)
    assert len(results) == 40
    assert all(r == "ok" or "Too many connections for this account" in r for r in results), results
    assert results.count("ok") >= 3
    assert 1 <= peak[0] <= 3, peak[0]


def test_one_refresh_for_both_gateways(two: Cluster, new_email, oauth2_provider, monkeypatch) -> None:
    """Both gateways need a new access token at the same moment: the provider (rotating refresh
    tokens) sees one refresh, never the same refresh token twice."""
    monkeypatch.setattr(oauth2_provider, "rotate_refresh", True)
    email = new_email("clusterrefresh")
    account = email.split("@")[0]
    refresh = two.a.add_oauth_account(account, email)  # no access token yet: every login needs one
    token = two.a.token(account)
    before = len(oauth2_provider.token_requests("refresh_token"))
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def one(gw: Gateway) -> None:
        barrier.wait(10)
        try:
            login(gw, account, token).logout()
            outcomes.append("ok")
        except (imaplib.IMAP4.error, OSError) as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=one, args=(gw,)) for gw in (two.a, two.b) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes == ["ok"] * 6, outcomes
    asked = [r for r in oauth2_provider.token_requests("refresh_token")[before:]
             if r.form.get("refresh_token") == refresh]
    assert len(asked) == 1, asked
    assert oauth2_provider.reused_refresh == []


def test_a_killed_gateway_s_clients_reconnect_through_haproxy_to_the_other(dovecot, oauth2_provider,
                                                                           redis_server, new_email) -> None:
    with cluster(dovecot, oauth2_provider, redis_server, db=14) as c:
        email = new_email("clusterkill")
        account = email.split("@")[0]
        c.a.add_oauth_account(account, email)
        token = c.a.token(account)
        sessions = [login(c, account, token) for _ in range(4)]  # round-robin: two on each
        assert all(s.select("INBOX")[0] == "OK" for s in sessions)
        assert c.a.proc is not None
        c.a.proc.send_signal(signal.SIGKILL)
        c.a.proc.wait(10)
        survivors, lost = [], 0
        for s in sessions:
            try:
                s.noop()
                survivors.append(s)
            except (imaplib.IMAP4.abort, OSError):
                lost += 1
        assert lost == 2 and len(survivors) == 2
        for _ in range(lost):  # the clients of A log in again, same token, through HAProxy
            again = login(c, account, token)
            assert again.select("INBOX")[0] == "OK"
            again.logout()
        for s in survivors:
            assert s.noop()[0] == "OK"
            s.logout()


def test_a_redis_restart_is_survived_without_restarting_the_gateways(dovecot, oauth2_provider,
                                                                      new_email, tmp_path) -> None:
    """Redis down: a login that needs the store is answered NO [UNAVAILABLE] with the reason, a live
    relayed session keeps working; Redis back: logins work again on both gateways."""
    persistent = RedisServer(tmp_path / "redis", persist=True)  # the data outlives the restart
    persistent.start()
    try:
        with cluster(dovecot, oauth2_provider, persistent, db=0) as c:
            email = new_email("redisdown")
            account = email.split("@")[0]
            c.a.add_oauth_account(account, email)
            token = c.a.token(account)
            live = login(c.b, account, token)
            assert live.select("INBOX")[0] == "OK"
            persistent.stop()
            answer = refused(c.a, account, token)
            assert answer is not None and "[UNAVAILABLE]" in answer and "store" in answer, answer
            assert live.noop()[0] == "OK"  # the relayed session does not need the store
            persistent.start()
            for gw in (c.a, c.b):
                assert wait_for(lambda: refused(gw, account, token) is None, timeout=15), gw.log_tail()
            live.logout()
    finally:
        persistent.stop()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_store_copy_sqlite_to_redis_to_sqlite_is_identical(dovecot, oauth2_provider, redis_server,
                                                           new_email, tmp_path) -> None:
    from .gateway_proc import started_gateway

    with started_gateway(dovecot, oauth2_provider, "gw-copy-") as gw:
        email = new_email("copy")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        token = gw.token(account, cidrs=["127.0.0.0/8"])
        login(gw, account, token).logout()  # state, tokens, refreshed access token
        source = f"sqlite:{gw.workdir / 'gateway.db'}"
        key = gw.config["secret_key_file"]
        redis_server.flush(13)
        config = tmp_path / "gateway.yaml"
        config.write_text(json.dumps({"store": f"sqlite:{tmp_path / 'back.db'}", "secret_key_file": key}))
        there = _cli(config, "store", "copy", "--from", source, "--to", redis_server.url(13))
        assert there.returncode == 0, there.stderr
        again = _cli(config, "store", "copy", "--from", source, "--to", redis_server.url(13))  # idempotent
        assert again.returncode == 0 and again.stdout == there.stdout, again.stderr
        back = _cli(config, "store", "copy", "--from", redis_server.url(13), "--to", f"sqlite:{tmp_path / 'back.db'}")
        assert back.returncode == 0, back.stderr
        assert there.stdout == back.stdout  # the same counts and checksums, kind by kind
        assert "tokens: 2 copied" in there.stdout and "accounts: 1 copied" in there.stdout
        assert "secret" not in there.stdout.lower().replace("secret key", "")
        # the copy is a working store: the CLI on it finds the account and the token works
        listed = _cli(config, "token", "list", "--account", account)
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1


def test_the_contrib_haproxy_configuration_is_valid(tmp_path) -> None:
    """contrib/haproxy.cfg, as shipped, passes HAProxy's own check without a warning."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    config = Path(__file__).resolve().parents[2] / "contrib" / "haproxy.cfg"
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    assert "send-proxy-v2" in config.read_text()
