"""What every benchmark runs against: the test OAuth2 provider, a real Dovecot, the gateway.

``stack()`` starts the usual one of each. Benchmarks that compare several relays
start the upstreams with ``upstreams()`` and then any number of gateways with
``gateway()`` or ``pooling_gateway()``, and the reference relay with
``bare_relay_like()``; each is stopped when its ``with`` block ends.
"""

from __future__ import annotations

import imaplib
import os
import resource
import shutil
import tempfile
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from benchmarks.bare_relay import BareRelay, bare_relay
from tests.integration.dovecot import Dovecot, xoauth2_callback
from tests.integration.gateway_proc import Gateway
from tests.integration.oauth2_provider import OAuth2Provider
from tests.integration.smtp_sink import SMTPSink

#: What a table shows instead of numbers when the gateway refuses the pool keys.
POOLING_UNAVAILABLE = "pooling not available in this build"


@dataclass
class Stack:
    provider: OAuth2Provider
    dovecot: Dovecot
    gateway: Gateway
    sink: SMTPSink | None


@dataclass
class Upstreams:
    """Provider and Dovecot (and the sink its submission relays to) under one temporary root."""

    root: Path
    provider: OAuth2Provider
    dovecot: Dovecot
    sink: SMTPSink | None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.99 for p99) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil without float surprises at exact ranks
    return ordered[int(rank) - 1]


@contextmanager
def upstreams(prefix: str, *, sink: bool = False, max_connections: int | None = None,
              dovecot_config: str = "") -> Iterator[Upstreams]:
    """Start provider and Dovecot (limits raised for ``max_connections`` sessions if given)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        os.chmod(root, 0o755)  # Dovecot's mail user must traverse it
        (root / "dovecot").mkdir()
        os.chmod(root / "dovecot", 0o755)
        provider = OAuth2Provider().start()
        cleanup.callback(provider.stop)
        dovecot = Dovecot(root / "dovecot", provider, max_connections=max_connections,
                          extra_config=dovecot_config)
        cleanup.callback(dovecot.stop)
        dovecot.start()
        relay = None
        if sink:
            assert dovecot.submission_relay_port is not None
            relay = SMTPSink(dovecot.submission_relay_port)
            cleanup.callback(relay.stop)
            relay.start()
        yield Upstreams(root, provider, dovecot, relay)


@contextmanager
def gateway(up: Upstreams, name: str = "gateway", **overrides: Any) -> Iterator[Gateway]:
    """A started gateway in ``up.root / name`` with config ``overrides``; stopped after."""
    gw = Gateway(up.root / name, up.dovecot, up.provider, **overrides)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def pool_overrides(pooling: bool) -> dict[str, Any]:
    """Gateway config for upstream connection pooling on (its defaults) or off.

    The only place the benchmarks name the pool keys, so a build without
    pooling fails in one known way (see ``pooling_gateway``).
    """
    return {"imap": {"pool": {} if pooling else {"idle_ttl": 0}}}


@contextmanager
def pooling_gateway(up: Upstreams, name: str, *, pooling: bool) -> Iterator[Gateway | None]:
    """A gateway with pooling on or off; None when this build refuses the pool keys.

    A build from before pooling exits with "unknown config key imap.pool";
    callers show ``POOLING_UNAVAILABLE`` (or, for "off", use a plain
    ``gateway()``, which is what such a build does anyway).
    """
    gw = Gateway(up.root / name, up.dovecot, up.provider, **pool_overrides(pooling))
    try:
        try:
            gw.start()
        except RuntimeError as e:
            if "unknown config key" not in str(e):
                raise
            started = False
        else:
            started = True
        yield gw if started else None
    finally:
        gw.stop()


def bare_relay_like(gw: Gateway) -> AbstractContextManager[BareRelay]:
    """The reference relay with the gateway's certificate, in front of the gateway's Dovecot."""
    tls = gw.config["tls"]
    dovecot = gw.dovecot
    assert dovecot.imaps_port is not None
    return bare_relay(cert=Path(tls["cert"]), key=Path(tls["key"]), upstream_host=dovecot.host,
                      upstream_port=dovecot.imaps_port, ca=dovecot.ca_file,
                      log_path=gw.workdir.parent / f"bare-relay-{gw.workdir.name}.log")


def relay_imap_login(relay: BareRelay, gw: Gateway, email: str, token: str) -> imaplib.IMAP4_SSL:
    """imaplib through the bare relay (TLS with the gateway's certificate), XOAUTH2 to Dovecot."""
    conn = imaplib.IMAP4_SSL("127.0.0.1", relay.port, ssl_context=gw.client_context(), timeout=30)
    try:
        conn.authenticate("XOAUTH2", xoauth2_callback(email, token))
    except BaseException:
        conn.shutdown()
        raise
    return conn


@contextmanager
def stack(prefix: str, *, sink: bool = False) -> Iterator[Stack]:
    """Start provider, Dovecot (and the sink its submission relays to), gateway; stop all after."""
    with upstreams(prefix, sink=sink) as up, gateway(up) as gw:
        yield Stack(up.provider, up.dovecot, gw, up.sink)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: the first column left-aligned, the others right-aligned.

    A row with a single cell after the first spans the remaining columns (for
    example ``POOLING_UNAVAILABLE``).
    """
    widths = [len(h) for h in header]
    for row in rows:
        if len(row) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]
        else:
            widths[0] = max(widths[0], len(row[0]))

    def line(row: list[str]) -> str:
        if len(row) != len(header):
            return "  ".join([row[0].ljust(widths[0]), *row[1:]])
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
