"""Login time, FETCH time and relay CPU: direct to Dovecot, through the gateway, through a bare relay.

Run from the repository root after the test command has installed everything:

    python -m benchmarks.imap_fetch [--size-mb 10] [--rounds 20] [--logins 20]

It starts the same real Dovecot and test OAuth2 provider the integration tests
use, the gateway as `twistd -n gateway`, and the reference relay of
benchmarks/bare_relay.py (Twisted port forwarder, TLS both legs with the
gateway's certificate, no parsing, no auth). All three paths use implicit TLS
and imaplib: the gateway with LOGIN (account ID + token), direct and the bare
relay with AUTHENTICATE XOAUTH2 to Dovecot. The gateway runs its default
configuration: with upstream pooling (where the build has it), its logins after
the first reuse an upstream connection (benchmarks/imap_session.py compares
pooling off and on). The paths take turns in every round. Reports the
median login (connect + TLS + auth) and FETCH of one ``--size-mb`` message,
the FETCH time relative to direct, and each relay process's CPU seconds per
GB relayed over the fetches. Bounded: rounds and logins are fixed counts.
"""

from __future__ import annotations

import argparse
import imaplib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.stack import (bare_relay_like, cpu_seconds, format_table, gateway,
                              relay_imap_login, upstreams)
from tests.integration.test_imap_relay import big_message


@dataclass
class Route:
    """One way from the client to Dovecot, and what it measured."""

    name: str
    login: Callable[[], imaplib.IMAP4]
    relay_pid: int | None  # the process relaying the bytes (None: direct)
    logins: list[float] = field(default_factory=list)
    fetches: list[float] = field(default_factory=list)
    relayed: int = 0
    cpu: float = 0.0

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu / (self.relayed / 1e9)


def timed_fetch(conn: imaplib.IMAP4) -> tuple[float, int]:
    start = time.perf_counter()
    typ, data = conn.fetch("1", "(BODY.PEEK[])")
    elapsed = time.perf_counter() - start
    assert typ == "OK" and isinstance(data[0], tuple)
    return elapsed, len(data[0][1])


def measure_logins(paths: list[Route], logins: int) -> None:
    for _ in range(logins):
        for p in paths:
            start = time.perf_counter()
            conn = p.login()
            p.logins.append(time.perf_counter() - start)
            conn.logout()


def measure_fetches(paths: list[Route], rounds: int) -> None:
    conns = []
    for p in paths:
        conn = p.login()
        conn.select("INBOX", readonly=True)
        conns.append(conn)
    try:
        before = [cpu_seconds(p.relay_pid) if p.relay_pid else 0.0 for p in paths]
        for _ in range(rounds):
            for p, conn in zip(paths, conns):
                elapsed, n = timed_fetch(conn)
                p.fetches.append(elapsed)
                p.relayed += n
        for p, start in zip(paths, before):
            if p.relay_pid:
                p.cpu = cpu_seconds(p.relay_pid) - start
    finally:
        for conn in conns:
            conn.logout()


def report(paths: list[Route], size: int, rounds: int, logins: int) -> str:
    direct, gw, bare = paths
    d = statistics.median(direct.fetches)
    rows = []
    for p in paths:
        f = statistics.median(p.fetches)
        rows.append([p.name, f"{statistics.median(p.logins) * 1000:.1f}", f"{f * 1000:.0f}",
                     f"{size / 1e6 / f:.0f}", f"{f / d:.2f}x",
                     f"{p.cpu:.2f}" if p.relay_pid else "-",
                     f"{p.cpu_per_gb:.2f}" if p.relay_pid else "-"])
    header = ["path", "login median ms", "FETCH median ms", "MB/s", "FETCH time/direct",
              "relay CPU s", "relay CPU s/GB"]
    return "\n".join([
        f"Login: median of {logins}; FETCH BODY.PEEK[] of {size / 1e6:.1f} MB: median of {rounds};"
        f" relay CPU over the {rounds} fetches ({gw.relayed / 1e6:.0f} MB per relay)",
        format_table(header, rows),
        f"gateway CPU s/GB / bare relay CPU s/GB = {gw.cpu_per_gb / bare.cpu_per_gb:.2f}x",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)  # 210 MB: CPU clock ticks are 10 ms
    parser.add_argument("--logins", type=int, default=20)
    args = parser.parse_args()

    with upstreams("gw-bench-") as up, gateway(up) as gw, bare_relay_like(gw) as relay:
        email = "bench@example.com"
        gw.add_oauth_account("bench", email, access_lifetime=3600)
        token = gw.token("bench")
        access, _ = up.provider.issue(email, access_lifetime=3600)
        message = big_message(args.size_mb * 1024 * 1024)
        up.dovecot.append(email, "INBOX", message)

        def through_gateway() -> imaplib.IMAP4:
            conn = gw.imap()
            conn.login("bench", token)
            return conn

        assert gw.proc is not None
        paths = [
            Route("direct", lambda: up.dovecot.imap_login(email, access), None),
            Route("gateway", through_gateway, gw.proc.pid),
            Route("bare relay", lambda: relay_imap_login(relay, gw, email, access), relay.pid),
        ]
        through_gateway().logout()  # warm-up: the account's first login refreshes its token
        measure_logins(paths, args.logins)
        measure_fetches(paths, args.rounds)
        print(report(paths, paths[0].relayed // args.rounds, args.rounds, args.logins))


if __name__ == "__main__":
    main()
