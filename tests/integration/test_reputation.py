"""Source-address reputation end to end: a real twisted.names DNSBL server on loopback, the gateway's
checks through it, and real SMTP sessions through the gateway to Dovecot's submission service.

The DNS server (`dnsbl_server.py`, a subprocess) serves `bl.test`, which lists 127.0.0.3 (and ::1,
in nibble form) but not 127.0.0.2, `clean.test`, which lists nothing, `hang.test`, whose queries are
never answered, and `fail.test`, which answers SERVFAIL. Dovecot is the judge of the source
address: its `submission-login` and `imap-login` lines carry `rip=`, the address the gateway's
connection came from. The pool is 127.0.0.2 and 127.0.0.3 with the random strategy, so a listed
127.0.0.3 left in SMTP selection would show up in 20 sessions with probability 1 - 2^-20.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import netaddr
import pytest

from .dovecot import Dovecot, _ipv6_loopback, free_port
from .gateway_proc import Gateway, started_gateway, wait_for

SERVER = Path(__file__).with_name("dnsbl_server.py")
TIMEOUT = 2  # reputation.timeout of the gateway under test
POOL = ["127.0.0.2", "127.0.0.3"]
CHECKED = POOL + (["::1"] if _ipv6_loopback() else [])  # ::1 is checked (nibble form), never used here
ZONES = [{"host": "bl.test", "name": "Test BL"}, {"host": "clean.test", "name": "Clean"},
         {"host": "hang.test", "name": "Hanging"}, {"host": "fail.test", "name": "Failing"}]
REASON = "127.0.0.3 sent spam to our traps (test)"
LISTING = {"bl.test": {"listed": {"127.0.0.3": {"code": "127.0.0.2", "reason": REASON},
                                  "::1": {"code": "127.0.0.4", "reason": "IPv6 listing"}}},
           "clean.test": {"listed": {}}, "hang.test": {"mode": "hang"}, "fail.test": {"mode": "servfail"}}
DELISTED = {**LISTING, "bl.test": {"listed": {"::1": LISTING["bl.test"]["listed"]["::1"]}}}
SESSIONS = 20
LOGIN = re.compile(r"(imap|submission)-login: (?:Info: )?Login: user=<([^>]*)>.*?\brip=([0-9A-Fa-f:.]+)")


class DnsblServer:
    """tests/integration/dnsbl_server.py as a subprocess on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_path = workdir / "zones.json"
        self.log_path = workdir / "queries.log"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def write(self, zones: dict[str, Any]) -> None:
        """Replace the served data (atomically: the server re-reads it on its next query)."""
        staging = self.workdir / "zones.json.new"
        staging.write_text(json.dumps({"zones": zones}))
        os.replace(staging, self.data_path)

    def start(self, zones: dict[str, Any], timeout: float = 15.0) -> "DnsblServer":
        self.write(zones)
        self.log_path.touch()
        for _attempt in range(5):  # the UDP port of a free TCP port may be taken: try another
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVER), "--port", str(self.port), "--data", str(self.data_path),
                 "--log", str(self.log_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + timeout
            line = ""
            while time.monotonic() < deadline and self.proc.stdout is not None:
                ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
                if not ready:
                    break
                line = self.proc.stdout.readline()
                if line.strip() == "ready" or not line:
                    break
            if line.strip() == "ready":
                return self
            self.stop()
        raise RuntimeError(f"the DNSBL server did not start: {line}")

    def queries(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def dnsbl() -> Iterator[DnsblServer]:
    workdir = Path(tempfile.mkdtemp(prefix="gw-dnsbl-"))
    server = DnsblServer(workdir)
    try:
        yield server.start(LISTING)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(dovecot, oauth2_provider, dnsbl) -> Iterator[Gateway]:
    network = {"local_addresses": CHECKED, "address_strategy": "random", "hosts": {"localhost": ["127.0.0.1"]},
               "warmup": {"days": 7}}
    reputation = {"zones": ZONES, "nameservers": [f"127.0.0.1:{dnsbl.port}"], "timeout": TIMEOUT}
    # Pooling off: every login is one upstream connection, one source address in Dovecot's log.
    with started_gateway(dovecot, oauth2_provider, "gw-reputation-", network=network, reputation=reputation,
                         imap={"pool": {"idle_ttl": 0}}) as gateway:
        # The scheduled check runs at start-up; the tests compare results of their own checks.
        assert wait_for(lambda: "DNSBL check (schedule)" in gateway.log_text(), timeout=TIMEOUT + 10), (
            gateway.log_tail())
        yield gateway


@pytest.fixture
def listed(gw, dnsbl) -> Iterator[None]:
    """127.0.0.3 listed in bl.test and the gateway's checks up to date; pools back to gateway.yaml's after."""
    dnsbl.write(LISTING)
    status, body = gw.api("POST", "/v1/reputation/check", {"zone": "bl.test"})
    assert status == 200 and [r["listed"] for r in body["results"] if r["address"] == "127.0.0.3"] == [True]
    yield
    gw.api("PUT", "/v1/settings/network", {"localAddresses": None, "accountPools": None})


# Helpers ------------------------------------------------------------------------


def logins(dovecot: Dovecot, email: str, service: str) -> list[str]:
    """Source addresses (rip=) of ``email``'s logins to Dovecot's ``service`` (imap, submission)."""
    text = dovecot.info_log_path.read_text(errors="replace")
    return [rip for kind, user, rip in LOGIN.findall(text) if user == email and kind == service]


def wait_logins(dovecot: Dovecot, email: str, service: str, count: int) -> list[str]:
    assert wait_for(lambda: len(logins(dovecot, email, service)) >= count, timeout=20), (
        f"{len(logins(dovecot, email, service))} of {count} {service} logins of {email}")
    return logins(dovecot, email, service)


def account(gw: Gateway, new_email, prefix: str) -> tuple[str, str, str]:
    email = new_email(prefix)
    account_id = email.split("@")[0]
    gw.add_oauth_account(account_id, email)
    return account_id, email, gw.token(account_id, scopes=["smtp", "imap-proxy"])


def send(gw: Gateway, account_id: str, email: str, token: str, tag: str) -> None:
    conn = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30)
    try:
        conn.ehlo("client.example")
        conn.starttls(context=gw.client_context())
        conn.ehlo("client.example")
        conn.login(account_id, token)
        message = (f"From: {email}\r\nTo: rcpt@example.com\r\nSubject: {tag}\r\n"
                   f"Message-ID: <{tag}@example.com>\r\n\r\nreputation test\r\n").encode()
        assert conn.sendmail(email, ["rcpt@example.com"], message) == {}
    finally:
        conn.quit()


def send_many(gw: Gateway, account_id: str, email: str, token: str, prefix: str) -> None:
    for i in range(SESSIONS):
        send(gw, account_id, email, token, f"{prefix}-{i}-{account_id}")


def imap_login(gw: Gateway, account_id: str, token: str) -> None:
    conn = gw.imap()
    try:
        typ, data = conn.login(account_id, token)
        assert typ == "OK", data
    finally:
        conn.logout()


def by_pair(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["address"], r["zone"]): r for r in results}


