"""Outbound connections: every upstream connection of the gateway is composed here.

One connection = name resolution (Twisted's resolver, or `network.hosts`),
address families in the order `network.ip_strategy` gives for the attempt
number, a TCP endpoint per candidate address bound to the chosen source
address, optionally wrapped by a SOCKS or HTTP CONNECT endpoint (itself over
TLS for https:// proxies), wrapped by TLS to the upstream when asked. All
attempts share `upstream.connect_timeout`.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Config
from gateway.net.addresses import family_of, normalize_pool
from gateway.net.ehlo import EhloNames
from gateway.net.httpconnect import ConnectClient
from gateway.net.ipstrategy import IPV4, IPV6, parse_strategy
from gateway.store.records import Routing
from gateway.net.policy import NetworkPolicy, Plan
from gateway.net.proxy import Handshake, ProxySpec
from gateway.net.socks import Socks4Client, Socks5Client
from gateway.net.tunnel import ProxyEndpoint, ProxyError, ProxyUnreachable, describe_failure
from gateway.tls import client_options

__all__ = ["Connector", "Route", "ProxyError"]

log = Logger()

MAX_PER_FAMILY = 4
# Seconds a name's addresses are reused without asking the resolver again. Twisted's
# resolver runs getaddrinfo on the reactor's thread pool (a thread hop per login, and a
# pool other work shares); providers' records live 300 s; a failed connection forgets them.
RESOLVED_TTL = 30.0
MIN_SHARE = 2.0
_FAMILY_NAMES = {IPV4: "IPv4", IPV6: "IPv6"}


@dataclass(frozen=True)
class Route:
    """How a connection leaves the machine (reported in logs and /v1/connections)."""

    source: str | None = None
    proxy: str | None = None  # masked: never a password


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what `IHostnameResolver.resolveHostName` finds."""

    def __init__(self) -> None:
        self.found: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.found.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def _literal_family(host: str) -> int | None:
    try:
        return IPV6 if ipaddress.ip_address(host.strip("[]")).version == 6 else IPV4
    except ValueError:
        return None


