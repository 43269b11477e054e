"""The client-facing IMAP protocol: the pre-auth machine's session, then a plain byte relay."""

from __future__ import annotations

from typing import Any

from gateway.imap import preauth
from gateway.imap.upstream import IMAP_LEG
from gateway.net.opener import Opened
from gateway.net.relay import Coalescer, couple
from gateway.session import GatewaySession, SessionFactory


class IMAPGateway(GatewaySession):
    """One IMAP client: pre-auth answered here, then spliced to the upstream byte for byte."""

    name = "imap"
    scope = "imap-proxy"
    leg = IMAP_LEG
    actions = preauth
    expired_text = b"* BYE Autologout; idle for too long\r\n"

    def make_machine(self) -> preauth.PreAuth:
        return preauth.PreAuth(tls=self.tls, allow_plaintext_login=self.settings.allow_plaintext_login,
                               server_name=b"gateway", version=self.core.version.encode())

    def login_failed(self, action: preauth.Login, text: bytes) -> list[Any]:
        return self.machine.login_failed(action.tag, text)

    def login_succeeded(self, action: preauth.Login, opened: Opened) -> list[Any]:
        return self.machine.login_succeeded(action.tag, action.username, opened.result)

    def start_relay(self) -> None:
        """Upstream leftovers to the client, held client bytes upstream, then mutual producers."""
        assert self.upstream is not None and self.session is not None
        up = self.upstream.protocol
        reactor = self.core.reactor
        to_client = Coalescer(reactor, self.transport, self.session.to_client)
        leftover = up.relay_to(to_client, self._upstream_closed)
        if leftover:
            to_client.write(leftover)
        self._to_upstream = Coalescer(reactor, up.transport, self.session.to_upstream)
        pending = self.machine.take_pending()
        if pending:
            self._to_upstream.write(pending)
        couple(self.transport, up.transport)

    def relay_from_client(self, data: bytes) -> None:
        assert self._to_upstream is not None
        self._to_upstream.write(data)


def IMAPGatewayFactory(core: Any, tls: bool) -> SessionFactory:
    """Factory of IMAP sessions for one listener."""
    return SessionFactory(IMAPGateway, core, tls)
