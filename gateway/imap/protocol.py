"""The client-facing IMAP protocol: feeds the pre-auth machine, performs its actions, then relays."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.tokens import TokenCheck
from gateway.connections import LOGINS, Session
from gateway.imap import preauth
from gateway.imap.upstream import IMAP_LEG
from gateway.net.opener import Opened, open_upstream
from gateway.net.upstream import UpstreamError
from gateway.net.relay import Coalescer, couple, set_nodelay

log = Logger()


def peer_host(transport: Any) -> str:
    """The client's IP address (after any PROXY header), or '' when there is none."""
    try:
        return str(getattr(transport.getPeer(), "host", "") or "")
    except Exception:
        return ""


class IMAPGateway(Protocol):
    """One client connection: pre-auth handled here, then spliced to an upstream."""

    def __init__(self, core: Any, tls: bool) -> None:
        self.core = core
        self.tls = tls
        cfg = core.config.imap
        self.machine = preauth.PreAuth(tls=tls, allow_plaintext_login=cfg.allow_plaintext_login,
                                       server_name=b"gateway", version=core.version.encode())
        self.upstream: Opened | None = None
        self.session: Session | None = None
        self._timeout: Any = None
        self._login: defer.Deferred[None] | None = None
        self._paused = False
        self._gone = False
        self._to_upstream: Coalescer | None = None

    # Twisted callbacks
    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.transport.write(self.machine.greeting())
        self._timeout = self.core.reactor.callLater(self.core.config.imap.preauth_timeout, self._expire)

    def dataReceived(self, data: bytes) -> None:
        if self._to_upstream is not None:
            self._to_upstream.write(data)
            return
        self._perform(self.machine.receive_data(data))
        self._bound_pending()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._gone = True
        if self._to_upstream is not None:
            self._to_upstream.flush()
        self._cancel_timeout()
        if self._login is not None:
            self._login.cancel()
        if self.upstream is not None:
            self.upstream.protocol.transport.loseConnection()
        if self.session is not None:
            self.session.close()

    # Actions from the machine
    def _perform(self, actions: list[Any]) -> None:
        for action in actions:
            if self._gone:
                return
            if isinstance(action, preauth.Send):
                self.transport.write(action.data)
            elif isinstance(action, preauth.StartTLS):
                self.machine.take_pending()  # plaintext pipelined behind STARTTLS is dropped
                self.transport.startTLS(self.core.server_tls)
                self.tls = True
                self._perform(self.machine.tls_started())
            elif isinstance(action, preauth.Login):
                self._login = defer.Deferred.fromCoroutine(self._log_in(action))
                self._login.addErrback(self._login_crashed, action.tag)
            elif isinstance(action, preauth.StartRelay):
                self._start_relay()
            elif isinstance(action, preauth.Close):
                self.transport.loseConnection()

    def _bound_pending(self) -> None:
        """While the upstream login runs, stop reading once the held bytes reach the limit."""
        if self.machine.state is preauth.State.LOGGING_IN and not self._paused and \
                self.machine.buffered >= self.core.config.imap.max_pending:
            self._paused = True
            self.transport.pauseProducing()

    def _expire(self) -> None:
        self._timeout = None
        if self.session is None and not self._gone:
            self.transport.write(b"* BYE Autologout; idle for too long\r\n")
            self.transport.loseConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    # Login
    async def _log_in(self, action: preauth.Login) -> None:
        client = peer_host(self.transport)
        started = time.monotonic()
        check, token = await self.core.store.verify_token(
            action.password, "imap-proxy", client or None, account=action.username)
        if self._gone:
            return
        if check is not TokenCheck.OK:
            result = "denied-address" if check is TokenCheck.DENIED_ADDRESS else "invalid-credentials"
            text = preauth.ACCESS_DENIED if check is TokenCheck.DENIED_ADDRESS else preauth.INVALID_CREDENTIALS
            self._fail(action.tag, text, action.username, client, "-", result)
            return
        account = await self.core.store.get_account(action.username, with_secrets=True)
        if self._gone:
            return
        if account is None:
            self._fail(action.tag, preauth.INVALID_CREDENTIALS, action.username, client, "-", "unknown-account")
            return
        opening = defer.Deferred.fromCoroutine(open_upstream(self.core, account, IMAP_LEG))
        opening.addTimeout(self.core.config.imap.login_timeout, self.core.reactor,
                           onTimeoutCancel=_login_timed_out)
        try:
            opened = await opening
        except UpstreamError as e:
            self._fail(action.tag, preauth.unavailable(str(e)), action.username, client, "-",
                       "unavailable", reason=str(e))
            return
        if self._gone:
            opened.protocol.transport.loseConnection()
            return
        self.upstream = opened
        LOGINS.labels("imap", "ok").inc()
        log.info("IMAP login account={account} client={client} upstream={upstream} source={source} "
                 "proxy={proxy} result=ok ms={ms:.0f}", account=action.username, client=client,
                 upstream=str(opened.target), source=opened.route.source or "-",
                 proxy=opened.route.proxy or "-", ms=(time.monotonic() - started) * 1000)
        self.session = self.core.connections.open(
            "imap", action.username, client, str(opened.target), opened.route.source, opened.route.proxy)
        self._perform(self.machine.login_succeeded(action.tag, action.username, opened.result))

    def _fail(self, tag: bytes, text: bytes, account: str, client: str, upstream: str, result: str,
              reason: str = "") -> None:
        LOGINS.labels("imap", result).inc()
        log.info("IMAP login account={account} client={client} upstream={upstream} result={result} {reason}",
                 account=account, client=client, upstream=upstream, result=result, reason=reason)
        self._resume()
        self._perform(self.machine.login_failed(tag, text))

    def _login_crashed(self, failure: Failure, tag: bytes) -> None:
        if failure.check(defer.CancelledError) or self._gone:
            return None
        log.failure("IMAP login crashed", failure)
        self._fail(tag, preauth.unavailable("internal error"), "?", peer_host(self.transport), "-", "error")
        return None

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # Relay
    def _start_relay(self) -> None:
        self._cancel_timeout()
        assert self.upstream is not None and self.session is not None
        up = self.upstream.protocol
        session = self.session
        reactor = self.core.reactor
        to_client = Coalescer(reactor, self.transport, session.to_client)
        leftover = up.relay_to(to_client, self._upstream_closed)
        if leftover:
            to_client.write(leftover)
        self._to_upstream = Coalescer(reactor, up.transport, session.to_upstream)
        pending = self.machine.take_pending()
        if pending:
            self._to_upstream.write(pending)
        couple(self.transport, up.transport)
        self._resume()

    def _upstream_closed(self) -> None:
        if not self._gone:
            self.transport.loseConnection()


def _login_timed_out(result: Any, timeout: float) -> Any:
    if isinstance(result, Failure) and result.check(defer.CancelledError):
        raise UpstreamError(f"upstream login timed out after {timeout:.0f} s")
    return result


class IMAPGatewayFactory(Factory):
    """Makes IMAPGateway protocols; ``tls`` says whether the listener is implicit TLS."""

    def __init__(self, core: Any, tls: bool) -> None:
        self.core = core
        self.tls = tls

    def buildProtocol(self, addr: Any) -> IMAPGateway:
        proto = IMAPGateway(self.core, self.tls)
        proto.factory = self
        return proto