# Checks ---------------------------------------------------------------------------


def test_check_reports_listed_clean_and_unknown(gw, dnsbl):
    """All addresses x all zones through the real server: 127.0.0.3 listed in bl.test with its code and
    TXT reason, 127.0.0.2 clean, clean.test clean, hang.test and fail.test unknown (null), never clean."""
    dnsbl.write(LISTING)
    asked = len(dnsbl.queries())
    status, body = gw.api("POST", "/v1/reputation/check")
    assert status == 200
    results = by_pair(body["results"])
    assert set(results) == {(a, z["host"]) for a in CHECKED for z in ZONES}
    assert {k: results[("127.0.0.3", "bl.test")][k] for k in ("listed", "code", "reason")} == {
        "listed": True, "code": "127.0.0.2", "reason": REASON}
    assert results[("127.0.0.2", "bl.test")]["listed"] is False
    for address in CHECKED:
        assert results[(address, "clean.test")]["listed"] is False
        assert (results[(address, "hang.test")]["listed"], results[(address, "hang.test")]["reason"]) == (
            None, f"no answer within {TIMEOUT} s")
        assert results[(address, "fail.test")]["listed"] is None
        assert "SERVFAIL" in results[(address, "fail.test")]["reason"]
    queries = dnsbl.queries()[asked:]
    assert "A 3.0.0.127.bl.test" in queries and "TXT 3.0.0.127.bl.test" in queries
    assert "A 2.0.0.127.bl.test" in queries and "TXT 2.0.0.127.bl.test" not in queries
    if "::1" in CHECKED:
        nibbles = netaddr.IPAddress("::1").reverse_dns.removesuffix(".ip6.arpa.")
        assert f"A {nibbles}.bl.test" in queries
        assert results[("::1", "bl.test")]["listed"] is True and results[("::1", "bl.test")]["code"] == "127.0.0.4"
    assert gw.api("GET", "/v1/reputation") == (200, {"results": sorted(
        body["results"], key=lambda r: (r["address"], r["zone"]))})
    assert gw.metric("gateway_reputation_listed", zone="bl.test") == len(CHECKED) - 1
    assert gw.metric("gateway_reputation_listed", zone="clean.test") == 0
    assert gw.metric("gateway_reputation_checks_total", result="unknown") >= 2 * len(CHECKED)
    assert gw.metric("gateway_reputation_checks_total", result="listed") >= 1
    assert gw.metric("gateway_reputation_excluded") == len(CHECKED) - 1
    assert "Source address 127.0.0.3 is listed in bl.test (127.0.0.2: " + REASON in gw.log_text()


