"""Login time and FETCH throughput, through the gateway vs direct to Dovecot, in one run.

Run from the repository root after the test command has installed everything:

    python -m benchmarks.imap_fetch [--size-mb 10] [--rounds 5] [--logins 20]

It starts the same real Dovecot and test OAuth2 provider the integration tests
use, and the gateway as `twistd -n gateway`. Both paths use implicit TLS and
imaplib. Reports medians, the ratio, and the gateway's CPU seconds per GB
relayed. Bounded: rounds and logins are fixed counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.stack import cpu_seconds, stack
from tests.integration.test_imap_relay import big_message


def timed_fetch(conn) -> tuple[float, int]:
    start = time.perf_counter()
    typ, data = conn.fetch("1", "(BODY.PEEK[])")
    elapsed = time.perf_counter() - start
    assert typ == "OK"
    return elapsed, len(data[0][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=20)
    args = parser.parse_args()

    with stack("gw-bench-") as st:
        provider, dovecot, gw = st.provider, st.dovecot, st.gateway
        email = "bench@example.com"
        gw.add_oauth_account("bench", email)
        token = gw.token("bench")
        dovecot.append(email, "INBOX", big_message(args.size_mb * 1024 * 1024))

        # Login: connect + TLS + LOGIN through the gateway, vs connect + TLS + XOAUTH2 direct.
        gw_login, direct_login = [], []
        for _ in range(args.logins):
            t = time.perf_counter()
            conn = gw.imap()
            conn.login("bench", token)
            gw_login.append(time.perf_counter() - t)
            conn.logout()
            access, _ = provider.issue(email)
            t = time.perf_counter()
            conn = dovecot.imap_login(email, access)
            direct_login.append(time.perf_counter() - t)
            conn.logout()

        gw_conn = gw.imap()
        gw_conn.login("bench", token)
        gw_conn.select("INBOX", readonly=True)
        direct_conn = dovecot.imap_login(email)
        direct_conn.select("INBOX", readonly=True)
        gw_times, direct_times = [], []
        cpu_before = cpu_seconds(gw.proc.pid)
        relayed = 0
        for _ in range(args.rounds):
            elapsed, n = timed_fetch(gw_conn)
            gw_times.append(elapsed)
            relayed += n
            direct_times.append(timed_fetch(direct_conn)[0])
        cpu = cpu_seconds(gw.proc.pid) - cpu_before
        gw_conn.logout()
        direct_conn.logout()

        mb = relayed / args.rounds / 1e6
        g, d = statistics.median(gw_times), statistics.median(direct_times)
        print(f"login (connect+TLS+auth), median of {args.logins}: gateway {statistics.median(gw_login)*1000:.1f} ms,"
              f" direct {statistics.median(direct_login)*1000:.1f} ms")
        print(f"FETCH {mb:.1f} MB, median of {args.rounds}: gateway {g*1000:.0f} ms ({mb/g:.0f} MB/s),"
              f" direct {d*1000:.0f} ms ({mb/d:.0f} MB/s), ratio gateway/direct throughput {d/g:.2f}x")
        print(f"gateway CPU: {cpu:.2f} s for {relayed/1e9:.2f} GB relayed = {cpu/(relayed/1e9):.2f} CPU s/GB")


if __name__ == "__main__":
    main()
