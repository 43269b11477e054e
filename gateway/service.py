"""The running gateway: shared state (core) and the listeners as Twisted services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from twisted.application import service, strports
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from gateway import __version__
from gateway.auth.oauth2 import TokenSource
from gateway.config import Config
from gateway.connections import Connections
from gateway.imap.protocol import IMAPGatewayFactory
from gateway.smtp.protocol import SMTPGatewayFactory
from gateway.net.connector import Connector
from gateway.net.policy import check_configured, configured_addresses
from gateway.tls import TLS_PREFIXES, ensure_certificate, listener_endpoint, server_options

log = Logger()


@dataclass
class Core:
    """What every session needs: config, store, token source, connector, live sessions."""

    config: Config
    reactor: Any
    store: Any
    tokens: TokenSource
    connector: Connector
    server_tls: Any
    connections: Connections = field(default_factory=Connections)
    version: str = __version__

    @property
    def imap_id(self) -> bytes:
        return b'("name" "gateway" "version" "' + self.version.encode() + b'")'


class StoreService(service.Service):
    """Starts and stops the store's worker thread with the application."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Any:
        super().stopService()
        return self.store.stop()


def make_core(config: Config, reactor: Any) -> Core:
    """Open the store, prepare TLS material and the outbound connector."""
    from gateway.store import open_store
    from gateway.store.base import AsyncStore

    check_configured(config.network)  # ConfigError when a source address is not on this machine
    ensure_certificate(config.tls.cert, config.tls.key)
    store = AsyncStore(open_store(config), reactor)
    connector = Connector(reactor, config, store)
    tokens = TokenSource(store, reactor, margin=config.upstream.refresh_margin,
                         timeout=config.upstream.connect_timeout, proxies_for=connector.requests_proxies)
    reactor.callWhenRunning(connector.ehlo.warm, configured_addresses(config.network))
    return Core(config=config, reactor=reactor, store=store, tokens=tokens, connector=connector,
                server_tls=server_options(config.tls.cert, config.tls.key))


def make_service(config: Config, reactor: Any) -> service.MultiService:
    """All listeners of the gateway under one MultiService."""
    from gateway.api.app import make_site

    core = make_core(config, reactor)
    top = service.MultiService()
    StoreService(core.store).setServiceParent(top)


    def listen(description: str, factory: Any, tls: bool) -> None:
        """TLS listeners get the gateway's certificate, and `haproxy:ssl:` the PROXY header before TLS."""
        parse_with = reactor
        if tls:
            description, parse_with = listener_endpoint(description, config.tls.cert, config.tls.key, reactor)
        strports.service(description, factory, reactor=parse_with).setServiceParent(top)

    for description in config.imap.listen:
        tls = description.startswith(TLS_PREFIXES)
        listen(description, IMAPGatewayFactory(core, tls=tls), tls)
    for description in config.imap.starttls_listen:
        listen(description, IMAPGatewayFactory(core, tls=False), False)
    for description in config.smtp.listen:
        listen(description, SMTPGatewayFactory(core, tls=False), False)
    for description in config.smtp.implicit_tls_listen:
        listen(description, SMTPGatewayFactory(core, tls=True), True)
    # A Site is a Factory, which provides IProtocolFactory through @implementer: invisible to mypy.
    site = cast(IProtocolFactory, make_site(core.store, core.connections, core.connector.policy))
    strports.service(config.api.listen, site).setServiceParent(top)
    return top
