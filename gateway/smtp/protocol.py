"""The client-facing SMTP protocol: the pre-auth machine's session, then a relay through the filter."""

from __future__ import annotations

from typing import Any

from gateway.net.opener import Opened
from gateway.net.flow import FILTER
from gateway.net.relay import Coalescer, couple
from gateway.net.transport import transport_of
from gateway.session import GatewaySession, SessionDeps, SessionFactory
from gateway.smtp import preauth
from gateway.smtp.filter import CloseBoth, Mode, RelayFilter, ToClient, ToUpstream, parse_ehlo


class _FromUpstream:
    """The upstream's bytes, fed to the filter (the sink ``relay_to`` writes to)."""

    def __init__(self, session: "SMTPGateway") -> None:
        self._session = session

    def write(self, data: bytes) -> None:
        relay_filter = self._session.filter
        assert relay_filter is not None  # made in start_relay before relay_to hands us the upstream
        self._session.apply(relay_filter.from_upstream(data))

    def flush(self) -> None:
        self._session.flush()


class SMTPGateway(GatewaySession):
    """One SMTP client: EHLO/STARTTLS/AUTH answered here, then relayed through :class:`RelayFilter`."""

    name = "smtp"
    scope = "smtp"
    actions = preauth
    expired_text = b"421 4.4.2 Timeout waiting for authentication\r\n"
    too_many_text = b"421 4.7.0 Too many connections\r\n"
    ended_text = b"421 4.3.2 Session ended by administrator\r\n"
    shutdown_text = b"421 4.3.2 Server shutting down\r\n"

    def busy(self) -> bool:
        """A message is being sent (DATA): it may finish within shutdown_grace."""
        return self.filter is not None and self.filter.mode in (Mode.DATA_REPLY, Mode.BODY)

    def __init__(self, deps: SessionDeps, tls: bool) -> None:
        super().__init__(deps, tls)
        self.filter: RelayFilter | None = None
        self._to_client: Coalescer | None = None

    def make_machine(self) -> preauth.PreAuth:
        return preauth.PreAuth(tls=self.tls, hostname=self.settings.hostname.encode("idna"),
                               max_size=self.settings.max_message_size,
                               allow_plaintext_login=self.settings.allow_plaintext_login)

    def login_failed(self, action: preauth.Login, text: bytes) -> list[Any]:
        return self.machine.login_failed(text)

    def login_succeeded(self, action: preauth.Login, opened: Opened) -> list[Any]:
        return self.machine.login_succeeded()

    def start_relay(self) -> None:
        assert self.upstream is not None and self.session is not None
        up = self.upstream.protocol
        reactor = self.reactor
        self.filter = RelayFilter(parse_ehlo(self.upstream.result.ehlo),
                                  hostname=self.settings.hostname.encode("idna"),
                                  max_size=self.settings.max_message_size)
        self._to_client = Coalescer(reactor, self.transport, self.session.to_client)
        self._to_upstream = Coalescer(reactor, up.transport, self.session.to_upstream)
        leftover = up.relay_to(_FromUpstream(self), self._upstream_closed)
        if leftover:
            self.apply(self.filter.from_upstream(leftover))
        self.stop_watching_output()
        self._coupling = couple(self.transport, up.transport, self.flow)
        pending = self.machine.take_pending()
        if pending:
            self.relay_from_client(pending)

    def relay_from_client(self, data: bytes) -> None:
        assert self.filter is not None
        self.apply(self.filter.from_client(data))

    def apply(self, actions: list[Any]) -> None:
        """Carry out the filter's actions, and hold the client while the filter holds too much."""
        for action in actions:
            if isinstance(action, ToUpstream):
                assert self._to_upstream is not None  # the filter's actions come after start_relay
                self._to_upstream.write(action.data)
            elif isinstance(action, ToClient):
                assert self._to_client is not None
                self._to_client.write(action.data)
            elif isinstance(action, CloseBoth):
                self.flush()
                self.close_firmly()
                if self.upstream is not None:
                    self.upstream.protocol.transport.loseConnection()
        if self.filter is None or self._gone:
            return
        if self.flow is None:
            return
        if self.filter.should_pause_client:
            self.flow.pause(FILTER)
        else:
            self.flow.resume(FILTER)

    def flush(self) -> None:
        if self._to_client is not None:
            self._to_client.flush()
        if self._to_upstream is not None:
            self._to_upstream.flush()


def SMTPGatewayFactory(deps: SessionDeps, tls: bool) -> SessionFactory:
    """Factory of SMTP sessions for one listener."""
    return SessionFactory(SMTPGateway, deps, tls)