class Connector:
    """Builds and runs the endpoint chain for each upstream connection."""

    def __init__(self, reactor: Any, config: Config, store: Any = None, *,
                 policy: NetworkPolicy | None = None, resolver: Any = None,
                 ehlo: EhloNames | None = None, clock: Callable[[], float] | None = None) -> None:
        self._reactor = reactor
        self._ca_file = config.upstream.ca_file
        self._timeout = config.upstream.connect_timeout
        self._tls_cache: dict[str, Any] = {}
        network = config.network
        self.policy = policy or NetworkPolicy(network, store)
        self.ip_strategy = parse_strategy(network.ip_strategy)
        self._attempts = network.connect_attempts
        self._hosts = {name.lower().rstrip("."): normalize_pool([v] if isinstance(v, str) else v)
                       for name, v in network.hosts.items()}
        self._resolver = resolver
        self._resolved: dict[str, tuple[float, dict[int, list[str]]]] = {}
        self._clock: Callable[[], float] = clock if clock is not None else getattr(
            reactor, "seconds", time.monotonic)
        self.ehlo = ehlo or EhloNames(reactor, network.ehlo_names, config.smtp.hostname)

    def tls_options(self, host: str) -> Any:
        """Client TLS options verifying ``host`` against system CAs plus upstream.ca_file.

        Cached per host: loading the system trust store costs about 14 ms of CPU,
        and one context serves any number of connections.
        """
        options = self._tls_cache.get(host)
        if options is None:
            if len(self._tls_cache) >= 256:
                self._tls_cache.clear()
            options = self._tls_cache[host] = client_options(host, self._ca_file)
        return options

    def ehlo_name(self, route: Route) -> str:
        """The SMTP EHLO name for a connection that left by ``route`` (never waits on DNS)."""
        return self.ehlo.name_for(route.source)

    async def connect(self, host: str, port: int, factory: IProtocolFactory, *, tls: bool,
                      account: Routing | None = None, purpose: str = "imap") -> tuple[IProtocol, Route]:
        """Connect to ``host:port``; with ``tls`` the connection is implicit TLS, verified.
        ``purpose`` ("imap", "smtp", "oauth2") picks the source address: SMTP avoids listed ones.

        Raises ProxyError (`proxy: ...`, safe to show) when a proxy refuses or
        cannot be reached, else Twisted's ConnectError / DNSLookupError.
        """
        try:
            plan = await self.policy.plan(account, host, purpose)
        except ValueError as e:  # a stored proxy URL that no longer parses
            raise ProxyError(f"invalid proxy URL: {e}") from None
        deadline = self._clock() + self._timeout
        who = account.account if account is not None and account.account else "-"
        via = f" via {plan.proxy.masked}" if plan.proxy else ""
        last: Exception | None = None
        for retry_num in range(self._attempts):
            if self._clock() >= deadline:
                break
            strategy = self.ip_strategy.name_for(retry_num)
            try:
                return await self._attempt(host, port, factory, tls, plan,
                                           self.ip_strategy.families(retry_num), deadline)
            except ProxyUnreachable as e:
                last = e
            except ProxyError as e:
                log.warn("Proxy {proxy} failed for account {account} to {target}: {reason}",
                         proxy=plan.proxy.masked if plan.proxy else "-", account=who,
                         target=f"{host}:{port}", reason=str(e))
                raise
            except (ConnectError, DNSLookupError) as e:
                last = e
                self._resolved.pop(host.lower().rstrip("."), None)  # ask again on the next attempt
            log.info("Connect attempt retry_num={retry} to {target}{via} ({strategy}) for account "
                     "{account} failed: {reason}", retry=retry_num, target=f"{host}:{port}", via=via,
                     strategy=strategy, account=who, reason=describe_failure(last))
        if isinstance(last, ProxyError):
            log.warn("Proxy {proxy} failed for account {account} to {target}: {reason}",
                     proxy=plan.proxy.masked if plan.proxy else "-", account=who,
                     target=f"{host}:{port}", reason=str(last))
        raise last or TxTimeoutError(string=f"no connection within {self._timeout:.0f} s")

    async def _attempt(self, host: str, port: int, factory: IProtocolFactory, tls: bool, plan: Plan,
                       families: tuple[int, ...], deadline: float) -> tuple[IProtocol, Route]:
        """One attempt: each address of each family in order, until one connects."""
        proxy = plan.proxy
        if proxy is not None and proxy.scheme == "https" and not tls:
            raise ProxyError("STARTTLS upstreams (secure: false) cannot be reached through an https:// "
                             "proxy; use implicit TLS or an http:// proxy")
        hop_host, hop_port = (proxy.host, proxy.port) if proxy else (host, port)
        try:
            found = await self._resolve(hop_host, deadline)
        except DNSLookupError as e:
            if proxy is not None:
                raise ProxyUnreachable(f"cannot resolve proxy host {proxy.host}: {describe_failure(e)}")
            raise
        candidates = [(family, ip) for family in families for ip in found.get(family, [])[:MAX_PER_FAMILY]]
        if not candidates:
            wanted = " or ".join(_FAMILY_NAMES[f] for f in families)
            if proxy is not None:
                raise ProxyUnreachable(f"proxy host {proxy.host} has no {wanted} address")
            raise DNSLookupError(f"{host} has no {wanted} address")
        handshake = await self._handshake(proxy, host, port, families, deadline) if proxy else None
        last: Exception | None = None
        for index, (family, ip) in enumerate(candidates):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            timeout = max(remaining / (len(candidates) - index), min(remaining, MIN_SHARE))
            source = plan.sources.get(family)
            endpoint = self._endpoint(family, ip, hop_port, timeout, source)
            if proxy is not None and handshake is not None:
                if proxy.scheme == "https":
                    endpoint = wrapClientTLS(self.tls_options(proxy.host), endpoint)
                endpoint = ProxyEndpoint(endpoint, handshake, self._reactor, timeout=remaining,
                                         label=proxy.address)
            if tls:
                endpoint = wrapClientTLS(self.tls_options(host), endpoint)
            try:
                protocol = await endpoint.connect(factory)
            except ProxyUnreachable as e:
                last = e
                continue
            except ProxyError:
                raise
            except ConnectError as e:
                last = e
                continue
            return protocol, Route(source=_local_host(protocol) or source,
                                   proxy=proxy.masked if proxy else None)
        raise last or TxTimeoutError(string=f"no connection within {self._timeout:.0f} s")

    def _endpoint(self, family: int, ip: str, port: int, timeout: float, source: str | None) -> Any:
        bind = (source, 0) if source and family_of(source) == family else None
        kind = TCP6ClientEndpoint if family == IPV6 else TCP4ClientEndpoint
        return kind(self._reactor, ip, port, timeout=timeout, bindAddress=bind)

    async def _handshake(self, proxy: ProxySpec, host: str, port: int, families: tuple[int, ...],
                         deadline: float) -> Callable[[], Handshake]:
        """A factory of fresh handshake machines for the proxy's protocol."""
        if proxy.scheme in ("http", "https"):
            return lambda: ConnectClient(host, port, proxy.username, proxy.password)
        target = host
        if not proxy.remote_dns and _literal_family(host) is None:
            found = await self._resolve(host, deadline)
            order = (IPV4,) if proxy.scheme == "socks4" else families
            ips = [ip for family in order for ip in found.get(family, [])]
            if not ips:
                raise DNSLookupError(f"{host} has no {' or '.join(_FAMILY_NAMES[f] for f in order)} "
                                     f"address for {proxy.scheme}")
            target = ips[0]
        if proxy.scheme in ("socks4", "socks4a"):
            return lambda: Socks4Client(target, port, proxy.username, remote_dns=proxy.remote_dns)
        return lambda: Socks5Client(target, port, proxy.username, proxy.password,
                                    remote_dns=proxy.remote_dns)

    async def _resolve(self, host: str, deadline: float) -> dict[int, list[str]]:
        """Addresses of ``host`` by family: an IP literal, `network.hosts`, else Twisted's resolver."""
        family = _literal_family(host)
        if family is not None:
            return {family: [str(ipaddress.ip_address(host.strip("[]")))]}
        pinned = self._hosts.get(host.lower().rstrip("."))
        if pinned is not None:
            grouped: dict[int, list[str]] = {}
            for address in pinned:
                grouped.setdefault(family_of(address), []).append(address)
            return grouped
        key = host.lower().rstrip(".")
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        resolver = self._resolver or self._reactor.nameResolver
        receiver = _Addresses()
        resolver.resolveHostName(receiver, host, 0, addressTypes=[IPv4Address, IPv6Address],
                                 transportSemantics="TCP")
        waiting = receiver.done
        waiting.addTimeout(max(deadline - self._clock(), 0.1), self._reactor)
        try:
            found = await waiting
        except defer.TimeoutError:
            raise DNSLookupError(f"{host}: name resolution timed out") from None
        result: dict[int, list[str]] = {}
        for address in found:
            kind = IPV6 if isinstance(address, IPv6Address) else IPV4
            if address.host not in result.setdefault(kind, []):
                result[kind].append(address.host)
        if not result:
            raise DNSLookupError(f"{host}: no such host")
        if len(self._resolved) >= 1024:
            self._resolved.clear()
        self._resolved[key] = (self._clock() + RESOLVED_TTL, result)
        return result


def _local_host(protocol: Any) -> str | None:
    """The local IP of the connection under ``protocol`` (through TLS wrappers)."""
    transport = getattr(protocol, "transport", None)
    try:
        host = transport.getHost() if transport is not None else None
    except Exception:
        return None
    return getattr(host, "host", None)
