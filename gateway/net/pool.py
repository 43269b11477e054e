"""Upstream connections lent to client sessions: per-account caps, the idle pool, provider back-off.

A session asks :meth:`UpstreamPool.acquire` for an authenticated upstream
connection of an account and gets a :class:`Lease`. When the client is done
it calls :meth:`Lease.release` (the connection is clean: nothing in flight,
no session state changed) or :meth:`Lease.close`. A released IMAP connection
is reset to the authenticated state (UNSELECT when a mailbox was selected)
and kept idle for ``idle_ttl`` seconds; the next login of the same account
resyncs it with a NOOP under a fresh tag before using it. Every connection,
busy or idle, counts against the account's cap; a login over the cap waits
up to ``limit_wait`` seconds for one to come free.

Each pooled connection's life is a small Automat machine:
``connecting -> leased -> resetting -> idle -> resyncing -> leased ...``,
and ``closed`` from anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from automat import MethodicalMachine
from twisted.internet import defer
from twisted.logger import Logger

from gateway.metrics import POOL, SOURCE_CONNECTIONS, UPSTREAM_CONNECTIONS as CONNECTIONS
from gateway.net.opener import ClientAddress, Opened
from gateway.store.records import AccountRecord
from gateway.net.upstream import ProviderThrottled, UpstreamError

log = Logger()


TOO_MANY = "Too many connections for this account"


class TooManyConnections(UpstreamError):
    """The account's cap was reached and no connection came free within the wait."""

    code = "limit"

    def __init__(self) -> None:
        super().__init__(TOO_MANY)


@dataclass(frozen=True)
class PoolSettings:
    """One protocol's limits: 0 turns a cap or the pool off."""

    max_connections: int = 15      # per account, busy + idle; 0 = no cap
    limit_wait: float = 5.0        # seconds a login waits for a free slot
    idle_ttl: float = 0.0          # seconds an idle connection is kept; 0 = no pooling
    max_idle: int = 2              # idle connections kept per account
    resync_timeout: float = 5.0    # seconds the NOOP before reuse may take
    per_client: bool = False       # reuse only for the client address it was opened for (forward_client_ip)


class Keeper(Protocol):
    """The protocol-specific steps of keeping a connection: reset it after use, resync it before."""

    async def reset(self, opened: Opened, selected: bool) -> None: ...
    async def resync(self, opened: Opened) -> None: ...


Opener = Callable[[AccountRecord, ClientAddress | None], Awaitable[Opened]]


