"""What an operator sees: metric values after a scripted session, JSON log lines, the client's
address forwarded upstream (upstream.forward_client_ip) as the real Dovecot logs it."""

from __future__ import annotations

import imaplib
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from .dovecot import Dovecot
from .gateway_proc import Gateway, started_gateway, wait_for

LOGIN_LINE = re.compile(r"Login: user=<([^>]*)>.*?\brip=([0-9A-Fa-f:.]+)")


def _logout(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except (imaplib.IMAP4.abort, OSError):
        pass


def test_metrics_after_a_scripted_session(gateway: Gateway, new_email) -> None:
    """One good login with a few commands, one bad token, one token of the wrong scope: each
    counter, histogram and gauge moves by exactly what happened."""
    email = new_email("metrics")
    account_id = email.split("@")[0]
    gateway.add_oauth_account(account_id, email)
    good = gateway.token(account_id)
    smtp_only = gateway.token(account_id, scopes=["smtp"])
    m = gateway.metric
    before = {
        "ok": m("gateway_logins_total", protocol="imap", result="ok", reason=""),
        "bad": m("gateway_logins_total", protocol="imap", result="fail", reason="bad-token"),
        "scope": m("gateway_logins_total", protocol="imap", result="fail", reason="scope"),
        "sessions": m("gateway_sessions_total", protocol="imap"),
        "login_count": m("gateway_login_seconds_count", protocol="imap"),
        "connect_count": m("gateway_upstream_connect_seconds_count", protocol="imap", result="ok"),
        "upstream_login": m("gateway_upstream_login_seconds_count", protocol="imap", result="ok"),
        "refreshes": m("gateway_oauth2_refreshes_total", result="ok"),
        "up": m("gateway_relayed_bytes_total", protocol="imap", direction="to_upstream"),
        "down": m("gateway_relayed_bytes_total", protocol="imap", direction="to_client"),
        "active": m("gateway_sessions_active", protocol="imap"),
    }

    conn = gateway.imap()
    conn.login(account_id, good)
    assert m("gateway_sessions_active", protocol="imap") == before["active"] + 1
    assert m("gateway_source_address_connections", protocol="imap", source="127.0.0.1") >= 1
    conn.select("INBOX")
    conn.noop()
    _logout(conn)
    for wrong in ("0" * 64, smtp_only):
        bad = gateway.imap()
        with pytest.raises(imaplib.IMAP4.error):
            bad.login(account_id, wrong)
        _logout(bad)

    assert wait_for(lambda: m("gateway_sessions_active", protocol="imap") == before["active"])
    assert m("gateway_logins_total", protocol="imap", result="ok", reason="") == before["ok"] + 1
    assert m("gateway_logins_total", protocol="imap", result="fail", reason="bad-token") == before["bad"] + 1
    assert m("gateway_logins_total", protocol="imap", result="fail", reason="scope") == before["scope"] + 1
    assert m("gateway_sessions_total", protocol="imap") == before["sessions"] + 3
    assert m("gateway_login_seconds_count", protocol="imap") == before["login_count"] + 1
    # A new account: its first login opened a connection and refreshed its token once.
    assert m("gateway_upstream_connect_seconds_count", protocol="imap", result="ok") == before["connect_count"] + 1
    assert m("gateway_upstream_login_seconds_count", protocol="imap", result="ok") == before["upstream_login"] + 1
    assert m("gateway_oauth2_refreshes_total", result="ok") == before["refreshes"] + 1
    # SELECT, NOOP (LOGOUT is answered by the gateway when pooling) went up, their answers came down.
    assert m("gateway_relayed_bytes_total", protocol="imap", direction="to_upstream") >= \
        before["up"] + len(b"a SELECT INBOX\r\n") + len(b"a NOOP\r\n")
    assert m("gateway_relayed_bytes_total", protocol="imap", direction="to_client") > before["down"] + 40
    assert m("process_resident_memory_bytes") > 0  # the process collector is in the registry


def test_json_log_lines_parse_and_carry_no_secret(dovecot, oauth2_provider, new_email) -> None:
    """With log.format: json every line is one JSON object with time, level and event; the login,
    session start and session end lines carry their fields; no token or refresh token appears."""
    with started_gateway(dovecot, oauth2_provider, "gw-jsonlog-", log={"format": "json"}) as gw:
        email = new_email("json")
        account_id = email.split("@")[0]
        refresh = gw.add_oauth_account(account_id, email)
        token = gw.token(account_id)
        conn = gw.imap()
        conn.login(account_id, token)
        conn.select("INBOX")
        _logout(conn)
        bad = gw.imap()
        with pytest.raises(imaplib.IMAP4.error):
            bad.login(account_id, "f" * 64)
        _logout(bad)

        def events() -> list[dict]:
            return [json.loads(line) for line in gw.log_text().splitlines() if line.strip()]

        assert wait_for(lambda: sum(1 for e in events() if e["event"] == "session.end") >= 2), gw.log_tail()
        lines = events()  # json.loads above: every line parses
        for record in lines:
            assert {"time", "level", "event", "message"} <= set(record), record
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
        logins = [e for e in lines if e["event"] == "login"]
        ok = next(e for e in logins if e["result"] == "ok")
        assert ok["account"] == account_id and ok["proto"] == "IMAP" and ok["ms"] >= 0
        assert ok["upstream"] == f"localhost:{dovecot.imaps_port}"
        failed = next(e for e in logins if e["result"] == "fail")
        assert failed["reason"] == "bad-token"
        ends = [e for e in lines if e["event"] == "session.end"]
        relayed = next(e for e in ends if e["account"] == account_id)
        assert relayed["to_upstream"] > 0 and relayed["to_client"] > 0 and relayed["seconds"] >= 0
        assert any(e["event"] == "session.start" for e in lines)
        assert {e["proto"] for e in lines if e["event"] == "listening"} >= {"IMAP", "SMTP", "API"}
        text = gw.log_text()
        for secret in (token, refresh, gw.admin_token, "f" * 64):
            assert secret not in text


def test_forward_client_ip_reaches_dovecot(oauth2_provider, new_email) -> None:
    """upstream.forward_client_ip: Dovecot (login_trusted_networks covering the gateway) logs the
    client's address as rip=, not the gateway's; a pooled connection is reused only by a client of
    the address it was opened for. Without the option Dovecot sees the gateway's own address."""
    root = Path(tempfile.mkdtemp(prefix="gw-fwdip-"))
    root.chmod(0o755)
    (root / "dovecot").mkdir()
    (root / "dovecot").chmod(0o755)
    trusting = Dovecot(root / "dovecot", oauth2_provider, submission=False,
                       extra_config="login_trusted_networks = 127.0.0.0/8\n")
    forwarding = Gateway(root / "fwd", trusting, oauth2_provider, upstream={"forward_client_ip": True})
    plain = Gateway(root / "plain", trusting, oauth2_provider)

    def rips(email: str) -> list[str]:
        text = trusting.info_log_path.read_text(errors="replace")
        return [rip for user, rip in LOGIN_LINE.findall(text) if user == email]

    try:
        trusting.start()
        forwarding.start()
        plain.start()
        email = new_email("fwd")
        account_id = email.split("@")[0]
        forwarding.add_oauth_account(account_id, email)
        token = forwarding.token(account_id)
        for source in ("127.0.0.7", "127.0.0.8", "127.0.0.7"):
            conn = forwarding.imap(source=source)
            conn.login(account_id, token)
            conn.noop()
            _logout(conn)
            assert wait_for(lambda: forwarding.metric("gateway_upstream_connections", protocol="imap",
                                                      state="busy") == 0)
        assert wait_for(lambda: len(rips(email)) >= 2)
        # The third login (127.0.0.7 again) reused the first one's connection: no third upstream login.
        assert rips(email) == ["127.0.0.7", "127.0.0.8"], trusting.log_tail()
        pooled = [line for line in forwarding.log_text().splitlines() if " login " in line and "pooled=" in line]
        assert [("client=127.0.0.8" in line, "pooled=yes" in line) for line in pooled] == \
            [(False, False), (True, False), (False, True)], pooled

        other = new_email("nofwd")
        other_id = other.split("@")[0]
        plain.add_oauth_account(other_id, other)
        conn = plain.imap(source="127.0.0.7")
        conn.login(other_id, plain.token(other_id))
        _logout(conn)
        assert wait_for(lambda: rips(other) == ["127.0.0.1"]), trusting.log_tail()
    finally:
        for gw in (forwarding, plain):
            gw.stop()
        trusting.stop()
        shutil.rmtree(root, ignore_errors=True)
