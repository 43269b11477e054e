"""The client-facing IMAP protocol: the pre-auth machine's session, then a byte relay the tracker follows."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from gateway.imap import preauth
from gateway.imap.tracker import Tracker
from gateway.net.opener import Opened
from gateway.net.relay import Coalescer, couple
from gateway.session import GatewaySession, SessionDeps, SessionFactory


log = Logger()


class _Tracked:
    """The upstream's bytes: shown to the tracker, then relayed unchanged (the sink ``relay_to`` writes to)."""

    __slots__ = ("_tracker", "_sink")

    def __init__(self, tracker: Tracker, sink: Coalescer) -> None:
        self._tracker = tracker
        self._sink = sink

    def write(self, data: bytes) -> None:
        self._tracker.from_server(data)
        self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()


class IMAPGateway(GatewaySession):
    """One IMAP client: pre-auth answered here, then spliced to the upstream byte for byte.

    A :class:`Tracker` follows the relayed bytes. A client ``LOGOUT`` at a
    clean point (nothing in flight, no IDLE, COMPRESS or ENABLE used) is
    answered here and the upstream connection goes back to the pool.
    """

    name = "imap"
    scope = "imap-proxy"
    actions = preauth
    expired_text = b"* BYE Autologout; idle for too long\r\n"
    too_many_text = b"* BYE Too many connections\r\n"
    ended_text = b"* BYE Session ended by administrator\r\n"
    shutdown_text = b"* BYE Server shutting down\r\n"

    def busy(self) -> bool:
        """A command other than IDLE awaits its answer (known only with the tracker, i.e. pooling on)."""
        tracker = self.tracker
        return tracker is not None and any(name != b"IDLE" for name in tracker.in_flight.values())

    def __init__(self, deps: SessionDeps, tls: bool) -> None:
        super().__init__(deps, tls)
        self.tracker: Tracker | None = None
        self._to_client: Coalescer | None = None
        self._idle_call: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        super().connectionLost(reason) if reason is not None else super().connectionLost()

    def make_machine(self) -> preauth.PreAuth:
        return preauth.PreAuth(tls=self.tls, allow_plaintext_login=self.settings.allow_plaintext_login,
                               server_name=b"gateway", version=self.deps.version.encode())

    def login_failed(self, action: preauth.Login, text: bytes) -> list[Any]:
        return self.machine.login_failed(action.tag, text)

    def login_succeeded(self, action: preauth.Login, opened: Opened) -> list[Any]:
        return self.machine.login_succeeded(action.tag, action.username, opened.result)

    def start_relay(self) -> None:
        """Upstream leftovers to the client, held client bytes upstream, then mutual producers."""
        assert self.upstream is not None and self.session is not None
        up = self.upstream.protocol
        reactor = self.reactor
        self._to_client = to_client = Coalescer(reactor, self.transport, self.session.to_client)
        if self.deps.upstreams.pooling:
            self.tracker = tracker = Tracker()
            leftover = up.relay_to(_Tracked(tracker, to_client), self._upstream_closed)
            tracker.from_server(leftover)
        else:  # nothing to keep: a plain relay, LOGOUT goes upstream
            leftover = up.relay_to(to_client, self._upstream_closed)
        if leftover:
            to_client.write(leftover)
        self._to_upstream = Coalescer(reactor, up.transport, self.session.to_upstream)
        self.stop_watching_output()
        self._coupling = couple(self.transport, up.transport, self.flow)
        pending = self.machine.take_pending()
        if pending:
            self.relay_from_client(pending)
        if self.settings.idle_timeout:
            self._idle_call = reactor.callLater(self.settings.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """Close a relayed session that moved no byte either way for imap.idle_timeout seconds."""
        self._idle_call = None
        if self._gone or self.session is None:
            return
        quiet = self.reactor.seconds() - self.session.last_active
        timeout = self.settings.idle_timeout
        if quiet < timeout:
            self._idle_call = self.reactor.callLater(timeout - quiet, self._check_idle)
            return
        log.info("IMAP session of account={account} client={client} closed: idle for {seconds:.0f} s",
                 account=self.session.account, client=self.client, seconds=quiet)
        if self._to_client is not None:
            self._to_client.write(self.expired_text)
            self._to_client.flush()
        self.close_firmly()

    def relay_from_client(self, data: bytes) -> None:
        assert self._to_upstream is not None
        if self.tracker is None:
            self._to_upstream.write(data)
            return
        at = self.tracker.from_client(data)
        if at < 0:
            self._to_upstream.write(data)
            return
        if at:
            self._to_upstream.write(data[:at])
        self._log_out(self.tracker.logout_tag)

    def _log_out(self, tag: bytes) -> None:
        """Answer the client's LOGOUT ourselves and give the clean upstream back."""
        assert self._to_client is not None
        self._to_client.write(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
        self._to_client.flush()
        self.give_back_upstream()
        self.close_firmly()

    def upstream_reusable(self) -> tuple[str, bool]:
        tracker = self.tracker
        if tracker is None:
            return "pooling is off", False
        return tracker.reason, tracker.selected


def IMAPGatewayFactory(deps: SessionDeps, tls: bool) -> SessionFactory:
    """Factory of IMAP sessions for one listener."""
    return SessionFactory(IMAPGateway, deps, tls)
