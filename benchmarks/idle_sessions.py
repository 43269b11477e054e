"""Memory per idle relayed IMAP session: RSS growth of the gateway and of a bare TLS relay.

    python -m benchmarks.idle_sessions [--sessions 90]     (e.g. --sessions 1000)

Opens N sessions through the gateway (implicit TLS, LOGIN with a token,
SELECT INBOX), leaves them idle, and reports (RSS with N sessions - RSS after
one warm-up session) / N; logs them out, then does the same through the bare
reference relay (benchmarks/bare_relay.py, the gateway's certificate), where
the client logs in to Dovecot itself with AUTHENTICATE XOAUTH2. Ten sessions
per account, as the gateway's per-account connection limit allows. Dovecot's
limits are raised for 2N + 100 sessions (tests/integration/dovecot.py
max_connections) and the soft open-files limit to the hard one. Bounded:
N sessions per relay, then everything is closed.
"""

from __future__ import annotations

import argparse
import imaplib
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.stack import (bare_relay_like, format_table, gateway, raise_nofile_limit,
                              relay_imap_login, rss_kb, upstreams)

PER_ACCOUNT = 10


@dataclass
class Growth:
    """RSS of one relay process before and after N idle sessions, and how long opening took."""

    relay: str
    sessions: int
    before_kb: int
    after_kb: int
    open_seconds: float

    @property
    def per_session_kb(self) -> float:
        return (self.after_kb - self.before_kb) / self.sessions


def measure(relay: str, pid: int, sessions: int, login: Callable[[int], imaplib.IMAP4],
            conns: list[imaplib.IMAP4]) -> Growth:
    """Open one warm-up and ``sessions`` idle sessions (kept in ``conns``) through process ``pid``.

    ``login(i)`` opens session ``i`` logged in; -1 is the warm-up.
    """
    warm = login(-1)
    warm.select("INBOX")
    conns.append(warm)
    time.sleep(0.5)
    before = rss_kb(pid)
    start = time.perf_counter()
    for i in range(sessions):
        conn = login(i)
        conns.append(conn)
        typ, data = conn.select("INBOX")
        if typ != "OK":
            raise RuntimeError(f"{relay}: SELECT INBOX: {data!r}")
    elapsed = time.perf_counter() - start
    time.sleep(1.0)
    return Growth(relay, sessions, before, rss_kb(pid), elapsed)


def close_all(conns: list[imaplib.IMAP4]) -> None:
    while conns:
        conn = conns.pop()
        try:
            conn.logout()
        except Exception:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=90)
    args = parser.parse_args()
    n = args.sessions
    raise_nofile_limit()

    with upstreams("gw-bench-idle-", max_connections=2 * n + 100) as up, \
            gateway(up) as gw, bare_relay_like(gw) as relay:
        # One account per 10 sessions, plus one for the warm-up session.
        emails = [f"idle{i}@example.com" for i in range((n + PER_ACCOUNT - 1) // PER_ACCOUNT + 1)]
        tokens, accesses = [], []
        for i, email in enumerate(emails):
            gw.add_oauth_account(f"idle{i}", email)
            tokens.append(gw.token(f"idle{i}"))
            accesses.append(up.provider.issue(email, access_lifetime=3600)[0])

        def account(i: int) -> int:
            return i // PER_ACCOUNT if i >= 0 else len(emails) - 1  # the warm-up: the spare one

        def through_gateway(i: int) -> imaplib.IMAP4:
            conn = gw.imap()
            conn.login(f"idle{account(i)}", tokens[account(i)])
            return conn

        def through_relay(i: int) -> imaplib.IMAP4:
            return relay_imap_login(relay, gw, emails[account(i)], accesses[account(i)])

        conns: list[imaplib.IMAP4] = []
        try:
            assert gw.proc is not None
            results = [measure("gateway", gw.proc.pid, n, through_gateway, conns)]
            close_all(conns)
            results.append(measure("bare relay", relay.pid, n, through_relay, conns))
        finally:
            close_all(conns)

    g = results[0]
    print(f"{n} idle sessions: gateway RSS {g.before_kb} KB -> {g.after_kb} KB, "
          f"{g.per_session_kb:.1f} KB per session; opened in {g.open_seconds:.1f} s "
          f"({g.open_seconds / n * 1000:.1f} ms per login+SELECT, sequential)")
    print()
    rows = [[r.relay, str(r.before_kb), str(r.after_kb), f"{r.per_session_kb:.1f}",
             f"{r.open_seconds / n * 1000:.1f}"] for r in results]
    rows.append(["gateway / bare relay", "", "", f"{g.per_session_kb / results[1].per_session_kb:.2f}x", ""])
    print(f"{n} idle IMAP sessions (TLS both legs, logged in, INBOX selected), RSS of the relay process")
    print(format_table(["relay", "RSS before KB", "RSS after KB", "KB per session",
                        "ms per login+SELECT"], rows))


if __name__ == "__main__":
    main()
