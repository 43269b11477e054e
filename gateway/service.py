"""The running gateway: shared state (core) and the listeners as Twisted services."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

import netaddr
from typing import Any, cast

from twisted.application import service, strports
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from gateway import __version__
from gateway.auth.hosted import HostedAuth
from gateway.auth.oauth2 import TokenSource
from gateway.config import Config
from gateway.connections import Connections
from gateway.imap.protocol import IMAPGatewayFactory
from gateway.metrics import CERT_RELOADS
from gateway.limits import AuthLimiter, ConnectionLimiter, open_files_cap
from gateway.imap.upstream import IMAP_KEEPER, IMAP_LEG
from gateway.smtp.protocol import SMTPGatewayFactory
from gateway.smtp.upstream import SMTP_LEG
from gateway.net.connector import Connector
from gateway.net.opener import ClientAddress, Leg, Opened, open_upstream
from gateway.net.policy import NetworkPolicy, check_configured, configured_addresses
from gateway.net.pool import ClusterLeases, PoolSettings, UpstreamPool
from gateway.net.reputation import Reputation
from gateway.session import CLOSE_GRACE, SessionDeps
from gateway.store.records import AccountRecord
from gateway.tls import TLS_PREFIXES, ServerTLS, ensure_certificate, listener_endpoint

log = Logger()


@dataclass
class Core:
    """The running gateway's shared parts: config, store, token source, connector, pools, live sessions."""

    config: Config
    reactor: Any
    store: Any
    tokens: TokenSource
    connector: Connector
    server_tls: ServerTLS
    connections: Connections = field(default_factory=Connections)
    version: str = __version__
    pools: dict[str, UpstreamPool] = field(default_factory=dict)
    auth_limits: AuthLimiter | None = None
    connection_limits: ConnectionLimiter | None = None
    max_connections: int | None = None   # limits.max_connections, lowered to what open files allow
    leases: ClusterLeases | None = None  # the per-account caps counted cluster-wide (Redis store)

    def __post_init__(self) -> None:
        self.connections = Connections(clock=self.reactor.seconds)
        self.leases = ClusterLeases(self.store, self.reactor) if getattr(self.store, "cluster", False) else None
        self.auth_limits = AuthLimiter(self.config.limits, self.reactor.seconds)
        self.connection_limits = ConnectionLimiter(self.config.limits, self.auth_limits,
                                                   max_connections=self.max_connections)
        imap, smtp = self.config.imap, self.config.smtp
        self.pools["imap"] = UpstreamPool("imap", PoolSettings(
            max_connections=imap.max_connections_per_account, limit_wait=imap.limit_wait,
            idle_ttl=imap.pool.idle_ttl, max_idle=imap.pool.max_idle_per_account,
            per_client=self.config.upstream.forward_client_ip,
        ), self.reactor, self._opener(IMAP_LEG), IMAP_KEEPER, leases=self.leases)
        self.pools["smtp"] = UpstreamPool("smtp", PoolSettings(
            max_connections=smtp.max_connections_per_account, limit_wait=smtp.limit_wait, idle_ttl=0,
        ), self.reactor, self._opener(SMTP_LEG), leases=self.leases)
        if getattr(self.store, "cluster", False):
            self.store.on_event(self._cluster_event)

    @property
    def cluster(self) -> bool:
        """Several gateways share the store (Redis): caps, refresh locks and caches are cluster-wide."""
        return bool(getattr(self.store, "cluster", False))

    def _cluster_event(self, event: dict[str, Any]) -> None:
        """What another gateway (or this one) published on the shared store."""
        kind = event.get("kind")
        if kind == "released" and event.get("protocol") in self.pools:
            self.pools[str(event["protocol"])].wake(str(event.get("account")))
        elif kind == "account":
            self._forget(str(event.get("id")))
        elif kind == "settings":
            self.connector.policy.settings_changed()
        elif kind == "disconnect":  # a token revoked with ?disconnect=true on some gateway
            ended = self.connections.end_token(str(event.get("token")))
            if ended:
                log.info("Ended {n} sessions of a token revoked with disconnect on another gateway", n=ended)

    def _opener(self, leg: Leg) -> Any:
        async def open_for(account: AccountRecord, client: ClientAddress | None) -> Opened:
            return await open_upstream(self, account, leg, client)
        return open_for

    @property
    def imap_id(self) -> bytes:
        return b'("name" "gateway" "version" "' + self.version.encode() + b'")'

    def session_deps(self, protocol: str) -> SessionDeps:
        """What a client session of ``protocol`` ("imap" or "smtp") gets."""
        return SessionDeps(reactor=self.reactor, settings=getattr(self.config, protocol), tokens=self.store,
                           upstreams=self.pools[protocol], connections=self.connections,
                           server_tls=self.server_tls, version=self.version,
                           auth_limits=self.auth_limits, connection_limits=self.connection_limits,
                           trusted_proxies=netaddr.IPSet(self.config.trusted_proxies))

    def account_changed(self, account_id: str) -> None:
        """An account was changed or deleted: its pooled connections must not serve it again, on any
        gateway of the cluster."""
        self._forget(account_id)
        if self.cluster:
            d = defer.maybeDeferred(self.store.publish, {"kind": "account", "id": account_id})
            d.addErrback(lambda f: log.warn("Cannot tell the other gateways about account {account}: {why}",
                                            account=account_id, why=f.getErrorMessage()))

    def _forget(self, account_id: str) -> None:
        for pool in self.pools.values():
            pool.forget(account_id)