def test_the_hanging_zone_is_unknown_within_its_timeout_for_one_address_and_for_all(gw):
    """hang.test never answers: one address x that zone and all addresses x that zone come back
    unknown with the timeout as the reason (the API answers: the lookups were given up)."""
    status, body = gw.api("POST", "/v1/reputation/check", {"address": "127.0.0.2", "zone": "hang.test"})
    assert status == 200 and [(r["listed"], r["reason"]) for r in body["results"]] == [
        (None, f"no answer within {TIMEOUT} s")]
    status, body = gw.api("POST", "/v1/reputation/check", {"zone": "hang.test"})
    assert status == 200 and {r["address"] for r in body["results"]} == set(CHECKED)
    assert all(r["listed"] is None for r in body["results"])
    status, body = gw.api("POST", "/v1/reputation/check", {"address": "127.0.0.3"})
    assert status == 200 and {r["zone"] for r in body["results"]} == {z["host"] for z in ZONES}


# SMTP selection -------------------------------------------------------------------


def test_a_listed_address_stops_carrying_smtp_and_delisting_brings_it_back(gw, dnsbl, listed, new_email,
                                                                          smtp_sink):
    """127.0.0.3 listed: 20 SMTP sessions all reach Dovecot's submission from 127.0.0.2, while IMAP keeps
    using both; delisted and checked again: SMTP uses 127.0.0.3 again."""
    account_id, email, token = account(gw, new_email, "rep")
    send_many(gw, account_id, email, token, "listed")
    assert set(wait_logins(gw.dovecot, email, "submission", SESSIONS)) == {"127.0.0.2"}
    assert wait_for(lambda: len([m for m in list(smtp_sink.messages) if m.mail_from == email.encode()])
                    >= SESSIONS)
    for _ in range(SESSIONS):
        imap_login(gw, account_id, token)
    assert set(wait_logins(gw.dovecot, email, "imap", SESSIONS)) == set(POOL)  # exclusion is for SMTP only
    _, view = gw.api("GET", f"/v1/account/{account_id}")
    assert view["network"]["excluded"] == [a for a in CHECKED if a != "127.0.0.2"]  # ::1 is listed too

    dnsbl.write(DELISTED)
    status, body = gw.api("POST", "/v1/reputation/check", {"address": "127.0.0.3", "zone": "bl.test"})
    assert status == 200 and [r["listed"] for r in body["results"]] == [False]
    assert gw.metric("gateway_reputation_listed", zone="bl.test") == len(CHECKED) - 2
    assert "Source address 127.0.0.3 is no longer listed in bl.test: back in SMTP selection" in gw.log_text()
    assert gw.api("GET", f"/v1/account/{account_id}")[1]["network"]["excluded"] == [a for a in CHECKED if a not in POOL]
    send_many(gw, account_id, email, token, "delisted")
    after = wait_logins(gw.dovecot, email, "submission", 2 * SESSIONS)[SESSIONS:]
    assert set(after) == set(POOL), after


def test_unknown_answers_do_not_bring_a_listed_address_back(gw, dnsbl, listed, new_email, smtp_sink):
    """127.0.0.3's zone starts failing (SERVFAIL): the listing stands and SMTP still avoids it."""
    dnsbl.write({**LISTING, "bl.test": {"mode": "servfail"}})
    status, body = gw.api("POST", "/v1/reputation/check", {"address": "127.0.0.3", "zone": "bl.test"})
    assert status == 200 and [r["listed"] for r in body["results"]] == [None]
    account_id, email, token = account(gw, new_email, "repunk")
    send_many(gw, account_id, email, token, "unknown")
    assert set(wait_logins(gw.dovecot, email, "submission", SESSIONS)) == {"127.0.0.2"}


