"""Memory per idle relayed IMAP session: the gateway's RSS growth for N logged-in, idle sessions.

    python -m benchmarks.idle_sessions [--sessions 200]

Opens N sessions through the gateway (implicit TLS, LOGIN, SELECT INBOX),
leaves them idle, and reports (RSS with N sessions - RSS after one warm-up
session) / N. Bounded: N sessions, then everything is closed.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.stack import stack



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=90)  # the test Dovecot allows 100 TLS logins
    args = parser.parse_args()

    with stack("gw-bench-idle-") as st:
        gw = st.gateway
        conns: list = []
        try:
            measure(gw, args.sessions, conns)
        finally:
            for conn in conns:
                try:
                    conn.logout()
                except Exception:
                    pass


def measure(gw, sessions: int, conns: list) -> None:
    """Open ``sessions`` idle sessions (kept in ``conns``) and print the RSS growth per session."""
    # Dovecot allows 10 connections per user and IP: one account per 10 sessions.
    accounts = [f"idle{i}" for i in range((sessions + 9) // 10 + 1)]
    tokens = {}
    for account in accounts:
        gw.add_oauth_account(account, f"{account}@example.com")
        tokens[account] = gw.token(account)
    warm = gw.imap()
    warm.login(accounts[-1], tokens[accounts[-1]])
    warm.select("INBOX")
    conns.append(warm)
    time.sleep(0.5)
    before = gw.rss_kb()
    start = time.perf_counter()
    for i in range(sessions):
        account = accounts[i // 10]
        conn = gw.imap()
        conn.login(account, tokens[account])
        conn.select("INBOX")
        conns.append(conn)
    elapsed = time.perf_counter() - start
    time.sleep(1.0)
    after = gw.rss_kb()
    print(f"{sessions} idle sessions: gateway RSS {before} KB -> {after} KB, "
          f"{(after - before) / sessions:.1f} KB per session; "
          f"opened in {elapsed:.1f} s ({elapsed / sessions * 1000:.1f} ms per login+SELECT, sequential)")

if __name__ == "__main__":
    main()