class PooledUpstream:
    """One upstream connection of one account and where it is in its life."""

    _machine = MethodicalMachine()

    def __init__(self, pool: "UpstreamPool", account: str, print_: str, client_host: str = "") -> None:
        self.pool = pool
        self.account = account
        self.client_host = client_host  # whom it was opened for (the provider was told, with per_client)
        self.lease: str | None = None   # its slot of the cluster-wide cap, when there is one
        self.fingerprint = print_
        self.opened: Opened | None = None
        self.idle_since = 0.0
        self._expiry: Any = None

    # states
    @_machine.state(initial=True, serialized="connecting")
    def connecting(self) -> None:
        """Connecting and logging in upstream for a login."""

    @_machine.state(serialized="leased")
    def leased(self) -> None:
        """Relaying for one client session."""

    @_machine.state(serialized="resetting")
    def resetting(self) -> None:
        """Given back; being returned to the authenticated state (UNSELECT)."""

    @_machine.state(serialized="idle")
    def idle(self) -> None:
        """Authenticated, nothing selected, waiting for the account's next login."""

    @_machine.state(serialized="resyncing")
    def resyncing(self) -> None:
        """Taken for a login; its NOOP under a fresh tag is on the way."""

    @_machine.state(serialized="closed")
    def closed(self) -> None:
        """Gone; no longer counted."""

    # inputs
    @_machine.input()
    def logged_in(self, opened: Opened) -> None:
        """The upstream login succeeded."""

    @_machine.input()
    def give_back(self) -> None:
        """The client session is done with it, cleanly."""

    @_machine.input()
    def reset_done(self) -> None:
        """UNSELECT (if any) answered OK."""

    @_machine.input()
    def take(self) -> None:
        """A login of the same account wants it."""

    @_machine.input()
    def resynced(self) -> None:
        """The NOOP answered OK."""

    @_machine.input()
    def close(self, reason: str) -> None:
        """Close it upstream (or note that it closed)."""

    # outputs
    @_machine.output()
    def _keep(self, opened: Opened) -> None:
        self.opened = opened
        SOURCE_CONNECTIONS.labels(self.pool.protocol, opened.route.source or "unknown").inc()

    @_machine.output()
    def _enter_idle(self) -> None:
        self.idle_since = self.pool.reactor.seconds()
        self._expiry = self.pool.reactor.callLater(self.pool.settings.idle_ttl, self.close, "idle TTL")
        assert self.opened is not None
        self.opened.protocol.on_close(lambda: self.close("upstream closed while idle"))

    @_machine.output()
    def _leave_idle(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    @_machine.output()
    def _shut(self, reason: str) -> None:
        self.pool._closed(self, reason)  # first: the slot is free whatever happens below
        if self.opened is None:
            return
        SOURCE_CONNECTIONS.labels(self.pool.protocol, self.opened.route.source or "unknown").dec()
        if not self.opened.protocol.closed:
            self.opened.protocol.transport.abortConnection()

    connecting.upon(logged_in, enter=leased, outputs=[_keep])
    leased.upon(give_back, enter=resetting, outputs=[])
    resetting.upon(reset_done, enter=idle, outputs=[_enter_idle])
    idle.upon(take, enter=resyncing, outputs=[_leave_idle])
    resyncing.upon(resynced, enter=leased, outputs=[])
    for _state in (connecting, leased, resetting, resyncing):
        _state.upon(close, enter=closed, outputs=[_shut])
    idle.upon(close, enter=closed, outputs=[_leave_idle, _shut])
    closed.upon(close, enter=closed, outputs=[])
    del _state

    @_machine.serializer()
    def _serialize(self, state: str) -> str:
        return state

    @property
    def state(self) -> str:
        """The current state's name: connecting, leased, resetting, idle, resyncing or closed."""
        return str(self._serialize())


class Lease:
    """An upstream connection lent to one client session: give it back once, by release or close."""

    def __init__(self, conn: PooledUpstream, pooled: bool) -> None:
        self._conn: PooledUpstream | None = conn
        self.opened: Opened = conn.opened  # type: ignore[assignment]
        self.pooled = pooled  # taken from the pool (True) or opened for this login (False)

    def release(self, selected: bool = False) -> None:
        """The session ended cleanly: keep the connection if the pool wants it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool._give_back(conn, selected)

    def close(self, reason: str = "session ended") -> None:
        """The connection must not be reused: close it upstream."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(reason)


class ClusterLeases:
    """The per-account cap counted across every gateway on a shared store (Redis): each upstream
    connection holds a lease that expires unless renewed, so a gateway that dies leaks no slot for
    longer than ``ttl``. Releases anywhere wake this gateway's waiters (the store's events)."""

    def __init__(self, store: Any, reactor: Any, ttl: float = 30.0) -> None:
        self.store = store
        self.reactor = reactor
        self.ttl = ttl
        self._held: dict[tuple[str, str], set[str]] = {}  # (protocol, account) -> lease ids
        self._loop: Any = None

    async def take(self, protocol: str, account: str, cap: int) -> str | None:
        lease = await self.store.take_lease(protocol, account, cap, self.ttl)
        if lease is not None:
            self._held.setdefault((protocol, account), set()).add(lease)
            self._start()
        return lease

    def release(self, protocol: str, account: str, lease: str) -> None:
        held = self._held.get((protocol, account))
        if held is not None:
            held.discard(lease)
            if not held:
                del self._held[(protocol, account)]
        d = defer.maybeDeferred(self.store.release_lease, protocol, account, lease)
        d.addErrback(lambda f: log.warn("Cannot release a lease of {account}: {why}", account=account,
                                        why=f.getErrorMessage()))

    def _start(self) -> None:
        if self._loop is None:
            from twisted.internet import task

            self._loop = task.LoopingCall(self._renew)
            self._loop.clock = self.reactor
            self._loop.start(self.ttl / 3, now=False).addErrback(lambda f: None)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _renew(self) -> defer.Deferred[Any]:
        renewals = [defer.maybeDeferred(self.store.renew_lease, protocol, account, lease, self.ttl)
                    for (protocol, account), leases in list(self._held.items()) for lease in list(leases)]
        def report(results: list[tuple[bool, Any]]) -> None:
            for ok, result in results:
                if not ok:
                    log.warn("Cannot renew a connection lease: {why}", why=result.getErrorMessage())

        return defer.DeferredList(renewals, consumeErrors=True).addCallback(report)


class UpstreamPool:
    """Upstream connections of one protocol, by account: caps, waits, the idle pool, back-off."""

    def __init__(self, protocol: str, settings: PoolSettings, reactor: Any, opener: Opener,
                 keeper: Keeper | None = None, leases: ClusterLeases | None = None) -> None:
        self.protocol = protocol
        self.opener = opener
        self.settings = settings
        self.reactor = reactor
        self.keeper = keeper
        self.leases = leases  # the cap counted cluster-wide (a shared store), or None (this gateway alone)
        self._conns: dict[str, list[PooledUpstream]] = {}      # account -> every counted connection
        self._waiters: dict[str, deque[defer.Deferred[None]]] = {}
        self._backoff: dict[str, float] = {}                    # account -> reactor time it ends
        self._busy = CONNECTIONS.labels(protocol, "busy")
        self._idle = CONNECTIONS.labels(protocol, "idle")

    @property
    def pooling(self) -> bool:
        return self.settings.idle_ttl > 0 and self.settings.max_idle > 0 and self.keeper is not None

    # -- what sessions call ---------------------------------------------------

    async def acquire(self, account: AccountRecord, client: ClientAddress | None = None) -> Lease:
        """An authenticated upstream connection for ``account``: an idle one resynced, or a new one.

        With ``per_client`` only one opened for the same client address is reused:
        the provider was told that address at login.
        """
        account_id = account.id
        self._check_backoff(account_id)
        print_ = account.fingerprint  # what its connections depend on (gateway.store.records.fingerprint)
        self._forget_changed(account_id, print_)
        now = self.reactor.seconds()
        deadline = now + self.settings.limit_wait
        reset_deadline = now + self.settings.resync_timeout
        while True:
            conn = self._take_idle(account_id, client)
            if conn is not None:
                if await self._resync(conn):
                    POOL.labels(self.protocol, "hit").inc()
                    return Lease(conn, pooled=True)
                continue
            now = self.reactor.seconds()
            if now < reset_deadline and any(c.state == "resetting" and self._serves(c, client)
                                            for c in self._conns.get(account_id, ())):
                # A client just logged out (a script's next run, a client reconnecting):
                # its connection is idle after one UNSELECT; that beats a new login.
                await self._wait(account_id, reset_deadline - now)
                continue
            cap = self.settings.max_connections
            if not cap or len(self._conns.get(account_id, ())) < cap:
                lease = await self.leases.take(self.protocol, account_id, cap) if self.leases and cap else None
                if not (self.leases and cap) or lease is not None:
                    return await self._open(account, print_, client, lease)
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise TooManyConnections()
            # Cluster-wide, a slot freed elsewhere wakes us through the store's events; look again
            # every half second anyway, in case an event was lost.
            await self._wait(account_id, min(remaining, 0.5) if self.leases else remaining)

    def forget(self, account_id: str) -> None:
        """The account changed or was deleted: close its idle connections now (busy ones close when given back)."""
        self._forget_changed(account_id, None)

    def counts(self) -> dict[str, int]:
        """{"busy": n, "idle": n} over all accounts."""
        idle = sum(1 for conns in self._conns.values() for c in conns if c.state == "idle")
        total = sum(len(conns) for conns in self._conns.values())
        return {"busy": total - idle, "idle": idle}

    def connections_of(self, account_id: str) -> int:
        return len(self._conns.get(account_id, ()))

    def back_off(self, account_id: str, delay: float) -> None:
        """Refuse logins of this account for ``delay`` seconds (the provider throttled it)."""
        until = self.reactor.seconds() + delay
        if until > self._backoff.get(account_id, 0.0):
            self._backoff[account_id] = until
        log.info("{proto} provider throttled account={account}; backing off {delay:.1f} s",
                 proto=self.protocol.upper(), account=account_id, delay=delay)

    # -- inside ---------------------------------------------------------------

    def _check_backoff(self, account_id: str) -> None:
        until = self._backoff.get(account_id)
        if until is None:
            return
        left = until - self.reactor.seconds()
        if left <= 0:
            del self._backoff[account_id]
            return
        raise ProviderThrottled(left)

    def _forget_changed(self, account_id: str, print_: str | None) -> None:
        """Connections opened for other settings than ``print_`` (all of them for None) serve no more:
        idle ones close now, busy ones when given back (an empty fingerprint marks them)."""
        for conn in list(self._conns.get(account_id, ())):
            if print_ is None or conn.fingerprint != print_:
                conn.fingerprint = ""
                if conn.state == "idle":
                    conn.close("account changed")

    def _serves(self, conn: PooledUpstream, client: ClientAddress | None) -> bool:
        return not self.settings.per_client or conn.client_host == (client.host if client else "")

    def _take_idle(self, account_id: str, client: ClientAddress | None) -> PooledUpstream | None:
        idle = [c for c in self._conns.get(account_id, ()) if c.state == "idle" and self._serves(c, client)]
        if not idle:
            return None
        conn = max(idle, key=lambda c: c.idle_since)  # the most recently used is the most likely alive
        conn.take()
        self._gauges()
        return conn

    async def _resync(self, conn: PooledUpstream) -> bool:
        assert self.keeper is not None and conn.opened is not None
        resync: defer.Deferred[None] = defer.ensureDeferred(self.keeper.resync(conn.opened))
        resync.addTimeout(self.settings.resync_timeout, self.reactor)
        try:
            await resync
        except defer.CancelledError:  # the login itself was cancelled (timeout, client gone)
            conn.close("login cancelled")
            raise
        except Exception as e:  # an unexpected answer, the connection lost, or the resync timed out
            log.info("{proto} pooled connection of account={account} failed its resync: {why}",
                     proto=self.protocol.upper(), account=conn.account, why=str(e) or type(e).__name__)
            POOL.labels(self.protocol, "discarded").inc()
            conn.close("resync failed")
            return False
        if conn.state != "resyncing":  # closed while we waited
            POOL.labels(self.protocol, "discarded").inc()
            return False
        conn.resynced()
        self._gauges()
        return True

    async def _open(self, account: AccountRecord, print_: str, client: ClientAddress | None,
                    lease: str | None = None) -> Lease:
        account_id = account.id
        conn = PooledUpstream(self, account_id, print_, client.host if client else "")
        conn.lease = lease
        self._conns.setdefault(account_id, []).append(conn)
        self._gauges()
        try:
            opened = await self.opener(account, client)
        except ProviderThrottled as e:
            conn.close("throttled")
            self.back_off(account_id, e.delay)
            raise
        except BaseException:
            conn.close("login failed")
            raise
        conn.logged_in(opened)
        POOL.labels(self.protocol, "miss").inc()
        return Lease(conn, pooled=False)

    def _wait(self, account_id: str, timeout: float) -> defer.Deferred[None]:
        waiters = self._waiters.setdefault(account_id, deque())

        def forget(d: defer.Deferred[None]) -> None:
            if d in waiters:
                waiters.remove(d)

        waiter: defer.Deferred[None] = defer.Deferred(forget)
        waiters.append(waiter)
        waiter.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda result, t: None)
        return waiter

    def _wake(self, account_id: str) -> None:
        waiters = self._waiters.get(account_id)
        if not waiters:
            return
        waiter = waiters.popleft()
        if not waiters:
            del self._waiters[account_id]
        waiter.callback(None)

    def _give_back(self, conn: PooledUpstream, selected: bool) -> None:
        if not self.pooling or conn.fingerprint == "" or conn.state != "leased":
            conn.close("not pooled")
            return
        conn.give_back()
        self._gauges()
        defer.ensureDeferred(self._reset(conn, selected))

    async def _reset(self, conn: PooledUpstream, selected: bool) -> None:
        assert self.keeper is not None and conn.opened is not None
        reset: defer.Deferred[None] = defer.ensureDeferred(self.keeper.reset(conn.opened, selected))
        reset.addTimeout(self.settings.resync_timeout, self.reactor)
        try:
            await reset
        except Exception as e:
            log.info("{proto} connection of account={account} not kept: {why}",
                     proto=self.protocol.upper(), account=conn.account, why=str(e) or type(e).__name__)
            POOL.labels(self.protocol, "discarded").inc()
            conn.close("reset failed")
            return
        if conn.state != "resetting":
            return
        conn.reset_done()
        idle = sorted((c for c in self._conns.get(conn.account, ()) if c.state == "idle"),
                      key=lambda c: c.idle_since)
        for extra in idle[: max(0, len(idle) - self.settings.max_idle)]:
            extra.close("max idle per account")
        self._gauges()
        self._wake(conn.account)

    def wake(self, account_id: str) -> None:
        """A slot of ``account_id`` came free elsewhere (another gateway released a lease)."""
        self._wake(account_id)

    def _closed(self, conn: PooledUpstream, reason: str) -> None:
        if conn.lease is not None and self.leases is not None:
            self.leases.release(self.protocol, conn.account, conn.lease)
            conn.lease = None
        conns = self._conns.get(conn.account)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.account]
            self._wake(conn.account)
        self._gauges()

    def _gauges(self) -> None:
        counts = self.counts()
        self._busy.set(counts["busy"])
        self._idle.set(counts["idle"])