def test_a_pool_left_empty_falls_back_to_the_default_pool_then_to_the_os(gw, listed, new_email, smtp_sink):
    """An account pool of only 127.0.0.3 sends from the default pool's 127.0.0.2; a default pool of only
    127.0.0.3 lets the OS choose (127.0.0.1 towards Dovecot on 127.0.0.1); each with a log line."""
    account_id, email, token = account(gw, new_email, "repfb")
    status, _ = gw.api("PUT", "/v1/settings/network", {"accountPools": {account_id: ["127.0.0.3"]}})
    assert status == 200
    send(gw, account_id, email, token, f"fb-account-{account_id}")
    assert wait_logins(gw.dovecot, email, "submission", 1) == ["127.0.0.2"]
    assert wait_for(lambda: f"Every address of the account pool 127.0.0.3 is listed on a DNSBL: SMTP for account "
                            f"{account_id} (and others of that pool) leaves from the default pool" in gw.log_text())
    status, _ = gw.api("PUT", "/v1/settings/network", {"accountPools": None, "localAddresses": ["127.0.0.3"]})
    assert status == 200
    send(gw, account_id, email, token, f"fb-os-{account_id}")
    assert wait_logins(gw.dovecot, email, "submission", 2)[1] == "127.0.0.1"
    assert wait_for(lambda: "is listed on a DNSBL: SMTP for account" in gw.log_text()
                    and "leaves from the operating system's choice" in gw.log_text())


# Zones and warm-up on the live gateway ------------------------------------------------


def test_zones_put_through_the_api_are_checked_at_once_and_exported_as_csv(gw, dnsbl):
    """A zone added with PUT is checked for every address in the background; GET zones.csv lists it."""
    dnsbl.write({**LISTING, "extra.test": {"listed": {"127.0.0.2": {"code": "127.0.0.9"}}}})
    status, body = gw.api("PUT", "/v1/reputation/zones", {"zones": [*ZONES, {"host": "extra.test", "name": "X"}]})
    try:
        assert status == 200 and body["zones"][-1] == {"host": "extra.test", "name": "X"}

        def extra() -> list[dict[str, Any]]:
            return [r for r in gw.api("GET", "/v1/reputation")[1]["results"] if r["zone"] == "extra.test"]
        assert wait_for(lambda: len(extra()) == len(CHECKED), timeout=15), extra()
        assert {r["address"]: r["listed"] for r in extra()}["127.0.0.2"] is True
        import urllib.request
        request = urllib.request.Request(f"http://127.0.0.1:{gw.api_port}/v1/reputation/zones.csv",
                                         headers={"Authorization": f"Bearer {gw.admin_token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert response.read().decode().splitlines()[-1] == "extra.test,X"
    finally:
        status, body = gw.api("PUT", "/v1/reputation/zones", {"zones": None})
        assert status == 200 and body == {"zones": ZONES}
        dnsbl.write(LISTING)
    assert not [r for r in gw.api("GET", "/v1/reputation")[1]["results"] if r["zone"] == "extra.test"]
    assert gw.api("POST", "/v1/reputation/check", {"zone": "bl.test"})[0] == 200


def test_a_new_pool_address_warms_up_and_the_operator_can_skip_it(gw):
    """With network.warmup.days 7, 127.0.0.4 added to the pool starts at 1/7 of its fair share (API and
    metric); skipping gives it its full share; removed, it is forgotten."""
    status, view = gw.api("PUT", "/v1/settings/network", {"localAddresses": [*POOL, "127.0.0.4"]})
    try:
        assert status == 200
        assert view["warmup"]["127.0.0.2"] == {"started": None, "share": 1.0}
        assert view["warmup"]["127.0.0.4"]["started"] is not None
        assert view["warmup"]["127.0.0.4"]["share"] == pytest.approx(1 / 7, abs=1e-3)
        assert gw.metric("gateway_warmup_share", source="127.0.0.4") == pytest.approx(1 / 7, abs=1e-3)
        assert "Source address 127.0.0.4 is new: it warms up over 7 days" in gw.log_text()
        status, body = gw.api("POST", "/v1/settings/network/warmup", {"address": "127.0.0.4", "action": "skip"})
        assert (status, body) == (200, {"address": "127.0.0.4", "started": None, "share": 1.0})
        assert gw.metric("gateway_warmup_share", source="127.0.0.4") == 1.0
        status, body = gw.api("POST", "/v1/settings/network/warmup", {"address": "127.0.0.4", "action": "later"})
        assert status == 400 and body["error"] == "BadRequest"
    finally:
        status, view = gw.api("PUT", "/v1/settings/network", {"localAddresses": None})
    assert status == 200 and "127.0.0.4" not in view["warmup"]
