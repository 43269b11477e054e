"""Logins per second with many clients at once, through the gateway vs direct to Dovecot.

    python -m benchmarks.concurrent_logins [--clients 20] [--logins 10]

Each of N client threads (one account each: Dovecot allows 10 connections per
user and IP) connects with implicit TLS, logs in and logs out M times, through
the gateway (LOGIN with a token) and then direct to Dovecot (XOAUTH2 with a
provider token). Reports logins per second and the median and 95th-percentile
login time for each path. Bounded: N x M logins per path.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Callable

from benchmarks.stack import cpu_seconds, stack


def run(clients: int, logins: int, login: Callable[[int], object]) -> tuple[float, list[float]]:
    """Run ``clients`` threads of ``logins`` sequential logins; (wall seconds, per-login seconds)."""
    times: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(logins):
            start = time.perf_counter()
            conn = login(i)
            elapsed = time.perf_counter() - start
            conn.logout()  # type: ignore[attr-defined]
            with lock:
                times.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return time.perf_counter() - start, times


def describe(name: str, wall: float, times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return (f"{name}: {len(times) / wall:.0f} logins/s, median {statistics.median(times) * 1000:.1f} ms, "
            f"p95 {p95 * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--logins", type=int, default=10)
    args = parser.parse_args()

    with stack("gw-bench-logins-") as st:
        provider, dovecot, gw = st.provider, st.dovecot, st.gateway
        emails = [f"conc{i}@example.com" for i in range(args.clients)]
        tokens = []
        for i, email in enumerate(emails):
            gw.add_oauth_account(f"conc{i}", email)
            tokens.append(gw.token(f"conc{i}"))
        accesses = [provider.issue(email)[0] for email in emails]

        def through(i: int) -> object:
            conn = gw.imap()
            conn.login(f"conc{i}", tokens[i])
            return conn

        def direct(i: int) -> object:
            return dovecot.imap_login(emails[i], accesses[i])

        run(args.clients, 1, through)  # warm-up: the first login of each account refreshes its token
        cpu_before = cpu_seconds(gw.proc.pid)
        g_wall, g_times = run(args.clients, args.logins, through)
        cpu = cpu_seconds(gw.proc.pid) - cpu_before
        d_wall, d_times = run(args.clients, args.logins, direct)
        print(f"{args.clients} clients x {args.logins} logins (connect+TLS+auth):")
        print("  " + describe("gateway", g_wall, g_times))
        print("  " + describe("direct ", d_wall, d_times))
        print(f"  gateway CPU: {cpu / len(g_times) * 1000:.1f} ms per login (client TLS + upstream TLS + token check)")


if __name__ == "__main__":
    main()