class GracefulShutdown(service.Service):
    """At SIGTERM, after the listeners have closed: every client is told and closed, a command in
    flight (or an SMTP message being sent) first gets up to ``shutdown_grace`` seconds."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def stopService(self) -> Any:
        super().stopService()
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        reactor = self.core.reactor
        clients = list(self.core.connections.clients)
        if not clients:
            return
        log.info("Shutting down: {n} client connections to close (grace {grace:.0f} s)",
                 n=len(clients), grace=self.core.config.shutdown_grace)
        deadline = reactor.seconds() + self.core.config.shutdown_grace
        for client in clients:
            client.shut_down(deadline)
        give_up = deadline + CLOSE_GRACE + 1
        while any(not client._gone for client in clients) and reactor.seconds() < give_up:
            await task.deferLater(reactor, 0.1, lambda: None)


def exit_cleanly_on_sigterm(reactor: Any) -> None:
    """SIGTERM stops the reactor like Twisted's own handler, without remembering the signal:
    twistd would re-raise it at exit, and a supervisor would see a process killed by SIGTERM
    instead of one that shut down cleanly (exit status 0)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        log.info("Received SIGTERM, shutting down")
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)


def reload_certificate(server_tls: ServerTLS) -> None:
    """SIGHUP: read tls.cert/tls.key again for new connections; live ones keep theirs."""
    why_not = server_tls.reload()
    if why_not is None:
        CERT_RELOADS.labels("ok").inc()
        log.info("Reloaded the TLS certificate: {subject}; new connections get it",
                 event="tls.reload", result="ok", subject=server_tls.subject())
    else:
        CERT_RELOADS.labels("fail").inc()
        log.error("SIGHUP: TLS certificate not reloaded, the current one stays: {why}",
                  event="tls.reload", result="fail", why=why_not)


def reload_on_sighup(reactor: Any, server_tls: ServerTLS) -> None:
    import signal

    def reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload_certificate, server_tls)

    signal.signal(signal.SIGHUP, reload)


class Listener(service.Service):
    """One listener: a port that cannot be opened stops start-up with one line naming its config key
    (`gateway: config key imap.listen: cannot listen on ssl:2993: Address already in use`), not a
    traceback."""

    def __init__(self, inner: Any, key: str, description: str) -> None:
        self.inner = inner
        self.key = key
        self.description = description

    def _fail(self, error: BaseException) -> None:
        reason = getattr(error, "socketError", None) or error
        text = getattr(reason, "strerror", None) or str(reason)
        stderr = sys.__stderr__ or sys.stderr  # twistd has redirected sys.stderr into its log by now
        stderr.write(f"gateway: config key {self.key}: cannot listen on {self.description}: {text}\n")
        stderr.flush()
        os._exit(1)  # before the reactor runs: nothing to clean up, and no traceback from twistd

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self.inner.privilegedStartService()
        except CannotListenError as e:
            self._fail(e)

    def startService(self) -> None:
        super().startService()
        try:
            self.inner.startService()
        except CannotListenError as e:
            self._fail(e)
        protocol = self.key.split(".")[0]
        log.info("{proto} listening on {description} ({key})", event="listening", proto=protocol.upper(),
                 description=self.description, key=self.key)

    def stopService(self) -> Any:
        super().stopService()
        return self.inner.stopService()


class StoreService(service.Service):
    """Starts and stops the store's worker thread with the application."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Any:
        """Close the store: SQLite's worker finishes the call in progress and folds the write-ahead log
        into the database file, so the file alone is a complete copy; Redis's connections close."""
        super().stopService()
        return self.store.close()


