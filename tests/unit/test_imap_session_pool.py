"""The IMAP session with a real pool on StringTransports: LOGOUT answered here, the upstream reset and reused.

The upstream is a real :class:`UpstreamIMAP` on a StringTransport, lent by a
real :class:`UpstreamPool` with the real IMAP keeper; the test plays the
upstream server's part by hand.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.auth.tokens import TokenCheck
from gateway.config import load_config
from gateway.connections import Connections
from gateway.imap.protocol import IMAPGateway
from gateway.imap.upstream import IMAPKeeper, UpstreamIMAP
from gateway.net.connector import Route
from gateway.net.opener import Opened, Target
from gateway.net.pool import PoolSettings, UpstreamPool
from gateway.session import SessionDeps
from gateway.store.records import AccountRecord

CAPS = b"IMAP4rev1 UNSELECT IDLE"


class Store:
    def check_login(self, secret: str, scope: str, peer: str | None, account: str):
        record = AccountRecord.from_document({"account": account, "email": f"{account}@example.com"})
        return defer.succeed((TokenCheck.OK, record, "tok1"))


class Upstreams:
    """Real upstream protocols on StringTransports, as an opener for the pool."""

    def __init__(self) -> None:
        self.opened: list[tuple[UpstreamIMAP, StringTransport]] = []

    async def open(self, account: dict[str, Any], client: Any = None) -> Opened:
        proto = UpstreamIMAP()
        transport = StringTransport()
        proto.makeConnection(transport)
        self.opened.append((proto, transport))
        return Opened(proto, CAPS, Target("imap.example", 993, True), Route())


def world() -> tuple[MemoryReactorClock, UpstreamPool, Upstreams, SessionDeps]:
    reactor = MemoryReactorClock()
    upstreams = Upstreams()
    pool = UpstreamPool("imap", PoolSettings(idle_ttl=60, max_idle=2), reactor, upstreams.open, IMAPKeeper())
    deps = SessionDeps(reactor=reactor, settings=load_config().imap, tokens=Store(), upstreams=pool,
                       connections=Connections(clock=reactor.seconds), server_tls=None, version="0.1")
    return reactor, pool, upstreams, deps


def client(deps: SessionDeps) -> tuple[IMAPGateway, StringTransport]:
    proto = IMAPGateway(deps, tls=True)
    transport = StringTransport(peerAddress=SimpleNamespace(host="192.0.2.7", port=5555))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def last_tag(transport: StringTransport) -> bytes:
    return transport.value().rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1].split(b" ", 1)[0]


def test_logout_is_answered_here_and_nothing_after_it_reaches_the_pooled_upstream():
    """SELECT relayed; LOGOUT answered by the gateway; UNSELECT sent; later client bytes go nowhere;
    the next login of the account gets the same connection after a NOOP, and the same capabilities."""
    reactor, pool, upstreams, deps = world()
    proto, transport = client(deps)
    proto.dataReceived(b"a1 LOGIN alice tok\r\n")
    assert transport.value() == b"a1 OK [CAPABILITY " + CAPS + b"] alice authenticated\r\n"
    up, up_transport = upstreams.opened[0]

    proto.dataReceived(b"s1 SELECT INBOX\r\n")
    reactor.advance(0)
    assert up_transport.value() == b"s1 SELECT INBOX\r\n"
    up.dataReceived(b"* 1 EXISTS\r\ns1 OK [READ-WRITE] Select completed.\r\n")
    reactor.advance(0)
    transport.clear()
    up_transport.clear()

    proto.dataReceived(b"z1 LOGOUT\r\n")
    assert transport.value() == b"* BYE Logging out\r\nz1 OK Logout completed\r\n"
    assert transport.disconnecting
    unselect = up_transport.value()
    assert unselect.endswith(b" UNSELECT\r\n") and b"LOGOUT" not in unselect
    proto.dataReceived(b"x1 DELETE INBOX\r\n")  # a client that goes on after LOGOUT
    reactor.advance(0)
    assert up_transport.value() == unselect
    up.dataReceived(last_tag(up_transport) + b" OK Unselect completed.\r\n")
    assert pool.counts() == {"busy": 0, "idle": 1}

    again, transport2 = client(deps)
    up_transport.clear()
    again.dataReceived(b"a1 LOGIN alice tok\r\n")
    assert up_transport.value().endswith(b" NOOP\r\n")
    assert transport2.value() == b""  # waits for the NOOP's answer
    up.dataReceived(last_tag(up_transport) + b" OK NOOP completed.\r\n")
    assert transport2.value() == b"a1 OK [CAPABILITY " + CAPS + b"] alice authenticated\r\n"
    assert len(upstreams.opened) == 1 and [c["pooled"] for c in deps.connections.snapshot()] == [False, True]


def test_a_session_that_used_idle_closes_its_upstream():
    """IDLE taints: when the client goes, the upstream is closed, not pooled."""
    reactor, pool, upstreams, deps = world()
    proto, transport = client(deps)
    proto.dataReceived(b"a1 LOGIN alice tok\r\n")
    up, up_transport = upstreams.opened[0]
    proto.dataReceived(b"i1 IDLE\r\n")
    reactor.advance(0)
    up.dataReceived(b"+ idling\r\n")
    proto.dataReceived(b"DONE\r\n")
    reactor.advance(0)
    up.dataReceived(b"i1 OK Idle completed.\r\n")
    proto.dataReceived(b"z1 LOGOUT\r\n")  # not intercepted: goes upstream
    reactor.advance(0)
    assert up_transport.value().endswith(b"z1 LOGOUT\r\n")
    proto.connectionLost()
    assert pool.counts() == {"busy": 0, "idle": 0}


def test_a_relayed_session_idle_for_idle_timeout_is_closed():
    """No byte either way for imap.idle_timeout seconds: `* BYE Autologout` and closed; traffic resets it."""
    reactor, pool, upstreams, deps = world()
    timeout = deps.settings.idle_timeout
    assert timeout == 1860
    proto, transport = client(deps)
    proto.dataReceived(b"a1 LOGIN alice tok\r\n")
    up, up_transport = upstreams.opened[0]
    reactor.advance(timeout - 10)
    proto.dataReceived(b"n1 NOOP\r\n")   # activity 10 s before the deadline
    reactor.advance(0)
    up.dataReceived(b"n1 OK NOOP completed.\r\n")
    reactor.advance(0)
    reactor.advance(20)
    assert not transport.disconnecting   # the deadline moved with the NOOP
    transport.clear()
    reactor.advance(timeout)
    assert transport.value() == b"* BYE Autologout; idle for too long\r\n" and transport.disconnecting
