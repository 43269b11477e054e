"""A client connection of either protocol: pre-auth machine, token check, upstream lease, relay.

The IMAP and SMTP protocols subclass :class:`GatewaySession` and fill in what
differs: the pre-auth machine and its action classes, the token scope, the
reply texts, how the relay starts and whether the upstream may be reused.

A session gets exactly what it uses (:class:`SessionDeps`): a token checker,
an upstream source that lends it an authenticated upstream connection
(:class:`gateway.net.pool.Lease`), the live-session registry, the clock.
When the client is done, the lease goes back: ``release()`` when the
protocol knows the upstream is clean, ``close()`` otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import netaddr
from types import ModuleType
from typing import Any
from typing import Protocol as Interface

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.auth.tokens import TokenCheck, looks_like_token
from gateway.connections import Connections, Session
from gateway.metrics import LOGIN_SECONDS, LOGINS, SESSIONS_TOTAL
from gateway.net.opener import ClientAddress, Opened
from gateway.limits import MAX_DELAY, AuthLimiter, ConnectionLimiter
from gateway.net.flow import LOGIN, OUTPUT, Flow, FlowProducer
from gateway.net.pool import Lease
from gateway.net.relay import Coalescer, Coupling, quickack, set_nodelay, tcp_socket
from gateway.net.transport import transport_of
from gateway.net.upstream import UpstreamError
from gateway.store.base import StoreError
from gateway.store.records import AccountRecord

log = Logger()


def peer_host(transport: Any) -> str:
    """The client's IP address (after any PROXY header), or '' when there is none."""
    try:
        return str(getattr(transport.getPeer(), "host", "") or "")
    except Exception:
        return ""


def peer_port(transport: Any) -> int:
    """The client's port (after any PROXY header), or 0."""
    try:
        return int(getattr(transport.getPeer(), "port", 0) or 0)
    except Exception:
        return 0


def loggable(name: str) -> str:
    """A client-typed user name as it may appear in a log line.

    Control characters are escaped (a literal can carry a newline: no forged
    log lines), long names are cut, and a name shaped like a token (a client
    with user and password swapped) is not written at all.
    """
    if looks_like_token(name):
        return "<token-like user name>"
    text = name[:100].encode("unicode_escape").decode("ascii")
    return text + ("..." if len(name) > 100 else "")


class TokenChecker(Interface):
    """Checks a client's token and finds its account (the store)."""

    def check_login(self, secret: str, scope: str, peer_ip: str | None, account: str
                    ) -> defer.Deferred[tuple[TokenCheck, AccountRecord | None, str | None]]: ...


class UpstreamSource(Interface):
    """Lends authenticated upstream connections (:class:`gateway.net.pool.UpstreamPool`)."""

    @property
    def pooling(self) -> bool:
        """Whether a released connection may serve a later client (else release means close)."""

    async def acquire(self, account: AccountRecord, client: ClientAddress | None = None) -> Lease: ...


@dataclass
class SessionDeps:
    """What a client session of one protocol may use."""

    reactor: Any
    settings: Any                # IMAPConfig or SMTPConfig
    tokens: TokenChecker
    upstreams: UpstreamSource
    connections: Connections
    server_tls: Any              # the listener's TLS options, for STARTTLS
    version: str = ""
    auth_limits: AuthLimiter | None = None
    connection_limits: ConnectionLimiter | None = None
    trusted_proxies: Any = None  # netaddr.IPSet of who may send a PROXY header; None: anyone


CLOSE_GRACE = 2.0  # seconds a closing connection may take to flush before it is aborted
# Bytes written before login while the client's transport says its buffer is full (the
# client does not read): past this the connection is cut. A client that reads never
# gets near it; one that sends `a CAPABILITY` or `EHLO x` without reading reaches it
# within one socket read's worth of commands.
MAX_QUEUED_OUTPUT = 256 * 1024


