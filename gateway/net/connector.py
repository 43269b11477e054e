"""Outbound connections: every upstream connection of the gateway is composed here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory

from gateway.config import Config
from gateway.tls import client_options


@dataclass(frozen=True)
class Route:
    """How a connection leaves the machine (reported in logs and /v1/connections)."""

    source: str | None = None
    proxy: str | None = None


class Connector:
    """Builds endpoints: TCP (HostnameEndpoint) wrapped in TLS when asked."""

    def __init__(self, reactor: Any, config: Config) -> None:
        self._reactor = reactor
        self._ca_file = config.upstream.ca_file
        self._timeout = config.upstream.connect_timeout
        self._tls_cache: dict[str, Any] = {}

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

    async def connect(self, host: str, port: int, factory: IProtocolFactory, *, tls: bool,
                      account: dict[str, Any] | None = None) -> tuple[IProtocol, Route]:
        """Connect to ``host:port``; with ``tls`` the connection is implicit TLS, verified."""
        endpoint: Any = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        if tls:
            endpoint = wrapClientTLS(self.tls_options(host), endpoint)
        protocol = await endpoint.connect(factory)
        return protocol, Route()
