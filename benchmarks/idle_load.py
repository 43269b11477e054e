"""Many concurrent IMAP sessions in IDLE through one gateway, each told of a new message.

    python -m benchmarks.idle_load [--sessions 2000] [--per-account 10]

Opens ``--sessions`` TLS sessions to the gateway (asyncio clients in this
process, ``--per-account`` sessions per account), each LOGIN, SELECT INBOX,
IDLE. Then appends one message to every account's INBOX upstream (through
Dovecot directly) and waits until every session has seen its ``* 1 EXISTS``.
Reports errors, the time from the first append until the last session saw its
EXISTS, the gateway's RSS per session, its CPU and file descriptors. Dovecot's
limits are raised for the run; the soft open-files limit is raised to the
hard one. Bounded: a fixed number of sessions, every wait has a deadline,
everything is closed at the end. Not part of the test suite (it takes a few
minutes and several GB for Dovecot's processes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import time
from dataclasses import dataclass, field

from benchmarks.stack import cpu_seconds, format_table, gateway, raise_nofile_limit, rss_kb, upstreams

MESSAGE = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: load\r\n"
           b"Message-ID: <load@example.com>\r\n\r\nHello.\r\n")


@dataclass
class Client:
    account: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    seen_at: float | None = None
    error: str = ""


@dataclass
class Run:
    clients: list[Client] = field(default_factory=list)
    open_seconds: float = 0.0


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout:.0f} s")
        chunk = await asyncio.wait_for(reader.read(65536), left)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}: {data[-200:]!r}")
        data += chunk
    return data


async def open_session(client: Client, port: int, ctx: ssl.SSLContext, user: str, token: str,
                       gate: asyncio.Semaphore) -> None:
    async with gate:  # at most N handshakes and logins at once
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 30)
            client.reader, client.writer = reader, writer
            await read_until(reader, b"\r\n", 30)
            writer.write(b"a1 LOGIN " + user.encode() + b" " + token.encode() + b"\r\n")
            if b"a1 OK" not in await read_until(reader, b"a1 ", 60):
                raise RuntimeError("login refused")
            writer.write(b"a2 SELECT INBOX\r\n")
            await read_until(reader, b"a2 OK", 30)
            writer.write(b"a3 IDLE\r\n")
            await read_until(reader, b"+ ", 30)
        except Exception as e:  # counted and reported
            client.error = f"open: {type(e).__name__}: {e}"[:200]


async def wait_exists(client: Client, deadline: float) -> None:
    if client.error or client.reader is None:
        return
    try:
        await read_until(client.reader, b" EXISTS", max(1.0, deadline - time.monotonic()))
        client.seen_at = time.monotonic()
    except Exception as e:
        client.error = f"idle: {type(e).__name__}: {e}"[:200]


async def close(client: Client) -> None:
    if client.writer is not None:
        try:
            client.writer.write(b"DONE\r\na4 LOGOUT\r\n")
            client.writer.close()
            await asyncio.wait_for(client.writer.wait_closed(), 5)
        except Exception:
            pass


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--per-account", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=50, help="logins in flight at once")
    args = parser.parse_args()
    n, per = args.sessions, args.per_account
    accounts = (n + per - 1) // per
    raise_nofile_limit()
    # Dovecot watches a mailbox with inotify, but past fs.inotify.max_user_instances (128 by
    # default) its IDLE falls back to checking every 30 s: check every second instead, so the
    # time measured is the relay's, not Dovecot's polling.
    with upstreams("gw-bench-idleload-", max_connections=n + 200,
                   dovecot_config="mailbox_idle_check_interval = 1 secs\n") as up, \
            gateway(up, imap={"max_connections_per_account": per + 5}) as gw:
        tokens = []
        for a in range(accounts):
            gw.add_oauth_account(f"load{a}", f"load{a}@example.com", access_lifetime=3600)
            tokens.append(gw.token(f"load{a}"))
        assert gw.proc is not None
        pid = gw.proc.pid
        rss_before, cpu_before = rss_kb(pid), cpu_seconds(pid)
        ctx = gw.client_context()

        appended_at: dict[int, float] = {}

        async def run() -> tuple[Run, float, int, int, float]:
            result = Run([Client(i // per) for i in range(n)])
            gate = asyncio.Semaphore(args.parallel)
            started = time.monotonic()
            await asyncio.gather(*(open_session(c, gw.imaps_port, ctx, f"load{c.account}",
                                                tokens[c.account], gate) for c in result.clients))
            result.open_seconds = time.monotonic() - started
            await asyncio.sleep(2)
            rss_idle, fd_count, cpu_idle = rss_kb(pid), fds(pid), cpu_seconds(pid)
            await asyncio.sleep(10)
            idle_cpu = (cpu_seconds(pid) - cpu_idle) / 10
            deadline = time.monotonic() + 120
            waiting = [asyncio.create_task(wait_exists(c, deadline)) for c in result.clients]
            appended = time.monotonic()
            for a in range(accounts):
                await asyncio.to_thread(up.dovecot.append, f"load{a}@example.com", "INBOX", MESSAGE)
                appended_at[a] = time.monotonic()
            await asyncio.gather(*waiting)
            last = max((c.seen_at for c in result.clients if c.seen_at), default=appended)
            await asyncio.gather(*(close(c) for c in result.clients))
            return result, last - appended, rss_idle, fd_count, idle_cpu

        result, spread, rss_idle, fd_count, idle_cpu = asyncio.run(run())
        cpu_used = cpu_seconds(pid) - cpu_before

    errors = [c.error for c in result.clients if c.error]
    seen = sum(1 for c in result.clients if c.seen_at)
    # From the end of an account's APPEND to each of its sessions' EXISTS (clamped at 0: a session
    # may see it before APPEND's own answer reached us).
    lags = sorted(max(0.0, c.seen_at - appended_at[c.account]) for c in result.clients if c.seen_at)
    median = lags[len(lags) // 2] if lags else 0.0
    worst = lags[-1] if lags else 0.0
    print(f"{n} IMAP sessions in IDLE through one gateway ({accounts} accounts x {per}), "
          f"{args.parallel} logins at a time")
    rows = [
        ["sessions opened (LOGIN + SELECT + IDLE)", f"{n - sum(e.startswith('open') for e in errors)}"],
        ["time to open them all", f"{result.open_seconds:.1f} s"],
        ["sessions that saw their EXISTS", f"{seen}"],
        ["errors", f"{len(errors)}" + (f" (first: {errors[0]})" if errors else "")],
        ["first append -> last EXISTS seen", f"{spread:.2f} s ({accounts} appends, one after another)"],
        ["append done -> EXISTS seen, median / max", f"{median * 1000:.0f} ms / {worst * 1000:.0f} ms"],
        ["gateway RSS per session", f"{(rss_idle - rss_before) / n:.1f} KB"],
        ["gateway descriptors open", f"{fd_count}"],
        ["gateway CPU while all idle", f"{idle_cpu * 100:.2f} % of a core"],
        ["gateway CPU, whole run", f"{cpu_used:.1f} s"],
    ]
    print(format_table(["measure", "value"], rows))


if __name__ == "__main__":
    main()
