"""Time to send N messages in one session, through the gateway vs direct to Dovecot submission.

Run from the repository root after the test command has installed everything:

    python -m benchmarks.smtp_send [--messages 100] [--size-kb 50] [--rounds 3]

Both paths: smtplib, STARTTLS, one session, N messages to the same sink that
Dovecot's submission service relays to. Direct logs in with XOAUTH2; through
the gateway with AUTH PLAIN (account ID + token) and the gateway logs in
upstream with XOAUTH2. Reports the median of the rounds (each round ends when
the sink has every message) and the gateway's CPU seconds.
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import time

from benchmarks.stack import cpu_seconds, stack
from tests.integration.dovecot import xoauth2_string
from tests.integration.smtp_sink import SMTPSink


def body(i: int, size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return (b"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: bench %d\r\n\r\n" % i
            + line * (size // len(line)))


def send_all(conn: smtplib.SMTP, sender: str, count: int, size: int, sink: SMTPSink) -> float:
    before = len(sink.messages)
    start = time.perf_counter()
    for i in range(count):
        conn.sendmail(sender, ["sink@example.com"], body(i, size))
    deadline = time.monotonic() + 60
    while len(sink.messages) < before + count and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size-kb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_kb * 1024

    with stack("gw-bench-smtp-", sink=True) as st:
        provider, dovecot, gw, sink = st.provider, st.dovecot, st.gateway, st.sink
        assert sink is not None
        email = "bench@example.com"
        gw.add_oauth_account("bench", email)
        token = gw.token("bench", scopes=["smtp"])

        through, direct = [], []
        cpu = 0.0
        for _ in range(args.rounds):
            conn = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=60)
            conn.starttls(context=gw.client_context())
            conn.login("bench", token)
            before = cpu_seconds(gw.proc.pid)
            through.append(send_all(conn, email, args.messages, size, sink))
            cpu += cpu_seconds(gw.proc.pid) - before
            conn.quit()

            access, _ = provider.issue(email)
            conn = smtplib.SMTP("127.0.0.1", dovecot.submission_port, timeout=60)
            conn.starttls(context=dovecot.ssl_context())
            conn.ehlo()
            conn.auth("XOAUTH2", lambda challenge=None: xoauth2_string(email, access).decode(),
                      initial_response_ok=False)
            direct.append(send_all(conn, email, args.messages, size, sink))
            conn.quit()

        g, d = statistics.median(through), statistics.median(direct)
        sent = args.messages * args.rounds
        print(f"{args.messages} messages of {args.size_kb} KB in one session, median of {args.rounds}: "
              f"gateway {g:.2f} s, direct {d:.2f} s, gateway/direct time {g/d:.2f}x")
        print(f"gateway CPU: {cpu:.2f} s for {sent} messages = {cpu/sent*1000:.1f} CPU ms per message")


if __name__ == "__main__":
    main()