def tls_failure(error: BaseException) -> str:
    """OpenSSL's reason for a failed handshake, short: `tlsv1 alert unknown ca`, `wrong version number`."""
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple) and details[-1]:
        return str(details[-1][-1])[:120] or type(error).__name__
    text = str(error).strip()
    return text.splitlines()[0][:120] if text else type(error).__name__


def behind_proxy_header(transport: Any) -> bool:
    """Is a PROXY-protocol wrapper under this transport (the client's address comes with the header)?"""
    from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper

    for _ in range(8):
        if transport is None:
            return False
        if isinstance(transport, HAProxyProtocolWrapper):
            return True
        transport = getattr(transport, "transport", None)
    return False


def _login_timed_out(result: Any, timeout: float) -> Any:
    if isinstance(result, Failure) and result.check(defer.CancelledError):
        raise UpstreamError(f"upstream login timed out after {timeout:.0f} s")
    return result


@implementer(IHandshakeListener)
class GatewaySession(Protocol):
    """One client connection; subclasses say what is protocol-specific."""

    name = ""            # "imap" | "smtp": logs, metrics and /v1/connections
    scope = ""           # the token scope this listener needs
    actions: ModuleType  # the pre-auth module: its actions, State and reply texts
    expired_text = b""   # written when the pre-auth timeout fires
    too_many_text = b""  # written when a connection cap refuses the connection
    ended_text = b""     # written when an administrator ends the session
    shutdown_text = b""  # written when the gateway shuts down

    def __init__(self, deps: SessionDeps, tls: bool) -> None:
        self.deps = deps
        self.reactor = deps.reactor
        self.tls = tls
        self.settings = deps.settings
        self.machine: Any = self.make_machine()
        self.lease: Lease | None = None
        self.upstream: Opened | None = None
        self._upstream_gone = False
        self.session: Session | None = None
        self.client = ""
        self._timeout: Any = None
        self._abort_call: Any = None
        self.flow: Flow | None = None
        self._output_watch: FlowProducer | None = None
        self._queued = 0  # bytes written since the transport said it is full
        self._refused = False
        self._ended_by_admin = False
        self._tls_pending = tls  # a TLS handshake has begun and not completed (logged if it fails)
        self._counted = False         # in the connection limiter's total
        self._counted_address = ""    # in its per-address count
        self._fail_call: Any = None   # a failed login's delayed answer
        self._login: defer.Deferred[None] | None = None
        self._gone = False
        self._to_upstream: Coalescer | None = None
        self._coupling: Coupling | None = None
        self._socket: Any = None
        self._started_at = 0.0  # when the session start was logged (0: not logged, no end line either)

    # What subclasses provide
    def make_machine(self) -> Any:
        raise NotImplementedError

    def reply(self, kind: str, reason: str = "") -> bytes:
        """The failure text for ``kind`` (invalid, denied or unavailable), from the machine's module."""
        if kind == "denied":
            return self.actions.ACCESS_DENIED
        if kind == "invalid":
            return self.actions.INVALID_CREDENTIALS
        return self.actions.unavailable(reason)

    def login_failed(self, action: Any, text: bytes) -> list[Any]:
        raise NotImplementedError

    def login_succeeded(self, action: Any, opened: Opened) -> list[Any]:
        raise NotImplementedError

    def start_relay(self) -> None:
        raise NotImplementedError

    def relay_from_client(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_reusable(self) -> tuple[str, bool]:
        """(why the upstream may not serve another client, or "" if it may; is a mailbox selected).

        Never, unless a subclass follows the relayed stream and knows better."""
        return "not followed", False

    # Twisted callbacks
    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self._socket = tcp_socket(self.transport)
        if not self._proxy_allowed():
            return
        limits = self.deps.connection_limits
        if limits is not None:
            address = "" if behind_proxy_header(self.transport) else peer_host(self.transport)
            if not limits.admit(address):
                self._refuse("limits.max_connections")
                return
            self._counted = True
            if address and not self._admit_address(address):
                return
        self.deps.connections.clients.add(self)
        if not behind_proxy_header(self.transport):
            self._log_start()
        self.flow = Flow(transport_of(self))
        if not self.tls:  # on TLS, once the handshake is done (handshakeCompleted)
            self.watch_output()
        self._send(self.machine.greeting())
        self._timeout = self.reactor.callLater(self.settings.preauth_timeout, self._expire)

    def _proxy_allowed(self) -> bool:
        """On a PROXY-protocol listener, only trusted_proxies may connect: anyone else could claim
        any client address (CIDR checks, limits and logs rely on it). Others are closed unanswered."""
        trusted = self.deps.trusted_proxies
        if trusted is None or self._socket is None or not behind_proxy_header(self.transport):
            return True
        try:
            hop = self._socket.getpeername()[0]
            if netaddr.IPAddress(hop) in trusted:
                return True
        except (OSError, netaddr.AddrFormatError, ValueError):
            hop = "?"
        log.info("{proto} connection from {hop} closed: not in trusted_proxies, may not send a PROXY header",
                 proto=self.name.upper(), hop=hop)
        self._refused = True
        transport_of(self).abortConnection()
        return False

    def _admit_address(self, address: str) -> bool:
        limits = self.deps.connection_limits
        if limits is None or limits.admit_address(address):
            self._counted_address = address
            return True
        self._refuse("limits.max_connections_per_ip")
        return False

    def _refuse(self, cap: str) -> None:
        log.info("{proto} connection from {client} refused: {cap} reached", proto=self.name.upper(),
                 client=peer_host(self.transport) or "-", cap=cap)
        self._refused = True
        self.close_firmly(self.too_many_text)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._counted and not self._counted_address and self.session is None:
            # Behind a PROXY header the client's address is known from the first data on.
            address = peer_host(self.transport)
            if address and not self._admit_address(address):
                return
        if not self._started_at and not self._gone:
            self._log_start()  # behind a PROXY header: the client's address is known now
        quickack(self._socket)
        if self.session is not None and self.lease is None:
            return  # the upstream was given back (LOGOUT answered here): nothing may reach it now
        if self.session is not None and self.upstream is not None:
            self.relay_from_client(data)
            return
        self._perform(self.machine.receive_data(data))
        self._bound_pending()

    def _log_start(self) -> None:
        self._started_at = self.reactor.seconds()
        SESSIONS_TOTAL.labels(self.name).inc()
        log.info("{proto} session start client={client} tls={tls}", event="session.start",
                 proto=self.name.upper(), client=peer_host(self.transport) or "-",
                 tls="yes" if self.tls else "no")

    def _log_end(self) -> None:
        session = self.session
        log.info("{proto} session end client={client} account={account} seconds={seconds:.1f} "
                 "to_upstream={to_upstream} to_client={to_client}", event="session.end",
                 proto=self.name.upper(), client=peer_host(self.transport) or "-",
                 account=session.account if session else "-",
                 seconds=self.reactor.seconds() - self._started_at,
                 to_upstream=session.bytes_to_upstream if session else 0,
                 to_client=session.bytes_to_client if session else 0)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._gone = True
        self.deps.connections.clients.discard(self)
        if self._tls_pending and reason.check(SSL.Error):
            log.info("{proto} TLS handshake from {client} failed: {why}", proto=self.name.upper(),
                     client=peer_host(self.transport) or "-", why=tls_failure(reason.value))
        if self._to_upstream is not None:
            self._to_upstream.flush()
        self._cancel_timeout()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._fail_call is not None and self._fail_call.active():
            self._fail_call.cancel()
        self._fail_call = None
        limits = self.deps.connection_limits
        if limits is not None:
            if self._counted:
                limits.release()
                self._counted = False
            if self._counted_address:
                limits.release_address(self._counted_address)
                self._counted_address = ""
        if self._login is not None:
            self._login.cancel()
        self.give_back_upstream()
        if self.session is not None:
            self.session.close()
        if self._started_at:
            self._log_end()

    # Before login: answers only as fast as the client reads them
    def _send(self, data: bytes) -> None:
        """Write a pre-auth answer; cut a client that keeps asking without reading."""
        transport_of(self).write(data)
        if self._output_watch is not None and self.flow is not None and self.flow.holds(OUTPUT):
            self._queued += len(data)
            if self._queued > MAX_QUEUED_OUTPUT and not self._gone:
                log.info("{proto} connection from {client} cut: {n} bytes of answers queued, it does not read",
                         proto=self.name.upper(), client=peer_host(self.transport) or "-", n=self._queued)
                self._output_watch = None
                transport_of(self).abortConnection()

    def _output_full(self) -> None:
        self._queued = 0

    def _output_drained(self) -> None:
        self._queued = 0

    def handshakeCompleted(self) -> None:
        """TLS is up (implicit TLS or after STARTTLS): answers are paced by the client's reading now."""
        self._tls_pending = False
        if self.session is None and not self._gone:
            self.watch_output()

    def watch_output(self) -> None:
        """Be told when the client stops reading our answers (its transport's buffer is full).

        Not during a TLS handshake: the TLS layer pauses its producer while it
        holds our greeting, and pausing our reading then would stall the
        handshake that would release it.
        """
        if self._output_watch is None and self.flow is not None:
            self._output_watch = FlowProducer(self.flow, OUTPUT, on_pause=self._output_full,
                                              on_resume=self._output_drained)
            transport_of(self).registerProducer(self._output_watch, True)

    def stop_watching_output(self) -> None:
        """The relay takes over flow control (its Coupling registers the producers)."""
        watch, self._output_watch = self._output_watch, None
        if watch is not None:
            watch.flow = None
            transport_of(self).unregisterProducer()
            if self.flow is not None:
                self.flow.resume(OUTPUT)

    def busy(self) -> bool:
        """Is the client in the middle of something worth finishing before shutdown (a subclass knows)?"""
        return False

    def shut_down(self, deadline: float) -> None:
        """The gateway is stopping: say so and close, once nothing is in flight or at ``deadline``."""
        if self._gone:
            return
        if self.session is not None and self.busy() and self.reactor.seconds() < deadline:
            self.reactor.callLater(0.1, self.shut_down, deadline)
            return
        self._say_and_end(self.shutdown_text)

    def end_by_admin(self) -> None:
        """DELETE /v1/connections/{id} or a token revoked with ?disconnect=true: tell the client, close
        both legs (the upstream is not kept: whoever is being cut off, its connection goes too)."""
        if self._gone:
            return
        log.info("{proto} session of account={account} client={client} ended by administrator",
                 proto=self.name.upper(), account=self.session.account if self.session else "-",
                 client=self.client or "-")
        self._say_and_end(self.ended_text)
        if self.session is not None:
            self.session.close()  # gone from /v1/connections now, not when the close completes

    def _say_and_end(self, text: bytes) -> None:
        """Write ``text`` after whatever is queued for the client, close the upstream (not pooled:
        the session is being cut off) and close the client firmly."""
        self._ended_by_admin = True
        to_client = getattr(self, "_to_client", None)  # the relay's coalescer, once relaying
        if to_client is not None:
            to_client.write(text)
            to_client.flush()
        else:
            transport_of(self).write(text)
        self.give_back_upstream()
        self.close_firmly()

    def give_back_upstream(self) -> None:
        """End the lease: release a clean upstream to the pool, close any other."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        up = lease.opened.protocol
        if self._to_upstream is not None:
            self._to_upstream.flush()
        why_not, selected = self.upstream_reusable()
        if self._upstream_gone or up.transport is None:
            why_not = "upstream closed"
        elif self._ended_by_admin:
            why_not = "session ended by administrator"
        if why_not:
            if self.deps.upstreams.pooling:
                log.info("{proto} upstream of account={account} closed, not reusable: {why}",
                         proto=self.name.upper(), account=self.session.account if self.session else "-",
                         why=why_not)
            lease.close()
            return
        up.take_back()
        if self._coupling is not None:
            self._coupling.detach()
            self._coupling = None
        lease.release(selected)

    # Actions from the machine
    def _perform(self, actions: list[Any]) -> None:
        kinds = self.actions
        for action in actions:
            if self._gone:
                return
            if isinstance(action, kinds.Send):
                if self.session is None:
                    self._send(action.data)
                else:
                    transport_of(self).write(action.data)
            elif isinstance(action, kinds.StartTLS):
                self.machine.take_pending()  # plaintext pipelined behind STARTTLS is dropped
                self.stop_watching_output()  # until handshakeCompleted
                self._tls_pending = True
                transport_of(self).startTLS(self.deps.server_tls)
                self.tls = True
                self._perform(self.machine.tls_started())
            elif isinstance(action, kinds.Login):
                self._login = defer.Deferred.fromCoroutine(self._log_in(action))
                self._login.addErrback(self._login_crashed, action)
            elif isinstance(action, kinds.StartRelay):
                self._cancel_timeout()
                self.start_relay()
                self.machine = None  # its work is done; an idle relayed session keeps less
                self._resume()
            elif isinstance(action, kinds.Close):
                self.close_firmly()

    def _bound_pending(self) -> None:
        """While the upstream login runs, stop reading once the held bytes reach the limit."""
        if self.machine is not None and self.machine.state is self.actions.State.LOGGING_IN and \
                self.flow is not None and self.machine.buffered >= self.settings.max_pending:
            self.flow.pause(LOGIN)

    def _resume(self) -> None:
        if self.flow is not None:
            self.flow.resume(LOGIN)

    def _expire(self) -> None:
        self._timeout = None
        if self.session is None and not self._gone:
            self.close_firmly(self.expired_text)

    def close_firmly(self, text: bytes = b"") -> None:
        """Write ``text`` and close; abort if that has not happened within CLOSE_GRACE seconds.

        A polite close alone never ends a connection whose TLS handshake is not
        done (a bare TCP connect to an implicit-TLS port, a client silent after
        STARTTLS: the TLS layer holds the close until the handshake), nor one
        whose client does not read what is queued for it.
        """
        transport = transport_of(self)
        if text:
            transport.write(text)
        # A registered producer holds a TLS close until it is unregistered: let go of them first.
        self.stop_watching_output()
        if self._coupling is not None:
            self._coupling.detach()
            self._coupling = None
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._gone:
            log.info("{proto} connection from {client} aborted: it did not close within {grace:.0f} s",
                     proto=self.name.upper(), client=peer_host(self.transport) or "-", grace=CLOSE_GRACE)
            transport_of(self).abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    # Login
    async def _log_in(self, action: Any) -> None:
        self.client = client = peer_host(self.transport)
        started = time.monotonic()
        limits = self.deps.auth_limits
        if limits is not None and limits.locked(client):
            # Locked out: the bad-token answer whatever the token, without checking it.
            self._fail_later(MAX_DELAY, action, self.reply("invalid"), "locked-out")
            return
        try:
            check, account, token_id = await self.deps.tokens.check_login(
                action.password, self.scope, client or None, action.username)
        except StoreError as e:  # the store (Redis) is unreachable: say so, like an upstream that is
            self._fail(action, self.reply("unavailable", str(e)), "store", detail=str(e))
            return
        if self._gone:
            return
        if check is not TokenCheck.OK or account is None:
            denied = check is TokenCheck.DENIED_ADDRESS
            reason = "unknown-account" if check is TokenCheck.OK else check.reason
            delay = limits.failed(client, action.username, self.name) if limits is not None else 0.0
            self._fail_later(delay, action, self.reply("denied" if denied else "invalid"), reason)
            return
        if limits is not None:
            limits.succeeded(client)
        acquiring: defer.Deferred[Lease] = defer.ensureDeferred(
            self.deps.upstreams.acquire(account, ClientAddress(client, peer_port(self.transport))))
        acquiring.addTimeout(self.settings.login_timeout, self.reactor, onTimeoutCancel=_login_timed_out)
        try:
            lease = await acquiring
        except UpstreamError as e:
            self._fail(action, self.reply("unavailable", str(e)), e.code, detail=str(e))
            return
        except StoreError as e:
            self._fail(action, self.reply("unavailable", str(e)), "store", detail=str(e))
            return
        if self._gone:
            lease.release()  # fresh from a login or a resync: clean, nothing selected
            return
        self.lease = lease
        self.upstream = opened = lease.opened
        took = time.monotonic() - started
        LOGINS.labels(self.name, "ok", "").inc()
        LOGIN_SECONDS.labels(self.name).observe(took)
        log.info("{proto} login account={account} client={client} upstream={upstream} source={source} "
                 "proxy={proxy} result=ok ms={ms:.0f} pooled={pooled}", event="login", proto=self.name.upper(),
                 account=loggable(action.username), client=client, upstream=str(opened.target),
                 source=opened.route.source or "-", proxy=opened.route.proxy or "-",
                 pooled="yes" if lease.pooled else "no", ms=took * 1000, result="ok")
        self.session = self.deps.connections.open(
            self.name, action.username, client, str(opened.target), opened.route.source, opened.route.proxy,
            pooled=lease.pooled)
        self.session.token_id = token_id
        self.session.ender = self.end_by_admin
        self._perform(self.login_succeeded(action, opened))

    def _fail_later(self, delay: float, action: Any, text: bytes, reason: str) -> None:
        """Answer a failed login, after ``delay`` seconds when the limits say so (commands wait meanwhile)."""
        if delay <= 0:
            self._fail(action, text, reason)
            return
        self._fail_call = self.reactor.callLater(delay, self._fail, action, text, reason,
                                                 f"(answer held {delay:.1f} s)")

    def _fail(self, action: Any, text: bytes, reason: str, detail: str = "") -> None:
        """A refused login: ``reason`` is its code (bad-token, revoked, scope, cidr, unknown-account,
        locked-out, oauth2, upstream, upstream-auth, throttled, limit, error)."""
        self._fail_call = None
        if self._gone:
            return
        LOGINS.labels(self.name, "fail", reason).inc()
        log.info("{proto} login account={account} client={client} upstream=- result=fail reason={reason} {detail}",
                 event="login", proto=self.name.upper(), account=loggable(action.username), client=self.client,
                 result="fail", reason=reason, detail=detail)
        self._resume()
        self._perform(self.login_failed(action, text))

    def _login_crashed(self, failure: Failure, action: Any) -> None:
        if failure.check(defer.CancelledError) or self._gone:
            return None
        log.failure("{proto} login crashed", failure, proto=self.name.upper())
        self._fail(action, self.reply("unavailable", "internal error"), "error")
        return None

    def _upstream_closed(self) -> None:
        self._upstream_gone = True
        if not self._gone:
            transport_of(self).loseConnection()


class SessionFactory(Factory):
    """Makes one protocol class; ``tls`` says whether the listener is implicit TLS."""

    def __init__(self, protocol: type[GatewaySession], deps: SessionDeps, tls: bool) -> None:
        self.session_class = protocol
        self.deps = deps
        self.tls = tls

    def buildProtocol(self, addr: Any) -> GatewaySession:
        proto = self.session_class(self.deps, self.tls)
        proto.factory = self
        return proto
