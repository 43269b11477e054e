"""Whole IMAP sessions one after another: direct to Dovecot vs through the gateway, pooling off and on.

    python -m benchmarks.imap_session [--sessions 200] [--round 20]

A session is TCP connect + TLS + login + SELECT INBOX + LOGOUT with imaplib,
the next one starting when the previous has logged out. Variants:

  direct          implicit TLS to Dovecot's imaps port, AUTHENTICATE XOAUTH2
                  with an access token the test provider issued;
  gateway cold    a gateway with upstream pooling off (imap.pool.idle_ttl: 0):
                  every login opens a new upstream connection;
  gateway pooled  a gateway with pooling on (its defaults): a login may reuse
                  the upstream connection an earlier session of the account left;
  pooled, json    (with --json-log) the same with log.format: json: what the
                  JSON log lines (session start, login, session end) cost.

Each variant has its own account, so per-user limits never interfere. The
variants take turns, ``--round`` sessions each (rotating who goes first), so
machine noise hits all of them alike. Reports the median and p99 session
time, the median of the login step alone (connect + TLS + login), the ratios
to direct, and each gateway's CPU per session. With a build that refuses the
pool keys, the cold row is a plain gateway (no pooling exists) and the pooled
row says so. Bounded: --sessions per variant, after two warm-up sessions each.
"""

from __future__ import annotations

import argparse
import imaplib
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.stack import (POOLING_UNAVAILABLE, cpu_seconds, format_table, gateway, percentile,
                              pooling_gateway, upstreams)
from tests.integration.gateway_proc import Gateway

WARM_UP = 2


@dataclass
class Variant:
    """One way to run a session, and what it measured."""

    name: str
    login: Callable[[], imaplib.IMAP4] | None  # None: not available in this build
    relay_pid: int | None = None  # the gateway process whose CPU is counted
    logins: list[float] = field(default_factory=list)
    sessions: list[float] = field(default_factory=list)
    cpu: float = 0.0

    def session(self) -> tuple[float, float]:
        """Run one whole session; (login step seconds, session seconds)."""
        assert self.login is not None
        start = time.perf_counter()
        conn = self.login()
        logged_in = time.perf_counter()
        typ, data = conn.select("INBOX")
        if typ != "OK":
            raise RuntimeError(f"{self.name}: SELECT INBOX: {data!r}")
        conn.logout()
        return logged_in - start, time.perf_counter() - start


def gateway_login(gw: Gateway, account: str, email: str) -> Callable[[], imaplib.IMAP4]:
    """Create ``account`` on ``gw``; a function logging in to it with LOGIN account token."""
    gw.add_oauth_account(account, email, access_lifetime=3600)
    token = gw.token(account)

    def login() -> imaplib.IMAP4:
        conn = gw.imap()
        conn.login(account, token)
        return conn
    return login


def run(variants: list[Variant], sessions: int, per_round: int) -> None:
    """Warm up, then run the available variants in turns of ``per_round`` sessions."""
    active = [v for v in variants if v.login is not None]
    for v in active:
        for _ in range(WARM_UP):
            v.session()
    before = {id(v): cpu_seconds(v.relay_pid) for v in active if v.relay_pid}
    done = 0
    turn = 0
    while done < sessions:
        count = min(per_round, sessions - done)
        order = active[turn % len(active):] + active[:turn % len(active)]
        for v in order:
            for _ in range(count):
                login, total = v.session()
                v.logins.append(login)
                v.sessions.append(total)
        done += count
        turn += 1
    for v in active:
        if v.relay_pid:
            v.cpu = cpu_seconds(v.relay_pid) - before[id(v)]


def report(variants: list[Variant], sessions: int, per_round: int) -> str:
    direct = variants[0]
    d_median, d_p99 = statistics.median(direct.sessions), percentile(direct.sessions, 0.99)
    rows = []
    for v in variants:
        if v.login is None:
            rows.append([v.name, POOLING_UNAVAILABLE])
            continue
        median, p99 = statistics.median(v.sessions), percentile(v.sessions, 0.99)
        rows.append([
            v.name, str(len(v.sessions)), f"{median * 1000:.1f}", f"{p99 * 1000:.1f}",
            f"{statistics.median(v.logins) * 1000:.1f}",
            f"{median / d_median:.2f}x", f"{p99 / d_p99:.2f}x",
            f"{v.cpu / len(v.sessions) * 1000:.1f}" if v.relay_pid else "-",
        ])
    header = ["variant", "sessions", "median ms", "p99 ms", "login median ms",
              "median/direct", "p99/direct", "gateway CPU ms/session"]
    title = (f"IMAP session = connect + TLS + login + SELECT INBOX + LOGOUT, sequential, "
             f"{sessions} per variant in turns of {per_round}")
    return title + "\n" + format_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200, help="sessions per variant")
    parser.add_argument("--round", type=int, default=20, help="sessions of one variant per turn")
    parser.add_argument("--json-log", action="store_true", help="add a pooled gateway logging JSON lines")
    args = parser.parse_args()

    with ExitStack() as running:
        up = running.enter_context(upstreams("gw-bench-session-"))
        email = "session-direct@example.com"
        access, _ = up.provider.issue(email, access_lifetime=3600)
        variants = [Variant("direct", lambda: up.dovecot.imap_login(email, access))]

        cold = running.enter_context(pooling_gateway(up, "gateway-cold", pooling=False))
        cold_name = "gateway, pooling off"
        if cold is None:  # a build without pooling: every login is cold anyway
            cold = running.enter_context(gateway(up, "gateway-cold"))
            cold_name = "gateway (build without pooling)"
        variants.append(Variant(cold_name, gateway_login(cold, "cold", "session-cold@example.com"),
                                cold.proc.pid if cold.proc else None))

        pooled = running.enter_context(pooling_gateway(up, "gateway-pooled", pooling=True))
        if pooled is None:
            variants.append(Variant("gateway, pooling on", None))
        else:
            variants.append(Variant("gateway, pooling on",
                                    gateway_login(pooled, "pooled", "session-pooled@example.com"),
                                    pooled.proc.pid if pooled.proc else None))

        if args.json_log:
            logged = running.enter_context(gateway(up, "gateway-json", log={"format": "json"}))
            variants.append(Variant("gateway, pooling on, log json",
                                    gateway_login(logged, "jsonlog", "session-json@example.com"),
                                    logged.proc.pid if logged.proc else None))

        run(variants, args.sessions, args.round)
        print(report(variants, args.sessions, args.round))


if __name__ == "__main__":
    main()
