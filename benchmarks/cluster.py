"""One gateway vs two behind HAProxy (same Redis, same Dovecot), and what Redis costs a login.

    python -m benchmarks.cluster [--sessions 400] [--clients 16] [--sequential 100]

Throughput: ``--clients`` threads each run whole IMAP sessions (TLS connect + LOGIN + SELECT INBOX
+ LOGOUT, one account per thread, pooling on) through a HAProxy frontend that balances over one
gateway, then over two, taking turns in rounds so machine noise hits both alike; reports sessions
per second and the session time (median, p99).

Store cost: one client, sessions one after another straight to a gateway on SQLite and to one on
Redis (same build, same Dovecot), in turns; the login step's median and the difference in ms.
Bounded: ``--sessions`` per throughput variant, ``--sequential`` per store variant.
"""

from __future__ import annotations

import argparse
import imaplib
import statistics
import threading
import time
from contextlib import ExitStack
from typing import Callable

from benchmarks.stack import cpu_seconds, format_table, gateway, percentile, upstreams
from tests.integration.gateway_proc import Gateway, _SourcedIMAP4_SSL
from tests.integration.redis_server import RedisServer
from tests.integration.test_cluster import cluster


def session(connect: Callable[[], imaplib.IMAP4_SSL], account: str, token: str) -> tuple[float, float]:
    """(login step seconds, whole session seconds)."""
    start = time.perf_counter()
    conn = connect()
    conn.login(account, token)
    logged_in = time.perf_counter()
    conn.select("INBOX")
    conn.logout()
    return logged_in - start, time.perf_counter() - start


def crowd(connect: Callable[[], imaplib.IMAP4_SSL], logins: list[tuple[str, str]], total: int
          ) -> tuple[float, list[float]]:
    """``total`` sessions by len(logins) threads at once; (wall seconds, session times)."""
    times: list[float] = []
    lock = threading.Lock()
    left = [total]

    def worker(account: str, token: str) -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            _login, whole = session(connect, account, token)
            with lock:
                times.append(whole)

    threads = [threading.Thread(target=worker, args=login) for login in logins]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return time.perf_counter() - started, times


def accounts(gw: Gateway, prefix: str, n: int) -> list[tuple[str, str]]:
    made = []
    for i in range(n):
        account = f"{prefix}{i}"
        gw.add_oauth_account(account, f"{account}@example.com", access_lifetime=3600)
        made.append((account, gw.token(account)))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400, help="sessions per throughput variant")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--round", type=int, default=100, help="sessions of one variant per turn")
    parser.add_argument("--sequential", type=int, default=100, help="sessions per store variant")
    args = parser.parse_args()

    with ExitStack() as running:
        up = running.enter_context(upstreams("gw-bench-cluster-", max_connections=4 * args.clients + 20))
        redis = RedisServer(up.root / "redis").start()
        running.callback(redis.stop)
        two = running.enter_context(cluster(up.dovecot, up.provider, redis, db=1, fronts=((0,), (0, 1)),
                                            root=up.root / "cluster"))
        a, nodes = two.a, [two.a, two.b]
        one_front, two_front = two.fronts

        def via(port: int) -> Callable[[], imaplib.IMAP4_SSL]:
            return lambda: _SourcedIMAP4_SSL("127.0.0.1", port, ssl_context=a.client_context(), source=None,
                                             timeout=30)

        variants = {"one gateway behind HAProxy": (via(one_front), accounts(a, "one", args.clients)),
                    "two gateways behind HAProxy": (via(two_front), accounts(a, "two", args.clients))}
        results: dict[str, tuple[float, list[float]]] = {name: (0.0, []) for name in variants}
        cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in variants}  # gateway A, B CPU seconds
        pids = [gw.proc.pid for gw in nodes if gw.proc is not None]
        for connect, logins in variants.values():
            crowd(connect, logins, 2 * args.clients)  # warm up: every account's upstream exists
        done = 0
        turn = 0
        while done < args.sessions:
            count = min(args.round, args.sessions - done)
            names = list(variants)[turn % 2:] + list(variants)[:turn % 2]
            for name in names:
                connect, logins = variants[name]
                before = [cpu_seconds(pid) for pid in pids]
                wall, times = crowd(connect, logins, count)
                for i, pid in enumerate(pids):
                    cpu[name][i] += cpu_seconds(pid) - before[i]
                results[name] = (results[name][0] + wall, results[name][1] + times)
            done += count
            turn += 1
        base = results["one gateway behind HAProxy"]
        rows = []
        for name, (wall, times) in results.items():
            rate = len(times) / wall
            rows.append([name, str(len(times)), f"{rate:.0f}", f"{rate / (len(base[1]) / base[0]):.2f}x",
                         f"{statistics.median(times) * 1000:.1f}", f"{percentile(times, 0.99) * 1000:.1f}",
                         " / ".join(f"{c / len(times) * 1000:.1f}" for c in cpu[name])])
        print(f"IMAP sessions (TLS + LOGIN + SELECT + LOGOUT), {args.clients} clients at once, one Redis, "
              f"one Dovecot, pooling on, {args.sessions} per variant in turns of {args.round}")
        print(format_table(["variant", "sessions", "sessions/s", "vs one", "median ms", "p99 ms",
                            "CPU ms/session A / B"], rows))
        import os
        print(f"({os.cpu_count()} CPUs here: clients, HAProxy, Dovecot, Redis and the gateways share them)")

        sqlite_gw = running.enter_context(gateway(up, "single-sqlite"))
        stores = {"SQLite": (sqlite_gw, accounts(sqlite_gw, "lite", 1)[0]),
                  "Redis": (a, accounts(a, "red", 1)[0])}
        logins: dict[str, list[float]] = {name: [] for name in stores}
        for name, (gw, (account, token)) in stores.items():
            for _ in range(3):
                session(gw.imap, account, token)
        for i in range(args.sequential):
            for name in (list(stores) if i % 2 == 0 else list(reversed(stores))):
                gw, (account, token) = stores[name]
                logins[name].append(session(gw.imap, account, token)[0])
        lite, red = statistics.median(logins["SQLite"]) * 1000, statistics.median(logins["Redis"]) * 1000
        print()
        print(f"Login step (TLS connect + LOGIN, pooled upstream), one client, {args.sequential} each, in turns")
        print(format_table(["store", "login median ms", "p99 ms"], [
            [name, f"{statistics.median(v) * 1000:.2f}", f"{percentile(v, 0.99) * 1000:.2f}"]
            for name, v in logins.items()]))
        print(f"Redis adds {red - lite:+.2f} ms to a login (median) over SQLite")


if __name__ == "__main__":
    main()