class SourceHealthService(service.Service):
    """The DNSBL schedule (`reputation.interval`) and, every minute, a fresh look at the pools: new
    addresses start warming up and the warm-up metrics move even while no connection asks."""

    MAINTAIN_EVERY = 60.0

    def __init__(self, reactor: Any, policy: NetworkPolicy) -> None:
        self.reactor = reactor
        self.policy = policy
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.policy.reputation is not None:
            self.policy.reputation.start()
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self._maintain()))
        self._loop.clock = self.reactor
        self._loop.start(self.MAINTAIN_EVERY, now=True)

    async def _maintain(self) -> None:
        try:
            await self.policy.maintain()
        except Exception:  # the store's trouble: try again in a minute
            log.failure("Cannot refresh the source-address pools")

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.policy.reputation is not None:
            self.policy.reputation.stop()


def listen_addresses(config: Config) -> tuple[str, ...]:
    """The specific addresses the client listeners bind (``interface=``), for the certificate's SANs."""
    found: list[str] = []
    for description in (*config.imap.listen, *config.imap.starttls_listen, *config.smtp.listen,
                        *config.smtp.implicit_tls_listen):
        match = re.search(r"interface=((?:\\:|[^:])+)", description)
        if match:
            address = match.group(1).replace("\\:", ":")
            if address not in ("0.0.0.0", "::", "") and address not in found:
                found.append(address)
    return tuple(found)


def make_core(config: Config, reactor: Any) -> Core:
    """Open the store, prepare TLS material and the outbound connector."""
    from gateway.store import open_async_store

    check_configured(config.network)  # ConfigError when a source address is not on this machine
    ensure_certificate(config.tls.cert, config.tls.key, names=listen_addresses(config))
    store = open_async_store(config, reactor)
    connector = Connector(reactor, config, store)
    policy = connector.policy
    policy.reputation = Reputation(reactor, config.reputation, store, policy.source_addresses)
    tokens = TokenSource(store, reactor, connector=connector, margin=config.upstream.refresh_margin,
                         timeout=config.upstream.connect_timeout)
    reactor.callWhenRunning(connector.ehlo.warm, configured_addresses(config.network))
    return Core(config=config, reactor=reactor, store=store, tokens=tokens, connector=connector,
                server_tls=ServerTLS(config.tls.cert, config.tls.key),
                max_connections=open_files_cap(config.limits))


def make_service(config: Config, reactor: Any) -> service.MultiService:
    """All listeners of the gateway under one MultiService."""
    from gateway.api.app import make_site
    from gateway.api.dashboard.resource import DashboardOptions

    core = make_core(config, reactor)
    top = service.MultiService()
    StoreService(core.store).setServiceParent(top)
    GracefulShutdown(core).setServiceParent(top)  # stops after the listeners, before the store
    SourceHealthService(reactor, core.connector.policy).setServiceParent(top)
    reactor.callWhenRunning(exit_cleanly_on_sigterm, reactor)  # after Twisted installed its handlers
    reactor.callWhenRunning(reload_on_sighup, reactor, core.server_tls)


    def listen(key: str, description: str, factory: Any, tls: bool) -> None:
        """TLS listeners get the gateway's certificate, and `haproxy:ssl:` the PROXY header before TLS."""
        parse_with = reactor
        shown = description
        if tls:
            description, parse_with = listener_endpoint(description, core.server_tls, reactor)
        Listener(strports.service(description, factory, reactor=parse_with), key, shown).setServiceParent(top)

    imap, smtp = core.session_deps("imap"), core.session_deps("smtp")
    for description in config.imap.listen:
        tls = description.startswith(TLS_PREFIXES)
        listen("imap.listen", description, IMAPGatewayFactory(imap, tls=tls), tls)
    for description in config.imap.starttls_listen:
        listen("imap.starttls_listen", description, IMAPGatewayFactory(imap, tls=False), False)
    for description in config.smtp.listen:
        listen("smtp.listen", description, SMTPGatewayFactory(smtp, tls=False), False)
    for description in config.smtp.implicit_tls_listen:
        listen("smtp.implicit_tls_listen", description, SMTPGatewayFactory(smtp, tls=True), True)
    # A Site is a Factory, which provides IProtocolFactory through @implementer: invisible to mypy.
    hosted = HostedAuth(core.store, core.tokens.provider, config.api.public_url, config.oauth2.state_ttl,
                        account_changed=core.account_changed)
    dashboard = DashboardOptions(public_url=config.api.public_url, session_ttl=config.api.dashboard_session_ttl,
                                 state_ttl=config.oauth2.state_ttl)
    site = cast(IProtocolFactory, make_site(core.store, core.connections, core.connector.policy,
                                            account_changed=core.account_changed, hosted=hosted,
                                            auth_limits=core.auth_limits, dashboard=dashboard, reactor=reactor))
    Listener(strports.service(config.api.listen, site), "api.listen", config.api.listen).setServiceParent(top)
    return top
