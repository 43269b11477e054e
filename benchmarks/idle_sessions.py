"""Memory per idle relayed IMAP session: the gateway's RSS growth for N logged-in, idle sessions.

    python -m benchmarks.idle_sessions [--sessions 200]

Opens N sessions through the gateway (implicit TLS, LOGIN, SELECT INBOX),
leaves them idle, and reports (RSS with N sessions - RSS after one warm-up
session) / N. Bounded: N sessions, then everything is closed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tests.integration.dovecot import Dovecot
from tests.integration.gateway_proc import Gateway
from tests.integration.oauth2_provider import OAuth2Provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=90)  # the test Dovecot allows 100 TLS logins
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gw-bench-idle-"))
    os.chmod(root, 0o755)
    (root / "dovecot").mkdir()
    os.chmod(root / "dovecot", 0o755)
    provider = OAuth2Provider().start()
    dovecot = Dovecot(root / "dovecot", provider).start()
    gw = Gateway(root / "gateway", dovecot, provider)
    conns = []
    try:
        gw.start()
        # Dovecot allows 10 connections per user and IP: one account per 10 sessions.
        accounts = [f"idle{i}" for i in range((args.sessions + 9) // 10 + 1)]
        tokens = {}
        for account in accounts:
            gw.add_oauth_account(account, f"{account}@example.com")
            tokens[account] = gw.token(account)
        warm = gw.imap()
        warm.login(accounts[-1], tokens[accounts[-1]])
        warm.select("INBOX")
        time.sleep(0.5)
        before = gw.rss_kb()
        start = time.perf_counter()
        for i in range(args.sessions):
            account = accounts[i // 10]
            conn = gw.imap()
            conn.login(account, tokens[account])
            conn.select("INBOX")
            conns.append(conn)
        elapsed = time.perf_counter() - start
        time.sleep(1.0)
        after = gw.rss_kb()
        print(f"{args.sessions} idle sessions: gateway RSS {before} KB -> {after} KB, "
              f"{(after - before) / args.sessions:.1f} KB per session; "
              f"opened in {elapsed:.1f} s ({elapsed / args.sessions * 1000:.1f} ms per login+SELECT, sequential)")
    finally:
        for conn in conns:
            try:
                conn.logout()
            except Exception:
                pass
        gw.stop()
        dovecot.stop()
        provider.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
