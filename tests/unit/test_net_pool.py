"""The upstream pool on a fake clock: caps and waits, reuse and reset, TTL, max idle, back-off, cancellation.

Upstream connections here are fakes (what the pool does with them is the
subject); the IMAP keeper and the login's throttle detection run on a real
:class:`UpstreamIMAP` over StringTransport. Dovecot-backed tests are in
tests/integration/test_imap_pool.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.imap.upstream import IMAPKeeper, UpstreamIMAP, login
from gateway.net.connector import Route
from gateway.net.opener import Opened, Target
from gateway.net.pool import Lease, PoolSettings, TooManyConnections, UpstreamPool
from gateway.store.records import AccountRecord
from gateway.net.throttle import NOT_CONNECTED_BACKOFF, throttle_delay
from gateway.net.upstream import Credentials, ProviderThrottled, UpstreamError


class FakeUpstream:
    """Stands in for an upstream protocol: can be closed, says so, calls back."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False
        self.aborted = False
        self._on_close: Any = None
        self.transport = self

    def abortConnection(self) -> None:
        self.aborted = True
        self.drop()

    def on_close(self, callback: Any) -> None:
        self._on_close = callback

    def drop(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close()


class FakeKeeper:
    """Resets and resyncs at once, unless told to fail; records what it did."""

    def __init__(self) -> None:
        self.resets: list[tuple[int, bool]] = []
        self.resyncs: list[int] = []
        self.fail_resync: set[int] = set()
        self.hold_reset: defer.Deferred[None] | None = None

    async def reset(self, opened: Opened, selected: bool) -> None:
        self.resets.append((opened.protocol.n, selected))
        if self.hold_reset is not None:
            await self.hold_reset

    async def resync(self, opened: Opened) -> None:
        self.resyncs.append(opened.protocol.n)
        if opened.protocol.n in self.fail_resync or opened.protocol.closed:
            raise UpstreamError("unexpected response to NOOP: BYE")


class World:
    def __init__(self, **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.keeper = FakeKeeper()
        self.opened: list[FakeUpstream] = []
        self.fail_open: Exception | None = None
        self.hold_open: defer.Deferred[None] | None = None
        base = {"max_connections": 3, "limit_wait": 5.0, "idle_ttl": 60.0, "max_idle": 2}
        self.pool = UpstreamPool("imap", PoolSettings(**{**base, **settings}), self.reactor, self.open,
                                 self.keeper)

    async def open(self, account: dict[str, Any], client: Any = None) -> Opened:
        if self.hold_open is not None:
            await self.hold_open
        if self.fail_open is not None:
            raise self.fail_open
        proto = FakeUpstream(len(self.opened) + 1)
        self.opened.append(proto)
        return Opened(proto, b"IMAP4rev1 UNSELECT", Target("imap.example", 993, True), Route())

    def acquire(self, account: dict[str, Any]) -> defer.Deferred[Lease]:
        return defer.ensureDeferred(self.pool.acquire(account))


ALICE_DOC = {"account": "alice", "email": "alice@example.com", "oauth2": {"accessToken": "a1", "expires": 1.0}}
ALICE = AccountRecord.from_document(ALICE_DOC)
BOB = AccountRecord.from_document({"account": "bob", "email": "bob@example.com"})


def result(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Exception):
        raise box[0]
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def test_a_released_connection_is_reset_kept_and_resynced_for_the_same_account_only():
    """Release -> reset (UNSELECT when selected) -> idle; the next login of that account resyncs and reuses it."""
    w = World()
    lease = result(w.acquire(ALICE))
    assert not lease.pooled and w.pool.counts() == {"busy": 1, "idle": 0}
    lease.release(selected=True)
    assert w.keeper.resets == [(1, True)] and w.pool.counts() == {"busy": 0, "idle": 1}
    other = result(w.acquire(BOB))
    assert not other.pooled and other.opened.protocol.n == 2  # never across accounts
    again = result(w.acquire(ALICE))
    assert again.pooled and again.opened.protocol.n == 1 and w.keeper.resyncs == [1]


def test_the_cap_makes_logins_wait_then_refuses_with_the_design_text():
    """Cap 2: a third login waits limit_wait, then fails with 'Too many connections for this account'."""
    w = World(max_connections=2, limit_wait=5.0)
    a, b = result(w.acquire(ALICE)), result(w.acquire(ALICE))
    third = w.acquire(ALICE)
    assert not third.called
    w.reactor.advance(4.9)
    assert not third.called
    w.reactor.advance(0.2)
    with pytest.raises(TooManyConnections, match="^Too many connections for this account$"):
        result(third)
    assert len(w.opened) == 2
    a.close(), b.close()


def test_a_waiting_login_takes_the_connection_given_back():
    """Over the cap, a waiter gets the connection another client releases, with no new upstream login."""
    w = World(max_connections=1)
    first = result(w.acquire(ALICE))
    waiting = w.acquire(ALICE)
    w.reactor.advance(1)
    first.release()
    lease = result(waiting)
    assert lease.pooled and len(w.opened) == 1


def test_a_waiting_login_gets_the_slot_of_a_closed_connection():
    """Over the cap, a waiter gets the slot when a busy connection closes, and opens its own."""
    w = World(max_connections=1)
    first = result(w.acquire(ALICE))
    waiting = w.acquire(ALICE)
    first.close()
    lease = result(waiting)
    assert not lease.pooled and len(w.opened) == 2 and w.opened[0].aborted


def test_no_cap_when_zero():
    """max_connections 0: no cap."""
    w = World(max_connections=0)
    leases = [result(w.acquire(ALICE)) for _ in range(50)]
    assert len(w.opened) == 50
    for lease in leases:
        lease.close()
    assert w.pool.counts() == {"busy": 0, "idle": 0}


def test_a_connection_failing_its_resync_is_discarded_and_replaced():
    """NOOP answered wrongly: that connection is closed, the login opens a new one."""
    w = World()
    result(w.acquire(ALICE)).release()
    w.keeper.fail_resync.add(1)
    lease = result(w.acquire(ALICE))
    assert not lease.pooled and lease.opened.protocol.n == 2 and w.opened[0].aborted


def test_an_idle_connection_that_drops_is_forgotten():
    """The upstream closes an idle connection (kicked, restarted): it leaves the pool and the count."""
    w = World(max_connections=1)
    result(w.acquire(ALICE)).release()
    w.opened[0].drop()
    assert w.pool.counts() == {"busy": 0, "idle": 0}
    assert not result(w.acquire(ALICE)).pooled


def test_idle_ttl_and_max_idle():
    """Idle connections go after idle_ttl; beyond max_idle per account the oldest goes at once."""
    w = World(max_idle=2, idle_ttl=60.0)
    leases = [result(w.acquire(ALICE)) for _ in range(3)]
    for i, lease in enumerate(leases):
        w.reactor.advance(1)
        lease.release()
    assert w.pool.counts() == {"busy": 0, "idle": 2} and w.opened[0].aborted  # the oldest
    w.reactor.advance(59)
    assert w.pool.counts() == {"busy": 0, "idle": 1}  # the second one's TTL
    w.reactor.advance(1.5)
    assert w.pool.counts() == {"busy": 0, "idle": 0}


def test_pooling_off_closes_on_release():
    """idle_ttl 0: release closes the connection."""
    w = World(idle_ttl=0.0)
    result(w.acquire(ALICE)).release()
    assert w.opened[0].aborted and w.pool.counts() == {"busy": 0, "idle": 0} and w.keeper.resets == []


def test_a_changed_account_empties_its_pool():
    """Different settings (not just a new access token) close the idle connections and open anew."""
    w = World()
    result(w.acquire(ALICE)).release()
    renewed = AccountRecord.from_document({**ALICE_DOC, "oauth2": {"accessToken": "a2", "expires": 99.0}})
    assert renewed.fingerprint == ALICE.fingerprint
    assert result(w.acquire(renewed)).pooled
    w2 = World()
    result(w2.acquire(ALICE)).release()
    moved = AccountRecord.from_document({**ALICE_DOC, "imap": {"host": "elsewhere.example"}})
    lease = result(w2.acquire(moved))
    assert not lease.pooled and w2.opened[0].aborted


def test_forget_closes_idle_now_and_busy_on_release():
    """forget(account) (API change or delete): idle ones close now, busy ones when given back."""
    w = World()
    busy = result(w.acquire(ALICE))
    result(w.acquire(ALICE)).release()
    w.pool.forget("alice")
    assert w.opened[1].aborted and not w.opened[0].aborted
    busy.release()
    assert w.opened[0].aborted and w.pool.counts() == {"busy": 0, "idle": 0}


def test_a_login_right_after_a_logout_waits_for_the_reset_instead_of_opening():
    """While the released connection's UNSELECT is on its way, the next login waits for it."""
    w = World()
    w.keeper.hold_reset = defer.Deferred()
    result(w.acquire(ALICE)).release(selected=True)
    nxt = w.acquire(ALICE)
    assert not nxt.called and len(w.opened) == 1
    hold, w.keeper.hold_reset = w.keeper.hold_reset, None
    hold.callback(None)
    assert result(nxt).pooled and len(w.opened) == 1


def test_provider_throttling_backs_the_account_off():
    """ProviderThrottled from a login: the account's logins fail at once for that long, without the provider."""
    w = World()
    w.fail_open = ProviderThrottled(16.843)
    with pytest.raises(ProviderThrottled, match="retry in 17 s"):
        result(w.acquire(ALICE))
    w.fail_open = None
    w.reactor.advance(10)
    with pytest.raises(ProviderThrottled, match="^Provider throttled this account, retry in 7 s$"):
        result(w.acquire(ALICE))
    assert w.opened == [] and w.pool.counts() == {"busy": 0, "idle": 0}
    assert not result(w.acquire(BOB)).pooled  # other accounts are not affected
    w.reactor.advance(7)
    assert not result(w.acquire(ALICE)).pooled


def test_cancelled_logins_free_their_slot_and_their_wait():
    """A login cancelled (client gone, login timeout) while opening or waiting leaves no slot or waiter behind."""
    w = World(max_connections=1)
    w.hold_open = defer.Deferred()
    opening = w.acquire(ALICE)
    assert w.pool.connections_of("alice") == 1
    opening.cancel()
    assert w.pool.connections_of("alice") == 0
    w.hold_open = None
    first = result(w.acquire(ALICE))
    waiting = w.acquire(ALICE)
    waiting.cancel()
    first.release()
    assert w.pool.counts() == {"busy": 0, "idle": 1}  # nobody took it


def test_release_and_close_are_once_only():
    """A lease given back twice counts once."""
    w = World()
    lease = result(w.acquire(ALICE))
    lease.close()
    lease.close()
    lease.release()
    assert w.pool.counts() == {"busy": 0, "idle": 0}


# -- the IMAP keeper and login on a real UpstreamIMAP ---------------------------------

def imap_upstream(caps: bytes = b"IMAP4rev1 UNSELECT") -> tuple[Opened, StringTransport]:
    proto = UpstreamIMAP()
    transport = StringTransport()
    proto.makeConnection(transport)
    return Opened(proto, caps, Target("imap.example", 993, True), Route()), transport


def _tag_of(transport: StringTransport) -> bytes:
    return transport.value().split(b" ", 1)[0]


def test_keeper_unselects_and_resyncs_under_fresh_unique_tags():
    """UNSELECT when selected, NOOP before reuse, each under a tag never used before in this process."""
    opened, transport = imap_upstream()
    reset = defer.ensureDeferred(IMAPKeeper().reset(opened, True))
    tag = _tag_of(transport)
    assert transport.value() == tag + b" UNSELECT\r\n" and tag.startswith(b"GW")
    opened.protocol.dataReceived(tag + b" OK Unselect completed.\r\n")
    result(reset)
    transport.clear()
    resync = defer.ensureDeferred(IMAPKeeper().resync(opened))
    tag2 = _tag_of(transport)
    assert transport.value() == tag2 + b" NOOP\r\n" and tag2 != tag
    opened.protocol.dataReceived(b"* OK still here\r\n" + tag2 + b" OK NOOP completed.\r\n")
    result(resync)


def test_keeper_refuses_what_it_cannot_make_clean():
    """No UNSELECT with a mailbox selected: not kept (CLOSE would expunge); a BYE before the NOOP's OK fails it."""
    opened, transport = imap_upstream(caps=b"IMAP4rev1 IDLE")
    with pytest.raises(UpstreamError, match="no UNSELECT"):
        result(defer.ensureDeferred(IMAPKeeper().reset(opened, True)))
    assert transport.value() == b""  # no CLOSE, nothing sent
    result(defer.ensureDeferred(IMAPKeeper().reset(opened, False)))  # nothing selected: nothing to do
    resync = defer.ensureDeferred(IMAPKeeper().resync(opened))
    opened.protocol.dataReceived(b"* BYE Disconnected for inactivity.\r\n" + _tag_of(transport) + b" OK\r\n")
    with pytest.raises(UpstreamError, match="unexpected response to NOOP"):
        result(resync)


MS_THROTTLED = b"Request is throttled. Suggested Backoff Time: 16843 milliseconds"
MS_NOT_CONNECTED = b"User is authenticated but not connected."


def test_throttle_texts():
    """Microsoft 365's two answers give the suggested time, or the fixed back-off; others give none."""
    assert throttle_delay([b"G2 NO " + MS_THROTTLED + b"\r\n"]) == 16.843
    assert throttle_delay([b"* BYE " + MS_NOT_CONNECTED + b"\r\n"]) == NOT_CONNECTED_BACKOFF
    assert throttle_delay([b"G2 NO AUTHENTICATE failed.\r\n", b"* OK fine\r\n"]) is None


def _login_until_auth(answers: bytes) -> defer.Deferred[bytes]:
    proto = UpstreamIMAP()
    transport = StringTransport()
    proto.makeConnection(transport)
    d = defer.ensureDeferred(login(proto, Credentials("XOAUTH2", "u@example.com", "tok")))
    proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=XOAUTH2] ready\r\n")
    sent = transport.value()
    # ID pipelined before AUTHENTICATE: one round trip for both.
    assert sent.startswith(b"G1 ID (") and b"\r\nG2 AUTHENTICATE XOAUTH2 " in sent
    proto.dataReceived(b'* ID NIL\r\nG1 OK ID completed.\r\n' + answers)
    return d


@pytest.mark.parametrize("answer", [
    b"G2 NO " + MS_THROTTLED + b"\r\n",
    b"* BYE " + MS_THROTTLED + b"\r\n",
    b"G2 BAD " + MS_NOT_CONNECTED + b"\r\n",
])
def test_login_raises_provider_throttled_on_microsofts_answers(answer):
    """The upstream login turns those answers into ProviderThrottled (no token refresh, no retry)."""
    d = _login_until_auth(answer)
    with pytest.raises(ProviderThrottled, match=r"^Provider throttled this account, retry in \d+ s$"):
        result(d)


def test_login_reads_capabilities_from_the_tagged_ok():
    """A normal login: capabilities from the tagged OK, nothing else sent."""
    d = _login_until_auth(b"G2 OK [CAPABILITY IMAP4rev1 UNSELECT IDLE] Logged in\r\n")
    assert result(d) == b"IMAP4rev1 UNSELECT IDLE"
